"""MAML++ (Antoniou, Edwards and Storkey 2019, "How to train your MAML"): MAML with five stabilising switches."""

from __future__ import annotations

import itertools
import re
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..arguments import check_whole
from ..backbones import TaskBatchNorm2d
from ..bases.gradient import BackboneHead
from ..functional import Params
from ..functional import select_params as select
from ..inner_optimizers import InnerOptimizer, resolve_inner_optimizer
from .maml import MAML


def per_step_loss_weights(steps: int, msl_epochs: int, epoch: int) -> list[float]:
    """The multi-step loss's importance of each inner step's query loss at ``epoch`` (they sum to 1).

    Uniform at epoch 0; every epoch each non-final weight loses ``1 / steps / msl_epochs`` (down to
    ``0.03 / steps``) and the final one gains what they lose, as ``get_per_step_loss_importance_vector``
    in Antoniou et al.'s code (section 4, "Multi-Step Loss Optimization").
    """
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


class PerStepBatchNorm2d(nn.Module):
    """Batch norm with a weight, a bias and running statistics for each inner step (BNWB + BNRS, section 4).

    ``step`` (set by :class:`MAMLPlusPlus` before each forward) selects the row; steps beyond the
    last row reuse it. As in the authors' code, every batch is normalised with its own statistics
    (MAML's transductive batch norm) and the running statistics of the current step are collected
    during training only (their code restores them after evaluation; it never normalises with them).

    Args:
        num_features: channels.
        steps: inner steps (rows).
        eps: added to the variance.
        momentum: of the running statistics.
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, steps: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"PerStepBatchNorm2d: steps={steps} must be >= 1 (one row per inner step)")
        self.num_features, self.steps, self.eps, self.momentum = num_features, steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(steps, num_features))
        self.bias = nn.Parameter(torch.zeros(steps, num_features))
        self.register_buffer("running_mean", torch.zeros(steps, num_features))
        self.register_buffer("running_var", torch.ones(steps, num_features))
        self.step = 0

    def forward(self, x: Tensor) -> Tensor:
        k = min(self.step, self.steps - 1)
        # Row views: F.batch_norm updates the statistics of step k in place.
        mean, var = (self.running_mean[k], self.running_var[k]) if self.training else (None, None)
        return F.batch_norm(x, mean, var, self.weight[k], self.bias[k], True, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, steps={self.steps}, eps={self.eps}, momentum={self.momentum}"


def per_step_batch_norm(module: nn.Module, steps: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` and :class:`~lightning_meta.TaskBatchNorm2d` by a :class:`PerStepBatchNorm2d`.

    Each step's weight and bias start as the old ones. Modifies ``module`` in place and returns it
    (or the replacement, when ``module`` itself is a batch norm); existing per-step norms are kept.
    """
    if isinstance(module, PerStepBatchNorm2d):
        if module.steps != steps:
            raise ValueError(f"the backbone's PerStepBatchNorm2d has steps={module.steps}; MAML++ needs {steps}")
        return module
    if type(module) in (nn.BatchNorm2d, TaskBatchNorm2d):
        assert isinstance(module, nn.BatchNorm2d | TaskBatchNorm2d)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        channels = module.num_features if isinstance(module, nn.BatchNorm2d) else module.weight.numel()
        new = PerStepBatchNorm2d(channels, steps, eps=float(module.eps))
        with torch.no_grad():
            if weight is not None and bias is not None:
                new.weight.copy_(weight.detach().expand(steps, -1))
                new.bias.copy_(bias.detach().expand(steps, -1))
        found = next(itertools.chain(module.parameters(), module.buffers()), None)
        return new if found is None else new.to(device=found.device, dtype=found.dtype)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(
            f"per_step_batch_norm cannot convert {type(module).__qualname__}, a batch norm with its own forward; "
            "build the backbone with nn.BatchNorm2d or TaskBatchNorm2d, or set per_step_bn=False"
        )
    for name, child in list(module.named_children()):
        setattr(module, name, per_step_batch_norm(child, steps))
    return module


