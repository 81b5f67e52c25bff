"""Model-Agnostic Meta-Learning (Finn, Abbeel and Levine 2017) and its first-order variant."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.episodes import EpisodeBatch

from .base import EpisodicModule
from .models import to_channels_last

Params = dict[str, Tensor]


class MAML(EpisodicModule):
    """MAML: learn an initialisation from which a few gradient steps on the support set fit the task.

    The inner loop is functional (``torch.func.functional_call``), so the meta-gradient flows
    through the adapted weights (second order), or, with ``first_order=True``, treats the inner
    gradients as constants (FOMAML, Nichol et al. 2018). Batch norm follows the paper: each task is
    normalised with the statistics of its own batch, at training and at test time (build the
    backbone with ``track_running_stats=False``); nothing is shared across tasks.

    Research variants override :meth:`adapt`, :meth:`inner_loss` or :meth:`outer_loss`.

    Args:
        backbone: the network, ending in a head with one output per way (or the regression output).
        inner_lr: step size of the inner SGD steps (alpha in the paper).
        inner_steps: inner steps during training.
        inner_steps_eval: inner steps during validation and test (the paper uses more than in training).
        first_order: drop second-order terms (FOMAML).
        channels_last: feed image batches in channels-last memory format.
        optimizer: outer optimizer factory (Adam, lr 1e-3 by default).
        lr_scheduler: optional outer scheduler factory.
    """

    needs_grad_in_eval = True

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        first_order: bool = False,
        channels_last: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        for name, value in (("inner_steps", inner_steps), ("inner_steps_eval", inner_steps_eval)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        super().__init__(backbone, optimizer, lr_scheduler)
        self.inner_lr, self.inner_steps, self.inner_steps_eval = inner_lr, inner_steps, inner_steps_eval
        self.first_order, self.channels_last = first_order, channels_last

    # ------------------------------------------------------------------ overridable pieces
    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        """Run the backbone with ``params`` in place of its own parameters."""
        return functional_call(self.backbone, params, (x,))

    def inner_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss on the support set that the inner loop descends (one task)."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    def outer_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss of the adapted model on the query set (one task); the meta-objective."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, params: Params | None = None, steps: int | None = None
    ) -> Params:
        """Take ``steps`` SGD steps on one task's support set; differentiable unless first order or evaluating."""
        if params is None:
            params = dict(self.backbone.named_parameters())
        if steps is None:
            steps = self.inner_steps if self.training else self.inner_steps_eval
        create_graph = self.training and not self.first_order
        with torch.enable_grad():
            for _ in range(steps):
                loss = self.inner_loss(self.forward_with(params, support_x), support_y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
                params = {
                    name: p if g is None else p - self.inner_lr * g
                    for (name, p), g in zip(params.items(), grads, strict=True)
                }
        return params

    # ------------------------------------------------------------------ EpisodicModule
    def episode_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        support_x, query_x = batch.support_x, batch.query_x
        if self.channels_last:
            support_x, query_x = to_channels_last(support_x), to_channels_last(query_x)
        losses, predictions = [], []
        for t in range(batch.num_tasks):
            params = self.adapt(support_x[t], batch.support_y[t])
            prediction = self.forward_with(params, query_x[t])
            losses.append(self.outer_loss(prediction, batch.query_y[t]))
            predictions.append(prediction)
        return torch.stack(losses), torch.stack(predictions)

    def setup(self, stage: str) -> None:
        """Check that the backbone's head has one output per way of the datamodule's episodes."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or getattr(datamodule, "task", "classification") != "classification":
            return
        heads = [m for m in self.backbone.modules() if isinstance(m, nn.Linear)]
        if not heads:
            return
        outputs = heads[-1].out_features
        for split in ("train", "val", "test"):
            ways = datamodule.episode_shape(split)[0]
            if ways != outputs:
                raise ValueError(
                    f"{type(self).__name__}'s backbone ends in {outputs} outputs but the '{split}' episodes are "
                    f"{ways}-way; set the backbone's out_features to {ways} (or the datamodule's ways to {outputs})"
                )
