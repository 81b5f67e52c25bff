"""RL^2: fast reinforcement learning via slow reinforcement learning (Duan et al. 2016; Wang et al. 2016)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from datamodules.rl.base import TaskEnv

from ..bases.meta_rl import MetaRLModule, start_timer
from .losses import ppo_clip_loss
from .policies import GRUPolicy
from .returns import check_discounts, gae, normalize
from .rollout import Feedback, rollout


class RL2(MetaRLModule):
    """RL^2: a recurrent policy whose hidden state, kept across the episodes of a trial on one task, learns to adapt.

    Each training step rolls out ``trials`` trials of ``episodes_per_trial`` episodes on every
    task of the meta-batch; the GRU sees the observation, the previous action, reward and done
    flag (Duan et al. 2016, sec. 2.2, Figure 1), and its state is reset only between trials. The
    trial is one long episode for the optimiser: advantages by GAE with the GRU's value head over
    the whole trial, updated by PPO (Schulman et al. 2017; the paper used TRPO). Evaluation on the
    fixed tasks logs the return of each episode of the trial (``val/return_episode_<k>``) and the
    trial's mean episode return (``val/return``, ``test/return`` with its 95% CI).

    Args:
        hidden_size: GRU units.
        init_std: initial action standard deviation for continuous actions.
        episodes_per_trial: episodes per trial (the hidden state persists across them).
        trials: trials per task in a training step.
        ppo_epochs: PPO passes over a meta-batch.
        ppo_clip: PPO's clip range.
        gamma: discount within a trial (across its episodes too).
        gae_lambda: GAE parameter.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        optimizer: outer optimizer factory (Adam, lr 1e-3 by default).
    """

    def __init__(
        self,
        hidden_size: int = 64,
        init_std: float = 1.0,
        episodes_per_trial: int = 2,
        trials: int = 4,
        ppo_epochs: int = 4,
        ppo_clip: float = 0.2,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        value_coef: float = 0.5,
        entropy_coef: float = 0.0,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        counts = {"hidden_size": hidden_size, "episodes_per_trial": episodes_per_trial, "trials": trials}
        for name, value in {**counts, "ppo_epochs": ppo_epochs}.items():
            if value < 1:
                raise ValueError(f"RL2: {name}={value} must be at least 1")
        check_discounts("RL2", gamma, gae_lambda)
        self.save_hyperparameters(ignore=["optimizer"])
        self.hidden_size, self.init_std = hidden_size, init_std
        self.episodes_per_trial, self.trials = episodes_per_trial, trials
        self.ppo_epochs, self.ppo_clip, self.gamma, self.gae_lambda = ppo_epochs, ppo_clip, gamma, gae_lambda
        self.value_coef, self.entropy_coef = value_coef, entropy_coef
        self.optimizer_factory = optimizer if optimizer is not None else partial(torch.optim.Adam, lr=1e-3)
        self.policy: GRUPolicy | None = None

    def build(self, env: TaskEnv) -> None:
        self.policy = GRUPolicy(env.obs_dim, env.action_dim, env.discrete, self.hidden_size, self.init_std)

    def trial(self, tasks: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Roll out ``trials`` trials per task: ``[B * trials, L]`` sequences (``L`` = episodes x horizon)."""
        policy = self.policy
        assert policy is not None
        batch, n = tasks.shape[0], self.trials
        inputs: list[Tensor] = []
        values: list[Tensor] = []
        hidden: Tensor | None = None

        def act(obs: Tensor, feedback: Feedback) -> Tensor:
            # The GRU reads the observation, the previous action, reward and done flag (Duan et al. 2016, Figure 1).
            nonlocal hidden
            if feedback is None:
                prev, reward, done = obs.new_zeros(batch, n, policy.action_dim), *obs.new_zeros(2, batch, n)
            else:
                action, reward, done = feedback
                prev = policy.encode_action(action)
            step = policy.inputs(obs, prev, reward, done).reshape(batch * n, 1, -1)
            out, value, hidden = policy(step, hidden)
            inputs.append(step[:, 0])
            values.append(value[:, 0])
            return out[:, 0].reshape(batch, n, -1)

        traj = rollout(self.env, tasks, n, policy, act, generator, self.episodes_per_trial)
        return {"inputs": torch.stack(inputs, 1), "actions": traj.actions.flatten(0, 1),
                "rewards": traj.rewards.flatten(0, 1), "out": traj.policy_out.flatten(0, 1),
                "log_probs": traj.log_probs.flatten(0, 1), "values": torch.stack(values, 1)}  # fmt: skip

    def episode_returns(self, rollout: dict[str, Tensor], tasks: int) -> Tensor:
        """``[B, episodes_per_trial]`` mean return of each episode of the trial, per task."""
        rewards = rollout["rewards"].reshape(tasks, self.trials, self.episodes_per_trial, -1)
        return rewards.sum(-1).mean(1)

    def training_step(self, tasks: Tensor, batch_idx: int) -> None:
        assert self.policy is not None
        started = start_timer()
        data = self.trial(tasks, None)
        rewards = data["rewards"]
        dones = torch.zeros_like(rewards)
        dones[:, -1] = 1  # a trial is one episode for the optimiser
        advantages = gae(rewards, data["values"], dones, self.gamma, self.gae_lambda)
        returns = advantages + data["values"]
        advantages = normalize(advantages, (0, 1))
        for _ in range(self.ppo_epochs):
            out, values, _ = self.policy(data["inputs"])
            dist = self.policy.distribution(out)
            loss = ppo_clip_loss(dist.log_prob(data["actions"]), data["log_probs"], advantages, self.ppo_clip)
            loss = (
                loss + self.value_coef * (values - returns).square().mean() - self.entropy_coef * dist.entropy().mean()
            )
            self.apply_gradients(loss, list(self.policy.parameters()))
        batch = tasks.shape[0]
        per_episode = self.episode_returns(data, batch)
        self.log("train/loss", loss.detach(), batch_size=batch)
        self.log("train/return", per_episode.mean(), prog_bar=True, batch_size=batch)
        for k in range(self.episodes_per_trial):
            self.log(f"train/return_episode_{k}", per_episode[:, k].mean(), batch_size=batch)
        self.log_env_rate(rewards.numel(), started)

    def _eval_step(self, tasks: Tensor, batch_idx: int, stage: str) -> None:
        per_episode = self.episode_returns(
            self.trial(tasks, self.rollout_generator(tasks, stage, batch_idx)), tasks.shape[0]
        )
        for k in range(self.episodes_per_trial):
            self.log_returns(stage, f"return_episode_{k}", per_episode[:, k])
        self.log_returns(stage, "return", per_episode.mean(1), final=True)

    def validation_step(self, tasks: Tensor, batch_idx: int) -> None:
        self._eval_step(tasks, batch_idx, "val")

    def test_step(self, tasks: Tensor, batch_idx: int) -> None:
        self._eval_step(tasks, batch_idx, "test")

    def configure_optimizers(self) -> Any:
        assert self.policy is not None
        return self.optimizer_factory(self.policy.parameters())
