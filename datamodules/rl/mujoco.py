"""HalfCheetah task families of Finn et al. 2017 (section 5.3) on gymnasium's maintained MuJoCo environments.

Needs the optional extra: ``pip install "lightning-meta[rl]"`` (``gymnasium[mujoco]``); gymnasium is
imported only when an environment is built, so the rest of the library imports without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..base import PositiveInt
from .base import TaskDistribution, TaskEnv


def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        raise ImportError(
            "HalfCheetahVel and HalfCheetahDir need gymnasium with MuJoCo; install the 'rl' extra: "
            'pip install "lightning-meta[rl]" (or pip install "gymnasium[mujoco]>=1.0")'
        ) from error
    return gymnasium


class HalfCheetahEnv(TaskEnv):
    """``HalfCheetah-v5`` copies, one per task and trajectory, with the reward of the task family.

    The reward is recomputed from the forward velocity (gymnasium's ``info["x_velocity"]``) and
    the action: ``-|v - target| - 0.05 |a|^2`` (velocity) or ``direction * v - 0.05 |a|^2``
    (direction), as in Finn et al. 2017. Environments step in this process (a gymnasium
    ``SyncVectorEnv``), built once per batch size.
    """

    obs_dim = 17
    action_dim = 6
    ctrl_cost = 0.05

    def __init__(self, family: str, horizon: int = 200, velocity: tuple[float, float] = (0.0, 2.0)) -> None:
        if family not in ("velocity", "direction"):
            raise ValueError(f"family={family!r} must be 'velocity' or 'direction'")
        self.family, self.horizon, self.velocity = family, horizon, velocity
        self._envs: dict[int, Any] = {}
        self._current: Any = None
        self.tasks: Tensor | None = None
        self._shape: tuple[int, int] = (0, 0)
        self.last_velocity: Tensor | None = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(num_tasks, 1, generator=generator)
        if self.family == "direction":
            return (u < 0.5).float() * 2 - 1
        low, high = self.velocity
        return low + u * (high - low)

    def _vector_env(self, size: int) -> Any:
        if size not in self._envs:
            gymnasium = _gymnasium()
            self._envs[size] = gymnasium.make_vec("HalfCheetah-v5", num_envs=size, vectorization_mode="sync")
        return self._envs[size]

    def reset(self, tasks: Tensor, trajectories: int, generator: torch.Generator | None = None) -> Tensor:
        self._shape = (tasks.shape[0], trajectories)
        self.tasks = tasks.float()[:, None, 0].expand(-1, trajectories)
        self._current = self._vector_env(tasks.shape[0] * trajectories)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        obs, _ = self._current.reset(seed=seed)
        return self._tensor(obs, tasks).reshape(*self._shape, self.obs_dim)

    def _tensor(self, array: np.ndarray, like: Tensor) -> Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.float32)).to(like.device)

    def reward(self, velocity: Tensor, actions: Tensor) -> Tensor:
        """The task's reward ``[B, n]`` for forward velocities ``[B, n]`` and (clipped) actions ``[B, n, 6]``."""
        assert self.tasks is not None
        cost = self.ctrl_cost * actions.square().sum(-1)
        if self.family == "velocity":
            return -(velocity - self.tasks).abs() - cost
        return self.tasks * velocity - cost

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._current is None or self.tasks is None:
            raise RuntimeError("HalfCheetahEnv.step before reset(tasks, trajectories)")
        clipped = actions.detach().float().clamp(-1, 1)
        obs, _, _, _, info = self._current.step(clipped.reshape(-1, self.action_dim).cpu().numpy())
        self.last_velocity = self._tensor(info["x_velocity"], actions).reshape(self._shape)
        reward = self.reward(self.last_velocity, clipped)
        return self._tensor(obs, actions).reshape(*self._shape, self.obs_dim), reward, torch.zeros_like(reward)


class HalfCheetahVel(TaskDistribution):
    """HalfCheetah running at a target velocity uniform in ``[velocity_min, velocity_max]`` (Finn et al. 2017).

    Args:
        velocity_min, velocity_max: the target velocities ([0, 2] in the paper).
        horizon: steps per episode (200 in the paper).
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        velocity_min: float = 0.0,
        velocity_max: float = 2.0,
        horizon: PositiveInt = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not velocity_min <= velocity_max:
            raise ValueError(f"velocity_min={velocity_min} must not exceed velocity_max={velocity_max}")
        self.env = HalfCheetahEnv("velocity", int(horizon), (velocity_min, velocity_max))


class HalfCheetahDir(TaskDistribution):
    """HalfCheetah running forward or backward, each with probability 1/2 (Finn et al. 2017).

    Args:
        horizon: steps per episode (200 in the paper).
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        horizon: PositiveInt = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.env = HalfCheetahEnv("direction", int(horizon))
