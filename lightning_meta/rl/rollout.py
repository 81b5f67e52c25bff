"""Trajectory batches and the batched rollout: every task and trajectory of a meta-batch steps together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .policies import GRUPolicy, Policy


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


#: What a step left: ``(actions, rewards, dones)``, or None before a trial's first step.
Feedback = tuple[Tensor, Tensor, Tensor] | None


def rollout(
    env: object,
    tasks: Tensor,
    trajectories: int,
    policy: Policy | GRUPolicy,
    policy_fn: Callable[[Tensor, Feedback], Tensor],
    generator: torch.Generator | None = None,
    episodes: int = 1,
) -> Trajectories:
    """Sample ``trajectories`` trials of ``episodes`` episodes of ``env.horizon`` steps on each task, without gradients.

    Args:
        env: a :class:`~datamodules.rl.base.TaskEnv`.
        tasks: ``[B, P]`` task parameters.
        trajectories: trials per task.
        policy: turns ``policy_fn``'s output into actions (:meth:`Policy.sample`).
        policy_fn: ``([B, n, obs_dim]`` observations, the last step's :data:`Feedback`) ->
            ``[B, n, D]`` distribution parameters: the policy with shared or per-task parameters,
            or a recurrent one that reads the feedback (RL^2). After an episode's last step the
            feedback's dones are 1, whatever the environment said: the next step starts an episode.
        generator: for reproducible evaluation rollouts; the global generator when None.
        episodes: episodes per trial; the environment is reset before each, the trial's time
            axis holds them one after the other (``T = episodes * env.horizon``).
    """
    record: dict[str, list[Tensor]] = {f.name: [] for f in fields(Trajectories)}
    feedback: Feedback = None
    with torch.no_grad():
        for _ in range(episodes):
            obs = env.reset(tasks, trajectories, generator)  # type: ignore[attr-defined]
            for _ in range(env.horizon):  # type: ignore[attr-defined]
                out = policy_fn(obs, feedback)
                action = policy.sample(out, generator)
                next_obs, reward, done = env.step(action)  # type: ignore[attr-defined]
                log_prob = policy.distribution(out).log_prob(action)
                values = (obs, action, reward, done, out, log_prob)
                for name, value in zip(
                    ("obs", "actions", "rewards", "dones", "policy_out", "log_probs"), values, strict=True
                ):
                    record[name].append(value)
                obs, feedback = next_obs, (action, reward, done)
            feedback = (action, reward, torch.ones_like(done))
    return Trajectories(**{name: torch.stack(values, 2) for name, values in record.items()})
