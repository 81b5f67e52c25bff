"""MAML for reinforcement learning (Finn, Abbeel and Levine 2017, sections 3.2 and 5.3)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.distributions import kl_divergence
from torch.func import vmap

from datamodules.rl.base import TaskEnv

from ..bases.meta_rl import MetaRLModule, start_timer
from ..functional import InnerOptimizer, Params, forward_with, inner_loop, map_tasks
from ..inner_optimizers import resolve_inner_optimizer
from .losses import ppo_clip_loss, ratio_loss, trpo_step
from .policies import Policy, make_policy
from .returns import check_discounts, discounted_returns, gae, linear_baseline, normalize
from .rollout import Trajectories, rollout


class MAMLRL(MetaRLModule):
    """MAML-RL: a policy initialisation from which one policy-gradient step on a task's trajectories solves it.

    Per task of a meta-batch: sample ``trajectories`` episodes with the current policy, adapt with
    ``inner_steps`` policy-gradient steps (REINFORCE with a linear feature baseline and GAE,
    through the shared :func:`~lightning_meta.functional.inner_loop` and its inner optimisers: SGD,
    Meta-SGD, ...), sample again with the adapted policy, and improve the initialisation on
    those post-adaptation trajectories: by TRPO (Finn et al. 2017, the KL bound on the adapted
    policies) or by PPO's clipped surrogate (ProMP-style, Rothfuss et al. 2019). The inner loss is
    the likelihood-ratio surrogate, whose gradient at the sampling policy is the policy gradient.
    Evaluation on fixed tasks logs the return before adaptation and after each of
    ``inner_steps_eval`` steps (``val/return_step_<k>``; ``test/return`` and its 95% CI after the last).

    Args:
        hidden_sizes: the policy MLP (2 x 100 in the paper).
        init_std: initial action standard deviation of the Gaussian policy.
        trajectories: episodes per task for adaptation and for the meta-update (20 in the paper).
        inner_lr: step size of the inner SGD steps (0.1 in the paper); unused with ``inner_optimizer``.
        inner_steps: inner steps during training (1 in the paper).
        inner_steps_eval: inner steps during validation and test (the paper plots up to 3).
        first_order: drop second-order terms of the meta-gradient.
        inner_optimizer: the inner update rule (``lightning_meta.functional.SGD`` / ``MetaSGD`` / ...).
        outer: ``"trpo"`` or ``"ppo"``.
        max_kl: TRPO's trust region (0.01).
        damping, cg_iterations, max_backtracks: of the TRPO step.
        ppo_epochs, ppo_clip: PPO's passes over the meta-batch and clip range.
        gamma, gae_lambda: discount and GAE parameter (0.99 and 1.0 as in the paper's code).
        optimizer: outer optimizer factory for PPO (Adam, lr 1e-3 by default); unused by TRPO.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (100, 100),
        init_std: float = 1.0,
        trajectories: int = 20,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        first_order: bool = False,
        inner_optimizer: InnerOptimizer | None = None,
        outer: Literal["trpo", "ppo"] = "trpo",
        max_kl: float = 0.01,
        damping: float = 1e-5,
        cg_iterations: int = 10,
        max_backtracks: int = 15,
        ppo_epochs: int = 5,
        ppo_clip: float = 0.2,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        if outer not in ("trpo", "ppo"):
            raise ValueError(f"MAMLRL: outer={outer!r} must be 'trpo' or 'ppo'")
        counts = {"trajectories": trajectories, "inner_steps": inner_steps, "ppo_epochs": ppo_epochs,
                  "cg_iterations": cg_iterations, "max_backtracks": max_backtracks,
                  "inner_steps_eval": inner_steps_eval}  # fmt: skip
        for name, value in counts.items():
            low = 0 if name == "inner_steps_eval" else 1
            if value < low:
                raise ValueError(f"MAMLRL: {name}={value} must be at least {low}")
        check_discounts("MAMLRL", gamma, gae_lambda)
        if not max_kl > 0:
            raise ValueError(f"MAMLRL: max_kl={max_kl} must be positive, e.g. 0.01")
        self.save_hyperparameters(ignore=["inner_optimizer", "optimizer"])
        self.hidden_sizes, self.init_std = list(hidden_sizes), init_std
        self.trajectories = trajectories
        self.inner_steps, self.inner_steps_eval, self.first_order = inner_steps, inner_steps_eval, first_order
        self.inner_optimizer = resolve_inner_optimizer("MAMLRL", inner_optimizer, inner_lr)
        self.outer, self.max_kl, self.damping = outer, max_kl, damping
        self.cg_iterations, self.max_backtracks = cg_iterations, max_backtracks
        self.ppo_epochs, self.ppo_clip, self.gamma, self.gae_lambda = ppo_epochs, ppo_clip, gamma, gae_lambda
        self.optimizer_factory = optimizer if optimizer is not None else partial(torch.optim.Adam, lr=1e-3)
        self.policy: Policy | None = None
        self.trajectory_snapshot: dict[str, Tensor] | None = None

    def build(self, env: TaskEnv) -> None:
        self.policy = make_policy(env.obs_dim, env.action_dim, env.discrete, self.hidden_sizes, self.init_std)
        self.inner_optimizer.bind(dict(self.policy.named_parameters()))

    def meta_parameters(self) -> list[Tensor]:
        """What the meta-update changes: the policy and the inner optimiser's learned state (Meta-SGD)."""
        assert self.policy is not None
        return [*self.policy.parameters(), *self.inner_optimizer.parameters()]

    # ------------------------------------------------------------------ pieces
    def policy_out(self, params: Params, obs: Tensor, per_task: bool) -> Tensor:
        """Distribution parameters for ``obs [B, ...]``: shared ``params``, or one set per task (``[B, ...]`` each)."""
        policy = self.policy
        assert policy is not None, "the policy is built in setup()"
        if per_task:
            return vmap(partial(forward_with, policy))(params, obs)
        return forward_with(policy, params, obs)

    def sample(self, tasks: Tensor, params: Params, per_task: bool, generator: torch.Generator | None) -> Trajectories:
        """``trajectories`` episodes per task with the given (shared or per-task) parameters."""
        assert self.policy is not None
        detached = {name: p.detach() for name, p in params.items()}
        return rollout(self.env, tasks, self.trajectories, self.policy,
                       lambda obs, _: self.policy_out(detached, obs, per_task), generator)  # fmt: skip

    def advantages(self, traj: Trajectories) -> Tensor:
        """Per-task normalised GAE with the linear feature baseline fitted to the task's returns."""
        returns = discounted_returns(traj.rewards, traj.dones, self.gamma)
        values = linear_baseline(traj.obs, returns)
        return normalize(gae(traj.rewards, values, traj.dones, self.gamma, self.gae_lambda))

    def log_probs(self, params: Params, per_task: bool, traj: Trajectories) -> tuple[Tensor, Any]:
        assert self.policy is not None
        dist = self.policy.distribution(self.policy_out(params, traj.obs, per_task))
        return dist.log_prob(traj.actions), dist

    def adapt(
        self, params: Params, per_task: bool, traj: Trajectories, advantages: Tensor, create_graph: bool
    ) -> Params:
        """One inner policy-gradient step per task on ``traj``, all tasks under ``vmap``: parameters ``[B, ...]``."""
        policy, names = self.policy, list(params)
        assert policy is not None

        def task_step(obs: Tensor, actions: Tensor, old: Tensor, adv: Tensor, *values: Tensor) -> Params:
            def loss_fn(p: Params) -> Tensor:
                dist = policy.distribution(forward_with(policy, p, obs))
                return ratio_loss(dist.log_prob(actions), old, adv)

            start = dict(zip(names, values, strict=True)) if per_task else params
            return inner_loop(loss_fn, start, self.inner_optimizer, 1, create_graph=create_graph).params

        inputs = [traj.obs, traj.actions, traj.log_probs, advantages, *(params.values() if per_task else ())]
        return map_tasks(task_step, inputs, "vmap")

    def evaluate(
        self, tasks: Tensor, steps: int, generator: torch.Generator | None
    ) -> tuple[list[Tensor], list[Trajectories]]:
        """Mean returns ``[B]`` before adaptation and after each of ``steps`` steps, and the rollouts."""
        assert self.policy is not None
        params: Params = {name: p.detach() for name, p in self.policy.named_parameters()}
        per_task = False
        traj = self.sample(tasks, params, per_task, generator)
        returns, rollouts = [traj.returns.mean(1)], [traj]
        for _ in range(steps):
            params = {
                n: p.detach() for n, p in self.adapt(params, per_task, traj, self.advantages(traj), False).items()
            }
            per_task = True
            traj = self.sample(tasks, params, per_task, generator)
            returns.append(traj.returns.mean(1))
            rollouts.append(traj)
        return returns, rollouts

    # ------------------------------------------------------------------ Lightning
    def training_step(self, tasks: Tensor, batch_idx: int) -> None:
        assert self.policy is not None
        started = start_timer()
        theta: Params = dict(self.policy.named_parameters())
        data: list[tuple[Trajectories, Tensor]] = []
        params, per_task = theta, False
        for _ in range(self.inner_steps):
            traj = self.sample(tasks, params, per_task, None)
            data.append((traj, self.advantages(traj)))
            with torch.no_grad():
                params = self.adapt(params, per_task, traj, data[-1][1], False)
            per_task = True
        post = self.sample(tasks, params, True, None)
        post_adv = self.advantages(post)
        old = self.policy.distribution(post.policy_out)

        def adapted() -> Params:
            p, per_task = theta, False
            for traj, adv in data:
                p = self.adapt(p, per_task, traj, adv, create_graph=not self.first_order)
                per_task = True
            return p

        def objective() -> tuple[Tensor, Tensor]:
            log_probs, dist = self.log_probs(adapted(), True, post)
            return ratio_loss(log_probs, post.log_probs, post_adv), kl_divergence(old, dist).mean()

        if self.outer == "trpo":
            stats = trpo_step(self.meta_parameters(), objective, self.max_kl, self.damping, self.cg_iterations,
                              max_backtracks=self.max_backtracks, reduce=self.reduce_mean)  # fmt: skip
            loss, kl = stats["loss_before"], stats["kl"]
            self.optimizers().step()  # type: ignore[union-attr]  # no gradients: counts the step (global_step, max_steps)
        else:
            for _ in range(self.ppo_epochs):
                log_probs, dist = self.log_probs(adapted(), True, post)
                loss = ppo_clip_loss(log_probs, post.log_probs, post_adv, self.ppo_clip)
                self.apply_gradients(loss, self.meta_parameters())
            kl = kl_divergence(old, dist).mean().detach()
        batch = tasks.shape[0]
        self.log("train/loss", loss.detach(), batch_size=batch)
        self.log("train/kl", kl, batch_size=batch)
        self.log("train/return_pre", data[0][0].returns.mean(), prog_bar=True, batch_size=batch)
        self.log("train/return_post", post.returns.mean(), prog_bar=True, batch_size=batch)
        self.log_env_rate(sum(traj.steps for traj, _ in data) + post.steps, started)

    def _eval_step(self, tasks: Tensor, batch_idx: int, stage: str) -> None:
        self.check_grad_mode()
        returns, rollouts = self.evaluate(tasks, self.inner_steps_eval, self.rollout_generator(tasks, stage, batch_idx))
        for k, value in enumerate(returns):
            self.log_returns(stage, f"return_step_{k}", value)
        self.log_returns(stage, "return", returns[-1], final=True)
        if batch_idx == 0:
            self.trajectory_snapshot = {"tasks": tasks, "pre": rollouts[0].obs, "post": rollouts[-1].obs}

    def validation_step(self, tasks: Tensor, batch_idx: int) -> None:
        self._eval_step(tasks, batch_idx, "val")

    def test_step(self, tasks: Tensor, batch_idx: int) -> None:
        self._eval_step(tasks, batch_idx, "test")

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self.meta_parameters())
