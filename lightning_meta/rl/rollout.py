"""Trajectory batches and the batched rollout: every task and trajectory of a meta-batch steps together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .policies import Policy


@dataclass
class Trajectories:
    """``n`` trajectories of length ``T`` for each of ``B`` tasks, with what the sampling policy output.

    Attributes:
        obs: ``[B, n, T, obs_dim]`` observations the actions were taken in.
        actions: ``[B, n, T, action_dim]`` (``[B, n, T]`` indices for discrete actions).
        rewards: ``[B, n, T]``.
        dones: ``[B, n, T]``, 1 where an episode ended at that step.
        policy_out: ``[B, n, T, D]`` the sampling policy's distribution parameters (for KL and ratios).
        log_probs: ``[B, n, T]`` log-probabilities of the actions under the sampling policy.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    dones: Tensor
    policy_out: Tensor
    log_probs: Tensor

    @property
    def returns(self) -> Tensor:
        """``[B, n]`` undiscounted return of each trajectory."""
        return self.rewards.sum(-1)

    @property
    def steps(self) -> int:
        """Environment steps held."""
        return self.rewards.numel()

    def task(self, b: int) -> Trajectories:
        """Task ``b``'s trajectories, ``[n, T, ...]``."""
        return Trajectories(*(getattr(self, f.name)[b] for f in fields(self)))


def rollout(
    env: object,
    tasks: Tensor,
    trajectories: int,
    policy: Policy,
    policy_fn: Callable[[Tensor], Tensor],
    generator: torch.Generator | None = None,
) -> Trajectories:
    """Sample ``trajectories`` episodes of ``env.horizon`` steps on each task, without gradients.

    Args:
        env: a :class:`~datamodules.rl.base.TaskEnv`.
        tasks: ``[B, P]`` task parameters.
        trajectories: episodes per task.
        policy: turns ``policy_fn``'s output into actions (:meth:`Policy.sample`).
        policy_fn: ``[B, n, obs_dim]`` observations -> ``[B, n, D]`` distribution parameters (the
            policy with shared or per-task parameters).
        generator: for reproducible evaluation rollouts; the global generator when None.
    """
    obs = env.reset(tasks, trajectories, generator)  # type: ignore[attr-defined]
    record: dict[str, list[Tensor]] = {f.name: [] for f in fields(Trajectories)}
    with torch.no_grad():
        for _ in range(env.horizon):  # type: ignore[attr-defined]
            out = policy_fn(obs)
            action = policy.sample(out, generator)
            next_obs, reward, done = env.step(action)  # type: ignore[attr-defined]
            log_prob = policy.distribution(out).log_prob(action)
            values = (obs, action, reward, done, out, log_prob)
            for name, value in zip(
                ("obs", "actions", "rewards", "dones", "policy_out", "log_probs"), values, strict=True
            ):
                record[name].append(value)
            obs = next_obs
    return Trajectories(**{name: torch.stack(values, 2) for name, values in record.items()})
