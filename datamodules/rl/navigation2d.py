"""2D navigation of Finn et al. 2017 (section 5.3): a point robot that must reach an unknown goal."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..stream import PositiveInt
from .base import TaskDistribution, TaskEnv


class Navigation2DEnv(TaskEnv):
    """A point in the plane, all tasks and trajectories stepped as one tensor operation.

    Observation: the position (starting at the origin). Action: a displacement clipped to
    ``[-max_step, max_step]`` per coordinate. Reward: minus the distance from the new position to
    the task's goal. Episodes last ``horizon`` steps (no early termination).
    """

    obs_dim = 2
    action_dim = 2

    def __init__(self, goal_low: float = -0.5, goal_high: float = 0.5, max_step: float = 0.1, horizon: int = 100):
        if not goal_low < goal_high:
            raise ValueError(f"goal_low={goal_low} must be below goal_high={goal_high}")
        if not max_step > 0:
            raise ValueError(f"max_step={max_step} must be positive")
        self.goal_low, self.goal_high, self.max_step, self.horizon = goal_low, goal_high, max_step, horizon
        self.position: Tensor | None = None
        self.goal: Tensor | None = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        return torch.rand(num_tasks, 2, generator=generator) * (self.goal_high - self.goal_low) + self.goal_low

    def reset(self, tasks: Tensor, trajectories: int, generator: torch.Generator | None = None) -> Tensor:
        self.goal = tasks[:, None, :].float()
        self.position = tasks.new_zeros(tasks.shape[0], trajectories, 2, dtype=torch.float32)
        return self.position.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.position is None or self.goal is None:
            raise RuntimeError("Navigation2DEnv.step before reset(tasks, trajectories)")
        self.position = self.position + actions.float().clamp(-self.max_step, self.max_step)
        reward = -(self.position - self.goal).norm(dim=-1)
        return self.position.clone(), reward, torch.zeros_like(reward)


class Navigation2D(TaskDistribution):
    """Tasks of 2D navigation (Finn et al. 2017, sec. 5.3): goals uniform in ``[goal_low, goal_high]^2``.

    Args:
        goal_low, goal_high: the square of goals.
        max_step: the action clip per coordinate (0.1 in the paper).
        horizon: steps per episode (100 in the paper).
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        goal_low: float = -0.5,
        goal_high: float = 0.5,
        max_step: float = 0.1,
        horizon: PositiveInt = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.env = Navigation2DEnv(goal_low, goal_high, max_step, int(horizon))
