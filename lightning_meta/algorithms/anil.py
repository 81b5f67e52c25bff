"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio and Vinyals 2020, "Rapid Learning or Feature Reuse?")."""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch

from ..arguments import check_choice
from ..bases.episodic import EpisodeOutput, at_least_float32, embed_episode
from ..bases.gradient import GradientModule
from ..functional import Params, forward_with, map_tasks
from ..inner_optimizers import InnerOptimizer, resolve_inner_optimizer

BodyBatching = Literal["sets", "task", "flat"]


class ANIL(GradientModule):
    """ANIL: MAML in which only the head adapts, on features that the body computes once per task.

    Raghu et al. (2020, section 4) find that MAML's inner loop barely changes the body, and that
    adapting the head alone matches it. The body then runs once per task, not at every inner
    step: support and query features are computed once (with gradients to the body in the outer
    loop), and the inner loop takes ``inner_steps`` steps of ``inner_optimizer`` on the head's
    weights only. Second order by default; ``first_order=True`` treats the inner gradients as
    constants, so the body learns from the query features alone. Meta-SGD and the other inner
    optimisers of :mod:`lightning_meta.functional` plug in through ``inner_optimizer``.

    Batch norm in the body (``body_batching``): ``"sets"`` normalises each task's support set and
    query set with their own statistics, as MAML and Raghu et al.'s code do (the same features as
    ``MAML(adapt="head")``); ``"task"`` normalises a task's support and query together, as
    learn2learn's ``anil_fc100.py``; both call the body once per task and set. ``"flat"``
    is one pass over the whole meta-batch (:func:`~lightning_meta.bases.episodic.embed_episode`), for
    bodies without batch norm or with running statistics; with per-task batch norm it would make
    a task's features depend on the other tasks of its meta-batch.

    Args:
        backbone: the body, images to ``[N, D]`` features, without a classifier of its own.
        head: the layer that adapts, e.g. ``torch.nn.Linear(backbone.embedding_dim, ways)``.
        inner_lr: step size of the default inner SGD; unused with ``inner_optimizer``. The inner loss is the
            mean cross-entropy over the N*K support images (as learn2learn's); Finn et al.'s code, whose step
            sizes Raghu et al. reuse, sums it and divides by the shots, so its step sizes are ``ways`` times
            ours (its 0.1 at 20-way is 2.0 here). Only the head adapts, so too small a step leaves the adapted
            head near its initialisation and ANIL at the accuracy of untrained features.
        inner_steps: inner steps during training.
        inner_steps_eval: inner steps during validation, test and predict.
        first_order: drop the second-order terms.
        body_batching: ``"sets"``, ``"task"`` or ``"flat"``, see above.
        task_batching: how the heads of a meta-batch adapt: ``"batched"`` (one batched matrix product
            for all tasks; an ``nn.Linear`` head), ``"loop"`` or ``"vmap"`` (any head, per task).
        channels_last: deprecated, see :class:`~lightning_meta.bases.gradient.GradientModule`.
        adaptation_curve: return the query loss along the inner loop during validation and test.
        optimizer: outer optimizer factory (Adam, lr 1e-3 by default).
        lr_scheduler: optional outer scheduler factory.
        inner_optimizer: the inner update rule (``SGD``, ``MetaSGD``, ``Momentum``, ``Adam``); default
            ``SGD(inner_lr)``.
    """

    task_batchings = ("batched", "loop", "vmap")

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None = None,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        first_order: bool = False,
        body_batching: BodyBatching = "sets",
        task_batching: Literal["batched", "loop", "vmap"] = "batched",
        channels_last: bool | None = None,
        adaptation_curve: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        inner_optimizer: InnerOptimizer | None = None,
    ) -> None:
        _check_body_and_head(backbone, head, body_batching, task_batching)
        # A new name: save_hyperparameters reads the arguments from this frame, and they must stay as given.
        rule = resolve_inner_optimizer("ANIL", inner_optimizer, inner_lr)
        super().__init__(backbone, head, rule, "head", inner_steps, inner_steps_eval, task_batching,
                         channels_last, adaptation_curve, optimizer, lr_scheduler)  # fmt: skip
        self.first_order, self.body_batching = first_order, body_batching

    @property
    def second_order(self) -> bool:
        return self.training and not self.first_order and torch.is_grad_enabled()

    def check_batchable(self) -> None:
        """Only the head runs tasks together (its ``nn.Linear`` is checked at construction), never the body."""

    def forward_with(self, params: Params, x: Tensor) -> Tensor:
        """The head with ``params`` (``head.weight``, ...) on features ``x``: ANIL's inner loop never runs the body.

        Weights with a leading task dimension (``task_batching="batched"``) apply one head per task.
        """
        weight = params["head.weight"]
        assert self.head is not None
        if weight.dim() == 2:
            return forward_with(self.head, {name.removeprefix("head."): p for name, p in params.items()}, x)
        out = x @ weight.transpose(-1, -2)
        bias = params.get("head.bias")
        return out if bias is None else out + bias.unsqueeze(-2)

    # ------------------------------------------------------------------ the body, once per task
    def embed(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Support and query features, ``[B, N*K, D]`` and ``[B, N*Q, D]``, at least float32 (see ``body_batching``)."""
        if self.body_batching == "flat":
            return embed_episode(self.backbone, batch)
        if self.body_batching == "task":
            z = self._per_task(torch.cat([batch.support_x, batch.query_x], dim=1))
            shots_total = batch.support_x.shape[1]
            return z[:, :shots_total], z[:, shots_total:]
        return self._per_task(batch.support_x), self._per_task(batch.query_x)

    def _per_task(self, x: Tensor) -> Tensor:
        # One call per task keeps batch norm's statistics per task with the fused kernel; on CPU this was
        # 3x faster than one torch.func.vmap call over the tasks (whose batch norm cannot use it).
        return at_least_float32(torch.stack([self.backbone(task) for task in x]))

    # ------------------------------------------------------------------ the head's inner loop
    def run_tasks(self, batch: EpisodeBatch, mode: str, curve: bool) -> EpisodeOutput:
        support, query = self.embed(batch)
        task = partial(self.task_loss, curve=curve)
        inputs = (support, batch.support_y, query, batch.query_y)
        loss, predictions, curves = map_tasks(task, inputs, self.task_runner(mode))
        return EpisodeOutput(loss, predictions, self.curve(curves))


def _check_body_and_head(backbone: nn.Module, head: nn.Module | None, body_batching: str, task_batching: str) -> None:
    dim = getattr(backbone, "embedding_dim", None)
    example = (
        f"torch.nn.Linear(in_features={dim if isinstance(dim, int) else 'backbone.embedding_dim'}, out_features=ways)"
    )
    if head is None:
        raise ValueError(
            f"ANIL: head=None, but ANIL adapts an explicit head on the backbone's features; give head={example} "
            "(in YAML: head: {class_path: torch.nn.Linear, init_args: {in_features: ..., out_features: ...}})"
        )
    if not isinstance(head, nn.Module) or not any(p.requires_grad for p in head.parameters()):
        raise ValueError(f"ANIL: head={head!r} has no trainable parameters to adapt; give head={example}")
    if isinstance(getattr(backbone, "head", None), nn.Module):
        raise ValueError(
            "ANIL: the backbone has a classifier of its own (backbone.head), but ANIL's body must return features; "
            "remove the backbone's out_features and give the classifier as head"
        )
    in_features = getattr(head, "in_features", None)
    if isinstance(dim, int) and isinstance(in_features, int) and dim != in_features:
        raise ValueError(
            f"ANIL: head.in_features={in_features} but the backbone's embedding_dim is {dim}; set the head's "
            f"in_features to {dim}"
        )
    check_choice("ANIL", "body_batching", body_batching, BodyBatching)
    if task_batching == "batched" and type(head) is not nn.Linear:
        raise ValueError(
            f"ANIL: task_batching='batched' adapts an nn.Linear head, but the head is {type(head).__name__}; "
            "set task_batching='loop' or 'vmap'"
        )
