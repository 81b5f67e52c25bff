"""Multi-armed Bernoulli bandits, the first benchmark of RL^2 (Duan et al. 2016, section 3.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..stream import PositiveInt
from .base import TaskDistribution, TaskEnv


class BanditEnv(TaskEnv):
    """``arms`` Bernoulli arms with success probabilities uniform in [0, 1]; an episode is one pull.

    The observation is a constant zero; the reward is 1 with the pulled arm's probability.
    """

    obs_dim = 1
    discrete = True
    horizon = 1

    def __init__(self, arms: int) -> None:
        if arms < 2:
            raise ValueError(f"arms={arms} must be at least 2")
        self.action_dim = arms
        self.probs: Tensor | None = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        return torch.rand(num_tasks, self.action_dim, generator=generator)

    def reset(self, tasks: Tensor, trajectories: int, generator: torch.Generator | None = None) -> Tensor:
        self.probs = tasks[:, None, :].float().expand(-1, trajectories, -1)
        return tasks.new_zeros(tasks.shape[0], trajectories, 1, dtype=torch.float32)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.probs is None:
            raise RuntimeError("BanditEnv.step before reset(tasks, trajectories)")
        p = self.probs.gather(-1, actions.long()[..., None])[..., 0]
        reward = (torch.rand_like(p) < p).float()
        return torch.zeros_like(p)[..., None], reward, torch.ones_like(reward)


class Bandit(TaskDistribution):
    """Bernoulli bandit tasks (Duan et al. 2016, sec. 3.1): a cheap discrete family for RL^2.

    Args:
        arms: the number of arms (actions).
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        arms: PositiveInt = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.env = BanditEnv(int(arms))
