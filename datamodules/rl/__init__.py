"""Task distributions for meta-reinforcement learning: each yields ``[B, P]`` task parameters and owns its env."""

from .bandit import Bandit, BanditEnv
from .base import TaskDistribution, TaskEnv
from .mujoco import HalfCheetahDir, HalfCheetahEnv, HalfCheetahVel
from .navigation2d import Navigation2D, Navigation2DEnv
from .pendulum import Pendulum, PendulumEnv

__all__ = [
    "Bandit",
    "BanditEnv",
    "HalfCheetahDir",
    "HalfCheetahEnv",
    "HalfCheetahVel",
    "Navigation2D",
    "Navigation2DEnv",
    "Pendulum",
    "PendulumEnv",
    "TaskDistribution",
    "TaskEnv",
]