class MAMLPlusPlus(MAML):
    """MAML++ (Antoniou, Edwards and Storkey 2019, "How to train your MAML", section 4): MAML with five switches.

    - ``multi_step_loss`` (MSL): the outer loss is the weighted sum of the query loss after every
      inner step, the weights annealed over ``msl_epochs`` from uniform towards the last step
      (:func:`per_step_loss_weights`); from epoch ``msl_epochs`` on, the last step's loss alone.
    - ``per_step_bn`` (BNRS + BNWB): every batch norm of the network becomes a
      :class:`PerStepBatchNorm2d`, with its own weight, bias and running statistics per inner step.
      They are learned by the outer loop only, not adapted in the inner loop (their
      ``enable_inner_loop_optimizable_bn_params: false``). Tasks then run one after another
      (``task_batching="auto"`` means the loop; the in-place statistics cannot run under vmap).
    - ``learn_inner_lr_per_step`` (LSLR): the inner optimiser is :class:`LSLR`, one learned rate per
      parameter tensor and per step, starting at ``inner_lr``.
    - ``first_order_epochs`` (DA, derivative-order annealing): first order during the first
      epochs (50 in the paper's text; the released configs train second order from the start, 0).
    - cosine annealing of the outer learning rate (CA) is the configs' ``lr_scheduler``
      (``CosineAnnealingLR``, ``T_max`` the epochs, ``eta_min`` 1e-5 as in their code).

    With every switch off it is MAML, to the bit: the same inner loop
    (:func:`~lightning_meta.functional.inner_loop`), whose per-step hooks give MSL the differentiable
    query loss after each step and the per-step norms the step index before each forward.

    Args:
        backbone: the network, ending in one output per way unless ``head`` is given (batch norms are
            converted in place with ``per_step_bn``).
        inner_lr: the inner step size (the initial one with LSLR); 0.1 in the paper's Omniglot runs.
        inner_steps: inner steps in training (5 in the paper).
        inner_steps_eval: inner steps in validation and test (5 in the paper).
        first_order: first order throughout (FOMAML), whatever ``first_order_epochs``.
        multi_step_loss: MSL, see above.
        msl_epochs: epochs of MSL annealing (10 for Omniglot, 15 for mini-ImageNet in their configs).
        per_step_bn: BNRS + BNWB, see above.
        learn_inner_lr_per_step: LSLR, see above.
        first_order_epochs: DA: epochs of first-order training before second order.
        task_batching: "auto", "loop" or "vmap" (not with ``per_step_bn``), as in :class:`MAML`.
        channels_last: deprecated, as in :class:`MAML`.
        adaptation_curve: as in :class:`MAML`.
        optimizer: outer optimizer factory (Adam, lr 1e-3).
        lr_scheduler: outer scheduler factory (the configs' cosine annealing).
        head: an explicit head after the backbone's embedding.
        adapt: the parameters that adapt, as in :class:`MAML` (per-step norms never do).
        inner_optimizer: another inner update rule; only with ``learn_inner_lr_per_step=False``.
    """

    # Its own per-task inner loop (step-indexed losses and norms) is not written for tasks together.
    task_batchings = ("auto", "loop", "vmap")

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        inner_steps_eval: int = 5,
        first_order: bool = False,
        multi_step_loss: bool = True,
        msl_epochs: int = 10,
        per_step_bn: bool = True,
        learn_inner_lr_per_step: bool = True,
        first_order_epochs: int = 50,
        task_batching: Literal["auto", "loop", "vmap"] = "auto",
        channels_last: bool | None = None,
        adaptation_curve: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        head: nn.Module | None = None,
        adapt: str | list[str] = "all",
        inner_optimizer: InnerOptimizer | None = None,
    ) -> None:
        check_whole("MAMLPlusPlus", 0, msl_epochs=msl_epochs, first_order_epochs=first_order_epochs)
        if (per_step_bn or learn_inner_lr_per_step) and inner_steps < 1:
            raise ValueError(
                f"MAMLPlusPlus: inner_steps={inner_steps} leaves nothing per step; set inner_steps >= 1 or "
                "per_step_bn=False and learn_inner_lr_per_step=False"
            )
        if per_step_bn and task_batching == "vmap":
            raise ValueError(
                "MAMLPlusPlus: per_step_bn=True updates per-step running statistics in place, which vmap cannot; "
                "set task_batching='loop' (or 'auto'), or per_step_bn=False"
            )
        # New names: save_hyperparameters reads the arguments from this frame, and they must stay as given.
        rule = resolve_inner_optimizer("MAMLPlusPlus", inner_optimizer, inner_lr, learn=learn_inner_lr_per_step,
                                       per_step=inner_steps, flag="learn_inner_lr_per_step")  # fmt: skip
        selection = adapt
        if per_step_bn:
            body = per_step_batch_norm(backbone, inner_steps)
            top = per_step_batch_norm(head, inner_steps) if head is not None else None
            selection = _without_norms(body if top is None else BackboneHead(body, top), adapt)
        else:
            body, top = backbone, head
        super().__init__(
            body, inner_lr=inner_lr, inner_steps=inner_steps, inner_steps_eval=inner_steps_eval,
            first_order=first_order, task_batching=task_batching, channels_last=channels_last,
            adaptation_curve=adaptation_curve, optimizer=optimizer, lr_scheduler=lr_scheduler, head=top,
            adapt=selection, inner_optimizer=rule,
        )  # fmt: skip
        self.multi_step_loss, self.msl_epochs = multi_step_loss, msl_epochs
        self.per_step_bn, self.first_order_epochs = per_step_bn, first_order_epochs
        if per_step_bn and task_batching == "auto":
            self.task_batching = "loop"

    @property
    def second_order(self) -> bool:
        """Second order once ``first_order_epochs`` epochs have passed (derivative-order annealing)."""
        return super().second_order and self.current_epoch >= self.first_order_epochs

    def step_loss_weights(self) -> list[float] | None:
        """MSL's per-step weights now, or None when only the last step's query loss counts."""
        steps = self.steps()
        if not (self.multi_step_loss and self.training and steps > 1 and self.current_epoch < self.msl_epochs):
            return None
        return per_step_loss_weights(steps, self.msl_epochs, self.current_epoch)

    def set_norm_step(self, step: int) -> None:
        """Point every :class:`PerStepBatchNorm2d` of the network at inner step ``step`` (0-based)."""
        for module in self.network.modules():
            if isinstance(module, PerStepBatchNorm2d):
                module.step = step

    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, curve: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Adapt on one task's support set; return its (multi-step) query loss, query predictions and curve.

        The shared inner loop with two per-step hooks: each step's forwards go through that step's
        norms (after update k the query goes through step k's, as in their code), and MSL adds the
        weighted query loss after every update but the last, which is weighted here.
        """
        weights = self.step_loss_weights()

        def query_loss(params: Params) -> Tensor:
            return self.outer_loss(self.forward_with(params, query_x), query_y)

        def step_loss(params: Params, updates: int) -> Tensor | None:
            return weights[updates - 1] * query_loss(params) if weights and updates < len(weights) else None

        adapted = self.adapt(support_x, support_y, curve_loss=query_loss if curve else None,
                             on_step=self.set_norm_step, step_loss=step_loss)  # fmt: skip
        self.set_norm_step(max(self.steps() - 1, 0))
        prediction = self.forward_with(adapted.params, query_x)
        loss = self.outer_loss(prediction, query_y)
        if weights:
            loss = weights[-1] * loss if adapted.extra is None else adapted.extra + weights[-1] * loss
        return loss, prediction, adapted.curve


def _without_norms(network: nn.Module, adapt: str | list[str]) -> list[str]:
    """``adapt`` as exact-name patterns, without the parameters of per-step norms (not adapted in MAML++)."""
    norms = {
        f"{prefix}.{name}" if prefix else name
        for prefix, m in network.named_modules()
        if isinstance(m, PerStepBatchNorm2d)
        for name, _ in m.named_parameters()
    }
    chosen = [re.escape(name) for name in select(network, adapt) if name not in norms]
    if not chosen:
        raise ValueError(
            f"MAMLPlusPlus: adapt={adapt!r} selects only batch-norm parameters, which per_step_bn keeps out of the "
            "inner loop; select other parameters, or set per_step_bn=False"
        )
    return chosen
