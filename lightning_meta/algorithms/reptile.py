"""Reptile (Nichol, Achiam and Schulman 2018)."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import vmap

from datamodules.episodes import EpisodeBatch

from ..bases.episodic import EpisodeOutput
from ..bases.gradient import GradientModule
from ..functional import Params, map_tasks, select_params
from ..inner_optimizers import InnerOptimizer, resolve_inner_optimizer


class Reptile(GradientModule):
    """Reptile: move the initialisation towards the weights each task's own training reaches.

    Each task starts from the meta-parameters ``theta`` and takes ``inner_steps`` steps of SGD or
    Adam (the paper's choice, with beta1 = 0) on mini-batches of ``inner_batch_size`` support items,
    reaching ``phi_i``. The meta-update is ``theta <- theta + epsilon * mean_i(phi_i - theta)``
    (Nichol et al. 2018, Algorithm 2). It is done the Lightning way: the training step returns a
    stand-in loss whose gradient is ``theta - mean_i(phi_i)``, and the outer optimizer is SGD with
    learning rate ``epsilon`` (``outer_lr``), so checkpoints, logging, AMP and DDP work unchanged.
    ``outer_lr_anneal`` decays epsilon linearly to 0 over training, as in the paper.

    Evaluation fine-tunes on the support set for ``inner_steps_eval`` steps, then predicts the
    queries: all together (``transductive=True``, batch norm sees the query batch) or one at a
    time, each with the support set beside it for the batch statistics (``transductive=False``);
    the paper reports both.

    Tasks run one after another (``task_batching="loop"``) or together under ``torch.func.vmap``
    (``"vmap"``, for backbones vmap can run; ``Conv4(track_running_stats=False)`` can); ``"auto"``
    times both.

    With ``adaptation_curve``, validation and test also return the query loss along the fine-tuning
    (logged as ``val_adapt/loss_step_<k>``), at steps 0, 1, 2, 4, 8, ... and the last (every step up to 10).

    Args:
        backbone: the network, ending in one output per way (or the regression output) unless
            ``head`` is given.
        inner_lr: step size of the inner optimizer named by a string.
        inner_steps: inner steps per task in training.
        inner_steps_eval: inner steps per task at validation and test.
        inner_batch_size: support items per inner step (the support set is cycled in a random order).
        inner_batch_size_eval: the same at validation and test; default ``inner_batch_size``.
        inner_optimizer: "adam" (``Adam(inner_lr)``: beta1 = 0, beta2 = 0.999, as the paper), "sgd"
            (``SGD(inner_lr)``), or an inner optimizer of :mod:`lightning_meta.functional` (e.g.
            ``Adam(lr=0.001, persistent=True)``, whose moments carry over between tasks as in the
            paper's code).
        outer_lr: epsilon, the meta step size.
        outer_lr_anneal: decay epsilon linearly to 0 over the trainer's estimated steps.
        transductive: evaluate queries together (True) or one at a time (False).
        task_batching: "loop", "vmap" or "auto".
        channels_last: deprecated, see :class:`~lightning_meta.bases.gradient.GradientModule`.
        adaptation_curve: return the query loss along the fine-tuning during validation and test.
        head: an explicit head after the backbone's embedding (the network is backbone then head).
        adapt: the parameters that fine-tune (and move with the meta-update): "all", "head", or name
            prefixes / regular expressions.
    """

    min_inner_steps = 1

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        inner_steps_eval: int = 50,
        inner_batch_size: int = 10,
        inner_batch_size_eval: int | None = None,
        inner_optimizer: Literal["adam", "sgd"] | InnerOptimizer = "adam",
        outer_lr: float = 1.0,
        outer_lr_anneal: bool = True,
        transductive: bool = True,
        task_batching: Literal["auto", "loop", "vmap"] = "loop",
        channels_last: bool | None = None,
        adaptation_curve: bool = True,
        head: nn.Module | None = None,
        adapt: str | list[str] = "all",
    ) -> None:
        for name, value in (("inner_batch_size", inner_batch_size), ("inner_batch_size_eval", inner_batch_size_eval)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        rule = resolve_inner_optimizer("Reptile", inner_optimizer, inner_lr)
        optimizer: OptimizerCallable = lambda params: torch.optim.SGD(params, lr=outer_lr)  # noqa: E731
        scheduler: LRSchedulerCallable | None = self._linear_to_zero if outer_lr_anneal else None
        super().__init__(backbone, head, rule, adapt, inner_steps, inner_steps_eval, task_batching, channels_last,
                         adaptation_curve, optimizer, scheduler)  # fmt: skip
        self.inner_batch_size = inner_batch_size
        self.inner_batch_size_eval = inner_batch_size_eval or inner_batch_size
        self.outer_lr, self.transductive = outer_lr, transductive

    def _linear_to_zero(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        if isinstance(config, dict) and "monitor" not in config["lr_scheduler"]:  # per outer step, as the paper
            config["lr_scheduler"]["interval"] = "step"
        return config

    # ------------------------------------------------------------------ inner loop
    def adapt_params(self) -> Params:
        """A detached copy of the adapted meta-parameters: Reptile needs no gradient through the inner loop."""
        return {name: p.detach() for name, p in super().adapt_params().items()}

    def minibatches(self, support_size: int, steps: int, generator: torch.Generator) -> Tensor:
        """``[steps, inner_batch_size]`` support indices: passes over the support set in random orders."""
        size = min(self.inner_batch_size if self.training else self.inner_batch_size_eval, support_size)
        passes = -(-steps * size // support_size)
        order = torch.cat([torch.randperm(support_size, generator=generator) for _ in range(passes)])
        return order[: steps * size].view(steps, size)

    def predict_queries(self, params: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """One task's query predictions with the fine-tuned ``params`` (transductive or one query at a time)."""
        if self.transductive:
            return self.forward_with(params, query_x)

        # One query at a time, with the support set beside it for the batch statistics.
        def one(q: Tensor) -> Tensor:
            return self.forward_with(params, torch.cat([support_x, q.unsqueeze(0)]))[-1]

        return vmap(one)(query_x)

    def task(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, batches: Tensor, curve: bool
    ) -> tuple[Params, Tensor, Tensor | None]:
        """Fine-tune on one task; return the weights reached, the query predictions and (with ``curve``) the curve."""

        def query_loss(params: Params) -> Tensor:
            return self.outer_loss(self.predict_queries(params, support_x, query_x), query_y)

        tuned = self.adapt(support_x, support_y, batches=batches, curve_loss=query_loss if curve else None)
        with torch.no_grad():
            return tuned.params, self.predict_queries(tuned.params, support_x, query_x), tuned.curve

    # ------------------------------------------------------------------ episodes
    def run_tasks(self, batch: EpisodeBatch, mode: str, curve: bool) -> EpisodeOutput:
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()) if self.training else 0)
        support_size = batch.support_x.shape[1]
        batches = torch.stack([self.minibatches(support_size, self.steps(), g) for _ in range(batch.num_tasks)])
        inputs = (*batch.tensors, batches.to(batch.support_x.device))
        params, predictions, curves = map_tasks(partial(self.task, curve=curve), inputs, mode)
        loss = self.query_loss(predictions, batch.query_y)
        if self.training:
            loss = loss.detach() + self._meta_step_stand_in(params)
        return EpisodeOutput(loss, predictions, self.curve(curves))

    def _meta_step_stand_in(self, adapted: Params) -> Tensor:
        """Zero-valued, with gradient ``theta - mean_i(phi_i)`` for every adapted meta-parameter."""
        meta = select_params(self.network, self.adapt_selection)
        total = sum((p * (p.detach() - adapted[name].mean(0))).sum() for name, p in meta.items())
        assert isinstance(total, Tensor)
        return total - total.detach()
