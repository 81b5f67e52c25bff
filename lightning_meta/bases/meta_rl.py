"""MetaRLModule: the small base of the meta-RL LightningModules (MAMLRL, RL2).

It owns what both share: the environment of the datamodule, manual optimisation with gradients
averaged over processes through the Trainer's strategy, seeded evaluation rollouts, the returns'
95% confidence interval, the ``env_steps/s`` of the progress bar, and what the Trainer should
watch (the checkpoint monitor and :meth:`~MetaRLModule.configure_callbacks`). Rollouts happen
inside the training step, so the Trainer's DDP, checkpointing, resume and ``max_time`` keep working.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from datamodules.rl.base import TaskDistribution, TaskEnv

from ..callbacks import TrajectoryImages
from ..metrics import ConfidenceInterval95


class MetaRLModule(pl.LightningModule):
    """Base of meta-RL modules: a batch is ``[B, P]`` task parameters of the datamodule's ``env``.

    Subclasses build their networks in :meth:`build` (called from ``setup``, once the environment's
    sizes are known) and implement the Lightning steps. Evaluation adapts with gradients, so the
    Trainer needs ``inference_mode=False`` (the ``lightning-meta`` CLI sets it).
    """

    #: The metric and mode the CLI's checkpoint callback keeps the best checkpoint by.
    checkpoint_monitor = ("val/return", "max")

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.test_ci = ConfidenceInterval95()
        self._built = False

    # ------------------------------------------------------------------ environment and networks
    @property
    def tasks(self) -> TaskDistribution:
        """The Trainer's datamodule: the task distribution, with its environment and evaluation seeds."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(datamodule, TaskDistribution) or not isinstance(getattr(datamodule, "env", None), TaskEnv):
            raise ValueError(
                f"{type(self).__name__} needs a meta-RL datamodule with an `env` (datamodules.rl: Navigation2D, "
                f"Pendulum, Bandit, HalfCheetahVel, HalfCheetahDir), got {type(datamodule).__name__}; pass "
                "trainer.fit(module, datamodule=...)"
            )
        return datamodule

    @property
    def env(self) -> TaskEnv:
        """The task environment of the Trainer's datamodule (a :class:`~datamodules.rl.TaskDistribution`)."""
        return self.tasks.env

    def build(self, env: TaskEnv) -> None:
        """Create the networks for ``env``'s observation and action sizes."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if not self._built:
            self.build(self.env)
            self._built = True

    # ------------------------------------------------------------------ optimisation across processes
    def reduce_mean(self, x: Tensor) -> Tensor:
        """The mean of ``x`` over DDP processes (``x`` itself on one)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return x
        return trainer.strategy.reduce(x, reduce_op="mean")

    def apply_gradients(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        """One step of the outer optimiser on ``loss``, with its gradients averaged over processes."""
        params = list(params)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
        )
        flat = self.reduce_mean(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer = self.optimizers()
        optimizer.step()  # type: ignore[union-attr]
        optimizer.zero_grad()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ evaluation helpers
    def check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients during evaluation, which inference mode prevents; "
                "create the Trainer with inference_mode=False (the lightning-meta CLI does)"
            )

    def rollout_generator(self, tasks: Tensor, stage: str, batch_idx: int) -> torch.Generator:
        """A generator for the rollouts of evaluation batch ``batch_idx``: the same actions every run.

        Seeded by the datamodule (:meth:`~datamodules.rl.base.TaskDistribution.rollout_generator`).
        """
        return self.tasks.rollout_generator(stage, batch_idx, tasks.device)

    def log_env_rate(self, steps: int, started: float) -> None:
        """``env_steps/s`` of this training step in the progress bar."""
        seconds = time.perf_counter() - started
        if seconds > 0:
            self.log("env_steps/s", steps / seconds, prog_bar=True, batch_size=1)

    def log_returns(self, stage: str, name: str, returns: Tensor, final: bool = False) -> None:
        """Log the mean over tasks of ``returns [B]`` as ``{stage}/{name}``; ``final`` also feeds the test CI."""
        self.log(f"{stage}/{name}", returns.mean(), batch_size=returns.numel(), sync_dist=stage != "train")
        if final and stage == "test":
            self.test_ci.update(returns)
            self.log("test/return_ci95", self.test_ci, batch_size=returns.numel())

    def configure_optimizers(self) -> Any:
        raise NotImplementedError

    def configure_callbacks(self) -> list[pl.Callback]:
        """Pictures of rollouts, which take the place of the episode pictures: a batch of tasks holds no images."""
        return [TrajectoryImages()]


def start_timer() -> float:
    """The time a training step started, for :meth:`MetaRLModule.log_env_rate`."""
    return time.perf_counter()
