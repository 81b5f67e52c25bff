"""Model-Agnostic Meta-Learning (Finn, Abbeel and Levine 2017), first-order MAML and Meta-SGD."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from datamodules.episodes import EpisodeBatch

from ..backbones import to_channels_last, vmap_safe_batch_norm
from ..base import EpisodicModule

Params = dict[str, Tensor]


class MAML(EpisodicModule):
    """MAML: learn an initialisation from which a few gradient steps on the support set fit the task.

    The inner loop is functional (``torch.func.grad`` of ``torch.func.functional_call``), so the
    meta-gradient flows through the adapted weights (second order), or, with ``first_order=True``,
    treats the inner gradients as constants (FOMAML, Nichol et al. 2018). ``learn_inner_lr`` learns
    the step sizes with the initialisation (Meta-SGD, Li et al. 2017): one per parameter tensor
    (``True`` or ``"tensor"``) or one per element (``"element"``).

    The tasks of a meta-batch run one after another (``task_batching="loop"``: during training each
    task's graph is freed as soon as its meta-gradient is taken, so memory does not grow with the
    meta-batch) or together under ``torch.func.vmap`` (``"vmap"``). Both give the same gradients.
    ``"auto"`` times both on the first batch and keeps the faster (on a 2-core CPU the loop wins for
    Conv4 on Omniglot and vmap for the sinusoid MLP; see ``benchmarks/RESULTS.md``).

    Batch norm follows the paper: every task is normalised with the statistics of its own batch,
    during training and evaluation, and nothing is shared across tasks. Build image backbones with
    ``Conv4(track_running_stats=False)``.

    Research variants override :meth:`adapt`, :meth:`inner_loss` or :meth:`outer_loss` (ANIL, for
    instance, is ``adapt`` restricted to the head's parameters).

    With ``adaptation_curve``, validation and test also log the query loss after each inner step,
    ``val_adapt/loss_step_<k>`` (one extra query forward per step, without gradients).

    Args:
        backbone: the network, ending in one output per way (or the regression output).
        inner_lr: step size of the inner SGD steps (alpha), or the initial value when learned.
        inner_steps: inner steps during training.
        inner_steps_eval: inner steps during validation and test (the paper uses more than in training).
        first_order: drop second-order terms (FOMAML).
        learn_inner_lr: Meta-SGD step sizes: False, True/"tensor" or "element".
        task_batching: "auto", "loop" or "vmap", see above.
        channels_last: channels-last memory format for the backbone's weights and the image batches (see
            :attr:`EpisodicModule.channels_last`). Off by default here: channels-last kernels round
            differently with the thread count and the inner loop amplifies it, so DDP and single-process
            test accuracy differed; the speed gain was small (benchmarks/RESULTS.md).
        adaptation_curve: log the query loss after each inner step during validation and test.
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
        learn_inner_lr: bool | Literal["tensor", "element"] = False,
        task_batching: Literal["auto", "loop", "vmap"] = "auto",
        channels_last: bool = False,
        adaptation_curve: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        for name, value in (("inner_steps", inner_steps), ("inner_steps_eval", inner_steps_eval)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if learn_inner_lr not in (False, True, "tensor", "element"):
            raise ValueError(f"learn_inner_lr={learn_inner_lr!r} must be False, True, 'tensor' or 'element'")
        if task_batching not in ("auto", "loop", "vmap"):
            raise ValueError(f"task_batching={task_batching!r} must be 'auto', 'loop' or 'vmap'")
        super().__init__(backbone, optimizer, lr_scheduler)
        self.inner_lr, self.inner_steps, self.inner_steps_eval = inner_lr, inner_steps, inner_steps_eval
        self.first_order, self.task_batching, self.channels_last = first_order, task_batching, channels_last
        self.adaptation_curve = adaptation_curve
        self._vmapping = False
        self._chosen_batching: dict[bool, str] = {}
        self.inner_lrs: nn.ParameterDict | None = None
        if learn_inner_lr:
            per_element = learn_inner_lr == "element"
            self.inner_lrs = nn.ParameterDict(
                {
                    name.replace(".", "/"): nn.Parameter(torch.full(p.shape if per_element else (), inner_lr))
                    for name, p in backbone.named_parameters()
                }
            )

    # ------------------------------------------------------------------ overridable pieces
    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        """Run the backbone with ``params`` in place of (some of) its own parameters."""
        return functional_call(self.backbone, params, (x,))

    def inner_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss on the support set that the inner loop descends (one task)."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    def outer_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss of the adapted model on the query set (one task); the meta-objective."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    def step_size(self, name: str) -> Tensor | float:
        """The inner step size of parameter ``name`` (learned with Meta-SGD)."""
        return self.inner_lr if self.inner_lrs is None else self.inner_lrs[name.replace(".", "/")]

    def adapt(
        self, support_x: Tensor, support_y: Tensor, params: Params | None = None, steps: int | None = None
    ) -> Params:
        """Take ``steps`` SGD steps on one task's support set and return the adapted parameters.

        Differentiable with respect to ``params`` (second order) while training unless
        ``first_order``; uses ``torch.autograd.grad`` per task and ``torch.func.grad`` under vmap.
        ``params`` defaults to all the backbone's parameters; passing a subset adapts only those.
        """
        if params is None:
            params = dict(self.backbone.named_parameters())
        if steps is None:
            steps = self.inner_steps if self.training else self.inner_steps_eval
        second_order = self.training and not self.first_order and torch.is_grad_enabled()
        with torch.enable_grad():  # evaluation adapts too, inside Lightning's no_grad
            for step in range(steps):
                self.on_inner_step(step, steps, params)
                grads = self._inner_gradients(params, support_x, support_y, second_order)
                params = {name: p - self.step_size(name) * grads[name] for name, p in params.items()}
        self.on_inner_step(steps, steps, params)
        return params

    def _inner_gradients(self, params: Params, support_x: Tensor, support_y: Tensor, second_order: bool) -> Params:
        def support_loss(p: Params) -> Tensor:
            return self.inner_loss(self.forward_with(p, support_x), support_y)

        if self._vmapping:  # autograd.grad does not work under vmap; torch.func.grad does
            if second_order:
                return grad(support_loss)(params)
            # Outside no_grad, the outer autograd would also record this gradient's graph.
            with torch.no_grad():
                return grad(support_loss)(params)
        # Per task, autograd.grad has far less Python overhead than torch.func.grad.
        values = list(params.values())
        found = torch.autograd.grad(support_loss(params), values, create_graph=second_order, allow_unused=True)
        return {
            name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), found, strict=True)
        }

    # ------------------------------------------------------------------ task batching
    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Adapt on one task's support set; return its query loss and query predictions."""
        prediction = self.forward_with(self.adapt(support_x, support_y), query_x)
        return self.outer_loss(prediction, query_y), prediction

    def _task_loss_and_curve(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`task_loss` and the task's query losses along the inner loop (evaluation only)."""
        with self.inner_step_losses(lambda p: self.outer_loss(self.forward_with(p, query_x), query_y)) as curve:
            loss, prediction = self.task_loss(support_x, support_y, query_x, query_y)
        return loss, prediction, curve.finish(loss)

    def episode_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        if self.channels_last:
            batch = batch._replace(support_x=to_channels_last(batch.support_x), query_x=to_channels_last(batch.query_x))
        mode: str = self.task_batching
        if mode == "auto":  # timed separately for training and evaluation, which differ in cost
            if self.training not in self._chosen_batching:
                self._chosen_batching[self.training] = self._time_task_batching(batch)
            mode = self._chosen_batching[self.training]
        return self._vmap_tasks(batch) if mode == "vmap" else self._loop_tasks(batch)

    def _vmap_tasks(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        self._vmapping = True
        try:
            with vmap_safe_batch_norm():
                loss, prediction, *curve = vmap(self._task_fn())(*batch)
        finally:
            self._vmapping = False
        if curve:
            self.record_adaptation_curve(curve[0])
        return loss, prediction

    def _task_fn(self) -> Callable[..., tuple[Tensor, ...]]:
        return self._task_loss_and_curve if self.recording_adaptation_curve() else self.task_loss

    def _loop_tasks(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        meta_params = [p for p in self.parameters() if p.requires_grad]
        # While training, take each task's meta-gradient at once and free its graph (learn2learn's
        # per-task backward), so memory holds one task; Lightning's backward then applies the sum.
        per_task_backward = self.training and torch.is_grad_enabled() and bool(meta_params)
        scale = self._loss_scale() if per_task_backward else 1.0
        summed: list[Tensor | None] = [None] * len(meta_params)
        losses, predictions, curves = [], [], []
        task = self._task_fn()
        for t in range(batch.num_tasks):
            loss, prediction, *curve = task(*(part[t] for part in batch))
            curves += curve
            if per_task_backward:
                grads = torch.autograd.grad(loss * scale, meta_params, allow_unused=True)
                summed = [s if g is None else g if s is None else s.add_(g) for s, g in zip(summed, grads, strict=True)]
                loss = loss.detach()
            losses.append(loss)
            predictions.append(prediction.detach())
        stacked = torch.stack(losses)
        if curves:
            self.record_adaptation_curve(torch.stack(curves))
        if per_task_backward:
            stacked = stacked + _gradient_stand_in(meta_params, summed, scale * batch.num_tasks)
        return stacked, torch.stack(predictions)

    def _loss_scale(self) -> float:
        """The AMP loss scale under ``precision="16-mixed"`` (else 1): per-task fp16 gradients must not underflow."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _time_task_batching(self, batch: EpisodeBatch) -> str:
        """Time a step (with its meta-gradient when training) both ways on ``batch``; return the faster.

        Which is faster depends on the device and the model: on this project's CPU the loop wins for
        Conv4 and vmap for the sinusoid MLP. Results are identical, so only speed is at stake; a
        backbone that vmap cannot run (or that runs out of memory) gets the loop.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        times: dict[str, float] = {}
        for mode, run in (("loop", self._loop_tasks), ("vmap", self._vmap_tasks)):
            try:
                for _ in range(2):  # the first call warms up
                    start = time.perf_counter()
                    loss = run(batch)[0].mean()
                    if self.training and torch.is_grad_enabled() and loss.requires_grad:
                        torch.autograd.grad(loss, params, allow_unused=True)
                    if loss.device.type == "cuda":
                        torch.cuda.synchronize(loss.device)
                    times[mode] = time.perf_counter() - start
            except (RuntimeError, torch.OutOfMemoryError) as err:  # vmap cannot batch this backbone
                rank_zero_info(f"{type(self).__name__}: task_batching='vmap' unavailable ({err}); using the loop")
                return "loop"
        choice = min(times, key=times.__getitem__)
        phase = "training" if self.training else "evaluation"
        rank_zero_info(
            f"{type(self).__name__}: task_batching='auto' chose '{choice}' for {phase} "
            f"(loop {1000 * times['loop']:.1f} ms, vmap {1000 * times['vmap']:.1f} ms per meta-batch)"
        )
        return choice

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


def _gradient_stand_in(params: Sequence[Tensor], grads: Sequence[Tensor | None], divisor: float) -> Tensor:
    """A zero whose gradient with respect to ``params`` is ``grads / divisor``.

    Added to every task's (detached) loss, the mean over tasks that Lightning differentiates has the
    mean meta-gradient, while the Trainer still runs its one backward (AMP, DDP, clipping).
    """
    total = sum((p * (g / divisor)).sum() for p, g in zip(params, grads, strict=True) if g is not None)
    if not isinstance(total, Tensor):  # no parameter influenced the losses
        return torch.zeros(())
    return total - total.detach()
