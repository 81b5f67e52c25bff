"""What the gradient-based algorithms (MAML, Reptile) share, on top of :mod:`lightning_meta.functional`.

The network (a backbone, then an optional explicit head), which of its parameters adapt, the inner
loop on one task, task batching (a :class:`~lightning_meta.functional.TaskRunner`: loop, vmap, batched or
timed), the adaptation curve, and the checks of the head's outputs against the episodes' ways.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch, episode_ways

from ..functional import (
    InnerLoop,
    InnerOptimizer,
    Params,
    TaskRunner,
    adaptation_curve_steps,
    fastest_task_batching,
    forward_with,
    inner_loop,
)  # fmt: skip
from ..functional import select_params as select
from ..inner_optimizers import current_lr
from ..memory_format import channels_last_argument
from ..task_batched import TaskBatched, check_task_batchable, expand_tasks, together
from .episodic import AdaptationCurve, EpisodeOutput, EpisodicModule


class BackboneHead(nn.Module):
    """The network of a module with an explicit head: ``head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class GradientModule(EpisodicModule):
    """Base of the algorithms that adapt the network's weights with gradient steps on the support set.

    Subclasses implement :meth:`run_tasks` (a meta-batch, one way of batching its tasks) and may
    override :meth:`adapt_params`, :meth:`inner_loss`, :meth:`outer_loss` and :attr:`second_order`.

    Args:
        backbone: the network's body; without ``head`` it must output the logits itself (e.g.
            ``Conv4(out_features=ways)``).
        head: an explicit head after the backbone's embedding (the network is backbone then head).
        inner_optimizer: the inner loop's update rule (:mod:`lightning_meta.functional`).
        adapt: which parameters adapt: ``"all"``, ``"head"`` (ANIL) or name prefixes / regular
            expressions (:func:`~lightning_meta.functional.select_params`).
        inner_steps: inner steps during training.
        inner_steps_eval: inner steps during validation, test and predict.
        task_batching: ``"loop"``, ``"vmap"`` or (where allowed) ``"auto"``, which times the ways on
            the first training batch and keeps the fastest. The choice is saved in checkpoints, so a
            resumed fit and a later ``test`` take the same path; evaluation is never timed (it uses
            training's choice, else ``"loop"``), so two evaluations of a checkpoint give the same numbers.
        channels_last: deprecated; channels-last weights are the Trainer's (the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback), off by default here: channels-last
            kernels round differently with the thread count and the inner loop amplifies it.
        adaptation_curve: return the query loss along the inner loop in validation and test.
        optimizer: outer optimizer factory.
        lr_scheduler: optional outer scheduler factory.
    """

    needs_grad_in_eval = True
    #: The smallest ``inner_steps`` and ``inner_steps_eval`` allowed.
    min_inner_steps: ClassVar[int] = 0
    #: With ``task_batching="batched"``, at most this many tasks run together; None for all.
    tasks_per_chunk: int | None = None
    #: The allowed values of ``task_batching``.
    task_batchings: ClassVar[tuple[str, ...]] = ("auto", "loop", "vmap")

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        inner_optimizer: InnerOptimizer,
        adapt: str | list[str],
        inner_steps: int,
        inner_steps_eval: int,
        task_batching: str,
        channels_last: bool | None,
        adaptation_curve: bool,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
    ) -> None:
        name = type(self).__name__
        for arg, value in (("inner_steps", inner_steps), ("inner_steps_eval", inner_steps_eval)):
            if value < self.min_inner_steps:
                raise ValueError(f"{name}: {arg}={value} must be >= {self.min_inner_steps}")
        if task_batching not in self.task_batchings:
            raise ValueError(f"{name}: task_batching={task_batching!r} must be one of {list(self.task_batchings)}")
        if not isinstance(inner_optimizer, InnerOptimizer):
            raise ValueError(
                f"{name}: inner_optimizer={inner_optimizer!r} must be an InnerOptimizer, e.g. "
                "lightning_meta.functional.SGD, MetaSGD, Momentum or Adam"
            )
        if inner_optimizer.persistent and task_batching in ("vmap", "batched"):
            raise ValueError(
                f"{name}: a persistent inner optimizer carries its state from task to task, so tasks run one "
                "after another; set task_batching='loop' (or 'auto'), or the optimizer's persistent=False"
            )
        super().__init__(backbone, optimizer, lr_scheduler)
        self.head = head
        self.inner_optimizer = inner_optimizer
        self.adapt_selection = adapt
        self.inner_steps, self.inner_steps_eval = inner_steps, inner_steps_eval
        self.task_batching = task_batching
        self.wants_channels_last = channels_last_argument(name, channels_last, False)
        self.adaptation_curve = adaptation_curve
        self._chosen_batching: dict[bool, str] = {}
        self._checked_shapes: set[tuple[int, ...]] = set()
        inner_optimizer.bind(select(self.network, adapt))  # also checks `adapt` now, not at the first batch
        if task_batching == "batched":
            self.check_batchable()

    # ------------------------------------------------------------------ the network and the inner loop
    @property
    def network(self) -> nn.Module:
        """The network the inner loop adapts: the backbone, or :class:`BackboneHead` with an explicit head."""
        if self.head is None:
            return self.backbone
        found = self.__dict__.get("_network")
        if not isinstance(found, BackboneHead) or found.backbone is not self.backbone or found.head is not self.head:
            # Kept outside the module tree: its parameters are the backbone's and head's, saved under their own names.
            found = self.__dict__["_network"] = BackboneHead(self.backbone, self.head)
        return found

    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        """Run the network with ``params`` in place of (some of) its own parameters.

        Given tasks together (:func:`~lightning_meta.task_batched.together`, a ``"batched"``
        :class:`~lightning_meta.functional.TaskRunner`), ``x`` is ``[T, B, ...]`` and ``params`` carry
        a leading task dimension: the ``T`` tasks run through one call
        (:class:`~lightning_meta.task_batched.TaskBatched`).
        """
        tasks = together()
        if tasks is None:
            return forward_with(self.network, params, x)
        items = x.shape[1]
        with TaskBatched(tasks):
            out = forward_with(self.network, params, x.flatten(0, 1))
        return out.view(tasks, items, *out.shape[1:])

    def task_losses(self, loss: Callable[[Tensor, Tensor], Tensor], predictions: Tensor, targets: Tensor) -> Tensor:
        """``loss(predictions, targets)`` of one task, or ``[T]`` of each when given tasks together."""
        if together() is None:
            return loss(predictions, targets)
        return torch.func.vmap(loss)(predictions, targets)

    def check_batchable(self) -> None:
        """Raise :class:`~lightning_meta.task_batched.TaskBatchingError` unless the network can run tasks together."""
        check_task_batchable(self.network, self.adapt_params())

    def task_runner(self, mode: str, per_task_backward: bool = False) -> TaskRunner:
        """How :meth:`run_tasks` runs its tasks in ``mode``: with each task's meta-gradient taken at once when asked.

        Per-task backward (learn2learn's) applies while training, in ``"loop"`` and ``"batched"``
        modes: each task's graph is freed as soon as its meta-gradient is taken, so memory holds one
        task (chunk), and Lightning's backward then applies the sum.
        """
        if mode == "batched":
            self.check_batchable()
        meta = [p for p in self.parameters() if p.requires_grad]
        backward = per_task_backward and self.training and torch.is_grad_enabled() and bool(meta) and mode != "vmap"
        return TaskRunner.for_trainer(self._trainer, mode, meta if backward else None, self.tasks_per_chunk)

    @property
    def inner_lr(self) -> float | None:
        """The inner step size now, read from :attr:`inner_optimizer` (learned ones: their mean): never stale."""
        return current_lr(self.inner_optimizer)

    def adapt_params(self) -> Params:
        """The parameters the inner loop starts from and adapts (chosen by ``adapt``)."""
        return select(self.network, self.adapt_selection)

    def inner_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss on (a mini-batch of) one task's support set that the inner loop descends."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    def outer_loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Loss of the adapted network on one task's queries (MAML's meta-objective, the adaptation curve)."""
        return self.query_loss(predictions.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)

    @property
    def second_order(self) -> bool:
        """Whether the inner loop keeps its gradients differentiable (second-order MAML)."""
        return False

    def steps(self) -> int:
        """Inner steps in the current phase: ``inner_steps`` in training, else ``inner_steps_eval``."""
        return self.inner_steps if self.training else self.inner_steps_eval

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        params: Params | None = None,
        steps: int | None = None,
        *,
        batches: Tensor | None = None,
        curve_loss: Any = None,
        on_step: Callable[[int], None] | None = None,
        step_loss: Callable[[Params, int], Tensor | None] | None = None,
    ) -> InnerLoop:
        """Adapt to one task's support set (:func:`~lightning_meta.functional.inner_loop`).

        Args:
            support_x: one task's support inputs.
            support_y: their labels (or targets).
            params: where to start; default :meth:`adapt_params`.
            steps: default :meth:`steps`.
            batches: ``[steps, size]`` support indices of each step's mini-batch; default the whole set.
            curve_loss: ``curve_loss(params)`` to measure along the way (the query loss).
            on_step: per-step hook of :func:`~lightning_meta.functional.inner_loop` (MAML++'s batch norms).
            step_loss: extra loss after each update, summed into the result's ``extra`` (MAML++'s multi-step loss).
        """
        if params is None:
            params = self.adapt_params()
            tasks = together()
            if tasks is not None:
                params = expand_tasks(params, tasks)

        def support_loss(p: Params, index: Tensor | None = None) -> Tensor:
            x, y = (support_x, support_y) if index is None else (support_x[index], support_y[index])
            # Tasks together: the sum's gradient is every task's own (they share no weights).
            return self.task_losses(self.inner_loss, self.forward_with(p, x), y).sum()

        result = inner_loop(support_loss, params, self.inner_optimizer, self.steps() if steps is None else steps,
                            create_graph=self.second_order, step_data=batches, curve_loss=curve_loss, on_step=on_step,
                            step_loss=step_loss)  # fmt: skip
        if self.training and self.inner_optimizer.persistent:
            self.inner_optimizer.keep(result.state)
        return result

    def curve(self, losses: Tensor | None) -> AdaptationCurve | None:
        """Stacked ``[B, points]`` task curves as an :class:`AdaptationCurve` (None stays None)."""
        return None if losses is None else AdaptationCurve(adaptation_curve_steps(self.steps()), losses)

    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, curve: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Adapt on one task's support set; return its query loss, query predictions and (with ``curve``) curve."""

        def query_loss(params: Params) -> Tensor:
            return self.task_losses(self.outer_loss, self.forward_with(params, query_x), query_y)

        adapted = self.adapt(support_x, support_y, curve_loss=query_loss if curve else None)
        prediction = self.forward_with(adapted.params, query_x)
        return self.task_losses(self.outer_loss, prediction, query_y), prediction, adapted.curve

    # ------------------------------------------------------------------ episodes
    def run_tasks(self, batch: EpisodeBatch, mode: str, curve: bool) -> EpisodeOutput:
        """Adapt to every task of ``batch`` and predict its queries, batching tasks by ``mode`` ("loop" or "vmap")."""
        raise NotImplementedError

    def episode_loss(self, batch: EpisodeBatch) -> EpisodeOutput:
        return self._episodes(batch, curve=not self.training and self.adaptation_curve)

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        """The query logits after adaptation, as :meth:`episode_loss` predicts them (``query_y`` is not used)."""
        return self._episodes(batch, curve=False).predictions

    def _episodes(self, batch: EpisodeBatch, curve: bool) -> EpisodeOutput:
        self.check_episode_ways(batch)
        mode = self.task_batching
        if mode == "auto":
            mode = self.auto_task_batching(batch)
        return self.run_tasks(batch, mode, curve)

    def auto_task_batching(self, batch: EpisodeBatch) -> str:
        """The path ``task_batching="auto"`` takes: timed once, on the first training batch, then kept.

        Paths agree only up to rounding, so a choice made by timing would make results depend on the
        machine's load. Evaluation is therefore never timed: it takes training's choice (this run's,
        or the one saved in the checkpoint), else ``"loop"``.
        """
        if self.inner_optimizer.persistent:
            return "loop"
        if self.training and True not in self._chosen_batching:
            self._chosen_batching[True] = self._time_task_batching(batch)
        return self._chosen_batching.get(True, "loop")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if True in self._chosen_batching:
            checkpoint["lightning_meta"]["task_batching"] = self._chosen_batching[True]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        chosen = checkpoint.get("lightning_meta", {}).get("task_batching")
        if chosen in self.task_batchings and chosen != "auto":
            self._chosen_batching[True] = chosen

    def _time_task_batching(self, batch: EpisodeBatch) -> str:
        """Time a step (with its meta-gradient when training) in each mode on ``batch``; return the fastest.

        Which is faster depends on the device and the model (``benchmarks/RESULTS.md``). Results are
        identical, so only speed is at stake (:func:`~lightning_meta.functional.fastest_task_batching`).
        """
        params = [p for p in self.parameters() if p.requires_grad] if self.training else []
        modes = [m for m in ("loop", "vmap", "batched") if m in self.task_batchings]
        name, phase = type(self).__name__, "training" if self.training else "evaluation"
        rank_zero_info(f"{name}: task_batching='auto' is timing {', '.join(modes)} for {phase} ...")
        times = fastest_task_batching(lambda mode: self.run_tasks(batch, mode, curve=False).loss.mean(), modes, params)
        choice = min(times, key=times.__getitem__)
        timed = ", ".join(f"{mode} {1000 * seconds:.1f} ms" for mode, seconds in times.items())
        rank_zero_info(f"{name}: task_batching='auto' chose {choice!r} for {phase} ({timed} per meta-batch)")
        return choice

    # ------------------------------------------------------------------ checks of the head against the episodes
    @property
    def headless(self) -> bool:
        """True when the network ends in the backbone's embedding: no explicit head and none in the backbone."""
        if self.head is not None or isinstance(getattr(self.backbone, "head", None), nn.Module):
            return False
        return getattr(self.backbone, "out_features", None) is None and isinstance(
            getattr(self.backbone, "embedding_dim", None), int
        )

    @property
    def head_outputs(self) -> int | None:
        """The network's number of outputs, or None when it cannot tell (then nothing is checked).

        The explicit head's ``out_features``, else the backbone's ``head.out_features`` or
        ``out_features``, else, for a headless backbone (ProtoNet's Conv4), its ``embedding_dim``.
        """
        holder = self.head if self.head is not None else getattr(self.backbone, "head", None)
        found = getattr(holder, "out_features", None) if isinstance(holder, nn.Module) else None
        if found is None and self.head is None:
            found = getattr(self.backbone, "out_features", None)
        if found is None and self.headless:
            found = self.backbone.embedding_dim
        return found if isinstance(found, int) else None

    def _mismatch(self, outputs: int, ways: int, episodes: str, fix: str) -> ValueError:
        name = type(self).__name__
        if self.headless:
            backbone = type(self.backbone).__name__
            return ValueError(
                f"{name}'s network has no head: {backbone} ends in its {outputs}-d embedding, which {name} would "
                f"read as {outputs} class scores, but {episodes} are {ways}-way; give the backbone a head with "
                f"--model.backbone.init_args.out_features {ways} (a config written for ProtoNet or MatchingNet has "
                f"none: start from configs/{name.lower()}/), or pass an explicit head"
            )
        where = "head.out_features" if self.head is not None else "backbone.out_features"
        return ValueError(
            f"{name}'s head has {outputs} outputs but {episodes} are {ways}-way; set the head's "
            f"out_features ({where}) to {ways} {fix}"
        )

    def check_episode_ways(self, batch: EpisodeBatch) -> None:
        """Raise ValueError when a classification batch has other ways than the head has outputs.

        During training it is done once per batch shape; in evaluation and predict, where the inner
        loop costs far more, on every batch (a batch built by hand without ``ways`` reads its labels).
        """
        outputs = self.head_outputs
        if outputs is None or batch.support_y.is_floating_point() or batch.support_y.numel() == 0:
            return
        if self.training:
            shape = tuple(batch.support_y.shape)
            if shape in self._checked_shapes:
                return
            self._checked_shapes.add(shape)
        ways = episode_ways(batch)
        if ways != outputs:
            raise self._mismatch(outputs, ways, "these episodes", f"or use a model trained for {ways} ways")
