"""A cheap classic-control task family: the gym pendulum (torch, batched) with varied mass and length."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..stream import PositiveInt
from .base import TaskDistribution, TaskEnv


class PendulumEnv(TaskEnv):
    """Gymnasium's ``Pendulum-v1`` dynamics in torch; each task has its own mass and length.

    Observation ``[cos th, sin th, th_dot]``; action a torque clipped to ``[-2, 2]``; reward
    ``-(th^2 + 0.1 th_dot^2 + 0.001 u^2)`` with ``th`` normalised to ``[-pi, pi]``.
    """

    obs_dim = 3
    action_dim = 1
    gravity, dt, max_speed, max_torque = 10.0, 0.05, 8.0, 2.0

    def __init__(self, mass: tuple[float, float], length: tuple[float, float], horizon: int) -> None:
        for name, (low, high) in (("mass", mass), ("length", length)):
            if not 0 < low <= high:
                raise ValueError(f"{name}_min={low}, {name}_max={high} must satisfy 0 < min <= max")
        self.mass, self.length, self.horizon = mass, length, horizon
        self.state: Tensor | None = None
        self.tasks: Tensor | None = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(num_tasks, 2, generator=generator)
        low = torch.tensor([self.mass[0], self.length[0]])
        high = torch.tensor([self.mass[1], self.length[1]])
        return low + u * (high - low)

    def reset(self, tasks: Tensor, trajectories: int, generator: torch.Generator | None = None) -> Tensor:
        shape = (tasks.shape[0], trajectories, 2)
        noise = torch.rand(shape, generator=generator) if generator is not None else torch.rand(shape)
        self.state = (noise.to(tasks.device) * 2 - 1) * torch.tensor([math.pi, 1.0], device=tasks.device)
        self.tasks = tasks[:, None, :].float()
        return self._obs()

    def _obs(self) -> Tensor:
        assert self.state is not None
        th, thdot = self.state.unbind(-1)
        return torch.stack([th.cos(), th.sin(), thdot], -1)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.state is None or self.tasks is None:
            raise RuntimeError("PendulumEnv.step before reset(tasks, trajectories)")
        u = actions.float()[..., 0].clamp(-self.max_torque, self.max_torque)
        th, thdot = self.state.unbind(-1)
        m, length = self.tasks.unbind(-1)
        angle = (th + math.pi) % (2 * math.pi) - math.pi
        reward = -(angle.square() + 0.1 * thdot.square() + 0.001 * u.square())
        thdot = thdot + (3 * self.gravity / (2 * length) * th.sin() + 3.0 / (m * length.square()) * u) * self.dt
        thdot = thdot.clamp(-self.max_speed, self.max_speed)
        self.state = torch.stack([th + thdot * self.dt, thdot], -1)
        return self._obs(), reward, torch.zeros_like(reward)


class Pendulum(TaskDistribution):
    """Pendulum swing-up tasks with mass and length uniform in their ranges (a cheap family for tests).

    Args:
        mass_min, mass_max, length_min, length_max: the task distribution.
        horizon: steps per episode (200 in gymnasium).
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        mass_min: float = 0.5,
        mass_max: float = 1.5,
        length_min: float = 0.5,
        length_max: float = 1.5,
        horizon: PositiveInt = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.env = PendulumEnv((mass_min, mass_max), (length_min, length_max), int(horizon))
