"""Model-Agnostic Meta-Learning (Finn, Abbeel and Levine 2017), first-order MAML, Meta-SGD and ANIL."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.episodes import EpisodeBatch

from ..bases.episodic import EpisodeOutput
from ..bases.gradient import GradientModule
from ..functional import map_tasks
from ..inner_optimizers import InnerOptimizer, MetaSGD, resolve_inner_optimizer


class MAML(GradientModule):
    """MAML: learn an initialisation from which a few gradient steps on the support set fit the task.

    The inner loop is functional (:func:`lightning_meta.functional.inner_loop`), so the
    meta-gradient flows through the adapted weights (second order), or, with ``first_order=True``,
    treats the inner gradients as constants (FOMAML, Nichol et al. 2018). ``learn_inner_lr`` learns
    the step sizes with the initialisation (Meta-SGD, Li et al. 2017): one per parameter tensor
    (``True`` or ``"tensor"``) or one per element (``"element"``). Any other inner optimiser
    (``inner_optimizer``, e.g. ``lightning_meta.functional.Momentum``) replaces plain SGD.
    ``adapt="head"`` adapts only the head, which is ANIL (Raghu et al. 2020).

    The tasks of a meta-batch run one after another (``task_batching="loop"``: during training each
    task's graph is freed as soon as its meta-gradient is taken, so memory does not grow with the
    meta-batch), together under ``torch.func.vmap`` (``"vmap"``), or together through task-batched
    layers (``"batched"``: each convolution, linear layer and batch norm of the meta-batch is one
    large kernel with per-task weights, :mod:`lightning_meta.task_batched`; ``tasks_per_chunk``
    bounds the tasks held at once). All give the same gradients. ``"auto"`` times them on the first
    batch of training and of evaluation, keeps the fastest and logs its choice
    (``benchmarks/RESULTS.md`` has the measurements).

    Batch norm follows the paper: every task is normalised with the statistics of its own batch,
    during training and evaluation, and nothing is shared across tasks. Build image backbones with
    ``Conv4(track_running_stats=False)``.

    Research variants override :meth:`adapt_params`, :meth:`inner_loss`, :meth:`outer_loss` or
    :meth:`task_loss`.

    With ``adaptation_curve``, validation and test also return the query loss after the inner steps
    (:class:`~lightning_meta.bases.episodic.AdaptationCurve`, logged as ``val_adapt/loss_step_<k>``; one extra
    query forward per measured step, without gradients).

    Args:
        backbone: the network, ending in one output per way (or the regression output) unless
            ``head`` is given.
        inner_lr: step size of the inner SGD steps (alpha), or the initial value when learned;
            unused with ``inner_optimizer``.
        inner_steps: inner steps during training.
        inner_steps_eval: inner steps during validation and test (the paper uses more than in training).
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: Meta-SGD step sizes: False, True/"tensor" or "element".
        task_batching: "auto", "loop", "vmap" or "batched", see above.
        channels_last: deprecated, see :class:`~lightning_meta.bases.gradient.GradientModule`.
        adaptation_curve: return the query loss along the inner loop during validation and test.
        optimizer: outer optimizer factory (Adam, lr 1e-3 by default).
        lr_scheduler: optional outer scheduler factory.
        head: an explicit head after the backbone's embedding (the network is backbone then head).
        adapt: the parameters that adapt: "all", "head" (ANIL), or name prefixes / regular expressions.
        inner_optimizer: the inner update rule (:mod:`lightning_meta.functional`: ``SGD``, ``MetaSGD``,
            ``Momentum``, ``Adam``); default ``SGD(inner_lr)``, or ``MetaSGD(inner_lr)`` with
            ``learn_inner_lr``.
        tasks_per_chunk: with ``task_batching="batched"``, at most this many tasks run together (each
            chunk's meta-gradient is taken and its graph freed before the next); default all.
    """

    task_batchings: ClassVar[tuple[str, ...]] = ("auto", "loop", "vmap", "batched")

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        first_order: bool = False,
        learn_inner_lr: bool | Literal["tensor", "element"] = False,
        task_batching: Literal["auto", "loop", "vmap", "batched"] = "auto",
        channels_last: bool | None = None,
        adaptation_curve: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        head: nn.Module | None = None,
        adapt: str | list[str] = "all",
        inner_optimizer: InnerOptimizer | None = None,
        tasks_per_chunk: int | None = None,
    ) -> None:
        if tasks_per_chunk is not None and tasks_per_chunk < 1:
            raise ValueError(f"tasks_per_chunk={tasks_per_chunk} must be 1 or more, or None for all tasks at once")
        # A new name: save_hyperparameters reads the arguments from this frame, and they must stay as given.
        rule = resolve_inner_optimizer(type(self).__name__, inner_optimizer, inner_lr, learn=learn_inner_lr)
        super().__init__(backbone, head, rule, adapt, inner_steps, inner_steps_eval, task_batching,
                         channels_last, adaptation_curve, optimizer, lr_scheduler)  # fmt: skip
        self.first_order, self.tasks_per_chunk = first_order, tasks_per_chunk
        # Checkpoints from before the pluggable inner optimizers kept Meta-SGD's step sizes as `inner_lrs.*`.
        self._register_load_state_dict_pre_hook(_rename_meta_sgd_keys)

    @property
    def inner_lrs(self) -> nn.ParameterDict | None:
        """Meta-SGD's learned step sizes (keys are parameter names with ``/`` for ``.``), else None."""
        return self.inner_optimizer.lrs if isinstance(self.inner_optimizer, MetaSGD) else None

    @property
    def second_order(self) -> bool:
        return self.training and not self.first_order and torch.is_grad_enabled()

    def run_tasks(self, batch: EpisodeBatch, mode: str, curve: bool) -> EpisodeOutput:
        task = partial(self.task_loss, curve=curve)
        loss, predictions, curves = map_tasks(task, batch.tensors, self.task_runner(mode, per_task_backward=True))
        return EpisodeOutput(loss, predictions, self.curve(curves))


def _rename_meta_sgd_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    old = prefix + "inner_lrs."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "inner_optimizer.lrs." + key[len(old) :]] = state_dict.pop(key)
