"""Reptile (Nichol, Achiam and Schulman 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from datamodules.episodes import EpisodeBatch

from ..backbones import to_channels_last, vmap_safe_batch_norm
from ..base import EpisodicModule

Params = dict[str, Tensor]


class Reptile(EpisodicModule):
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
    (``"vmap"``, for backbones vmap can run; ``Conv4(track_running_stats=False)`` can).

    With ``adaptation_curve``, validation and test also log the query loss along the fine-tuning,
    ``val_adapt/loss_step_<k>``, at steps 0, 1, 2, 4, 8, ... and the last (every step up to 10).

    Args:
        backbone: the network, ending in one output per way (or the regression output).
        inner_lr: step size of the inner optimizer.
        inner_steps: inner steps per task in training.
        inner_steps_eval: inner steps per task at validation and test.
        inner_batch_size: support items per inner step (the support set is cycled in a random order).
        inner_batch_size_eval: the same at validation and test; default ``inner_batch_size``.
        inner_optimizer: "adam" (beta1 = 0, beta2 = 0.999, as the paper) or "sgd".
        outer_lr: epsilon, the meta step size.
        outer_lr_anneal: decay epsilon linearly to 0 over the trainer's estimated steps.
        transductive: evaluate queries together (True) or one at a time (False).
        task_batching: "loop" or "vmap".
        channels_last: channels-last memory format for the backbone's weights and the image batches (see
            :attr:`EpisodicModule.channels_last`). Off by default here: channels-last kernels round
            differently with the thread count and the inner loop amplifies it, so DDP and single-process
            test accuracy differed; the speed gain was small (benchmarks/RESULTS.md).
        adaptation_curve: log the query loss along the fine-tuning during validation and test.
    """

    needs_grad_in_eval = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        inner_steps_eval: int = 50,
        inner_batch_size: int = 10,
        inner_batch_size_eval: int | None = None,
        inner_optimizer: Literal["adam", "sgd"] = "adam",
        outer_lr: float = 1.0,
        outer_lr_anneal: bool = True,
        transductive: bool = True,
        task_batching: Literal["loop", "vmap"] = "loop",
        channels_last: bool = False,
        adaptation_curve: bool = True,
    ) -> None:
        if inner_optimizer not in ("adam", "sgd"):
            raise ValueError(f"inner_optimizer={inner_optimizer!r} must be 'adam' or 'sgd'")
        if task_batching not in ("loop", "vmap"):
            raise ValueError(f"task_batching={task_batching!r} must be 'loop' or 'vmap'")
        for name, value in (("inner_steps", inner_steps), ("inner_steps_eval", inner_steps_eval),
                            ("inner_batch_size", inner_batch_size)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        optimizer: OptimizerCallable = lambda params: torch.optim.SGD(params, lr=outer_lr)  # noqa: E731
        scheduler: LRSchedulerCallable | None = None
        if outer_lr_anneal:
            scheduler = self._linear_to_zero
        super().__init__(backbone, optimizer, scheduler)
        self.inner_lr, self.inner_steps, self.inner_steps_eval = inner_lr, inner_steps, inner_steps_eval
        self.inner_batch_size, self.inner_optimizer = inner_batch_size, inner_optimizer
        self.inner_batch_size_eval = inner_batch_size_eval or inner_batch_size
        self.outer_lr, self.transductive = outer_lr, transductive
        self.task_batching, self.channels_last = task_batching, channels_last
        self.adaptation_curve = adaptation_curve
        self._vmapping = False

    def _linear_to_zero(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        if isinstance(config, dict):  # the paper anneals per outer step, not per epoch
            config["lr_scheduler"]["interval"] = "step"
        return config

    # ------------------------------------------------------------------ inner loop
    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        """Run the backbone with ``params`` in place of its own parameters."""
        return functional_call(self.backbone, params, (x,))

    def inner_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss the inner optimizer descends (one task, one mini-batch)."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    def minibatches(self, support_size: int, steps: int, generator: torch.Generator) -> Tensor:
        """``[steps, inner_batch_size]`` support indices: passes over the support set in random orders."""
        size = min(self.inner_batch_size if self.training else self.inner_batch_size_eval, support_size)
        passes = -(-steps * size // support_size)
        order = torch.cat([torch.randperm(support_size, generator=generator) for _ in range(passes)])
        return order[: steps * size].view(steps, size)

    def fine_tune(self, support_x: Tensor, support_y: Tensor, batches: Tensor) -> Params:
        """Train a copy of the meta-parameters on one task; ``batches`` holds the support indices per step."""
        params = {name: p.detach() for name, p in self.backbone.named_parameters()}
        state = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}
        with torch.enable_grad():
            for step in range(batches.shape[0]):
                self.on_inner_step(step, batches.shape[0], params)
                index = batches[step]
                grads = self._gradients(params, support_x[index], support_y[index])
                params, state = self._inner_update(params, grads, state, step + 1)
        self.on_inner_step(batches.shape[0], batches.shape[0], params)
        return params

    def _gradients(self, params: Params, x: Tensor, y: Tensor) -> Params:
        def loss(p: Params) -> Tensor:
            return self.inner_loss(self.forward_with(p, x), y)

        if self._vmapping:
            return grad(loss)(params)
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        found = torch.autograd.grad(loss(leaves), list(leaves.values()), allow_unused=True)
        return {
            name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), found, strict=True)
        }

    def _inner_update(
        self, params: Params, grads: Params, state: dict[str, tuple[Tensor, Tensor]], t: int
    ) -> tuple[Params, dict[str, tuple[Tensor, Tensor]]]:
        if self.inner_optimizer == "sgd":
            return {n: p - self.inner_lr * grads[n] for n, p in params.items()}, state
        beta2, eps = 0.999, 1e-8  # beta1 = 0 (Nichol et al. 2018, section 6)
        new_params, new_state = {}, {}
        for name, p in params.items():
            g = grads[name]
            v = beta2 * state[name][1] + (1 - beta2) * g * g
            new_params[name] = p - self.inner_lr * g / ((v / (1 - beta2**t)).sqrt() + eps)
            new_state[name] = (g, v)
        return new_params, new_state

    # ------------------------------------------------------------------ episodes
    def _predict(self, params: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        if self.transductive:
            return self.forward_with(params, query_x)

        # One query at a time, with the support set beside it for the batch statistics.
        def one(q: Tensor) -> Tensor:
            return self.forward_with(params, torch.cat([support_x, q.unsqueeze(0)]))[-1]

        return vmap(one)(query_x)

    def _task(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, batches: Tensor) -> tuple[Params, Tensor]:
        params = self.fine_tune(support_x, support_y, batches)
        with torch.no_grad():
            return params, self._predict(params, support_x, query_x)

    def _task_and_curve(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, batches: Tensor
    ) -> tuple[Params, Tensor, Tensor]:
        """:meth:`_task` and the task's query losses along the fine-tuning (evaluation only)."""

        def loss(predictions: Tensor) -> Tensor:
            return self.query_loss(predictions.unsqueeze(0), query_y.unsqueeze(0)).squeeze(0)

        with self.inner_step_losses(lambda p: loss(self._predict(p, support_x, query_x))) as curve:
            params, predictions = self._task(support_x, support_y, query_x, batches)
        return params, predictions, curve.finish(loss(predictions))

    def episode_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        if self.channels_last:
            batch = batch._replace(support_x=to_channels_last(batch.support_x), query_x=to_channels_last(batch.query_x))
        steps = self.inner_steps if self.training else self.inner_steps_eval
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()) if self.training else 0)
        batches = torch.stack([self.minibatches(batch.support_x.shape[1], steps, g) for _ in range(batch.num_tasks)])
        batches = batches.to(batch.support_x.device)
        curve = self.recording_adaptation_curve()
        task: Callable[..., tuple[Any, ...]] = self._task_and_curve if curve else self._task
        inputs = (batch.support_x, batch.support_y, batch.query_x, *([batch.query_y] if curve else []), batches)
        if self.task_batching == "vmap":
            self._vmapping = True
            try:
                with vmap_safe_batch_norm():
                    params, predictions, *curves = vmap(task)(*inputs)
            finally:
                self._vmapping = False
        else:
            results = [task(*(part[t] for part in inputs)) for t in range(batch.num_tasks)]
            params = {name: torch.stack([r[0][name] for r in results]) for name in results[0][0]}
            predictions = torch.stack([r[1] for r in results])
            curves = [torch.stack([r[2] for r in results])] if curve else []
        if curves:
            self.record_adaptation_curve(curves[0])
        loss = self.query_loss(predictions, batch.query_y)
        if self.training:
            loss = loss.detach() + self._meta_step_stand_in(params)
        return loss, predictions

    def _meta_step_stand_in(self, adapted: Params) -> Tensor:
        """Zero-valued, with gradient ``theta - mean_i(phi_i)`` for every meta-parameter."""
        total = sum((p * (p.detach() - adapted[name].mean(0))).sum() for name, p in self.backbone.named_parameters())
        assert isinstance(total, Tensor)
        return total - total.detach()
