"""The inner loop shared by every gradient-based method: free functions, no callbacks into modules.

Adapt any module to a task the way learn2learn's ``maml.clone().adapt(loss)`` does, from your own loop::

    from lightning_meta.functional import SGD, forward_with, inner_loop

    params = dict(net.named_parameters())
    support_loss = lambda p: F.cross_entropy(forward_with(net, p, support_x), support_y)
    adapted = inner_loop(support_loss, params, SGD(lr=0.4), steps=5, create_graph=True).params
    F.cross_entropy(forward_with(net, adapted, query_x), query_y).backward()  # second-order meta-gradient

The pieces:

- :func:`forward_with` runs a module with other parameters (``torch.func.functional_call``);
  :func:`select_params` picks the parameters that adapt (all, the head, named groups).
- :func:`gradients` is one task's gradient: ``torch.autograd.grad`` in a plain loop (the least
  Python overhead), ``torch.func.grad`` inside a ``torch.func`` transform such as ``vmap``, where
  autograd.grad cannot run. Which one is decided by the call itself (:func:`in_function_transform`),
  not by a flag.
- :func:`inner_loop` takes ``steps`` steps of an inner optimiser and can measure the adaptation
  curve along the way; it works inside ``vmap``.
- :func:`map_tasks` runs a per-task function over a meta-batch as a :class:`TaskRunner` says: one
  task after another, under ``vmap`` or task-batched, optionally taking each task's meta-gradient at
  once (learn2learn's per-task backward, with the AMP loss scale).
- The inner optimisers (:class:`SGD`, :class:`MetaSGD`, :class:`LSLR`, :class:`Momentum`,
  :class:`Adam`) live in :mod:`lightning_meta.inner_optimizers` and are re-exported here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .backbones import vmap_safe_batch_norm
from .inner_optimizers import LSLR, SGD, Adam, AdamState, InnerOptimizer, MetaSGD, Momentum, Params
from .task_batched import tasks_together

__all__ = [
    "LSLR", "SGD", "Adam", "AdamState", "InnerLoop", "InnerOptimizer", "MetaSGD", "Momentum", "Params", "TaskRunner",
    "adaptation_curve_steps", "fastest_task_batching", "forward_with", "gradient_stand_in", "gradients",
    "in_function_transform", "inner_loop", "map_tasks", "select_params", "tasks_together",
]  # fmt: skip


def adaptation_curve_steps(total: int) -> list[int]:
    """Inner steps where the adaptation curve is measured: all up to 10, else 0, the powers of 2 and ``total``."""
    if total <= 10:
        return list(range(total + 1))
    return [0, *(2**i for i in range(total.bit_length()) if 2**i < total), total]


# ---------------------------------------------------------------------- parameters
def forward_with(module: nn.Module, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """Call ``module(*args, **kwargs)`` with ``params`` in place of (some of) its own parameters."""
    return functional_call(module, params if isinstance(params, dict) else dict(params), args, kwargs)


def select_params(module: nn.Module, which: str | Sequence[str] = "all") -> Params:
    """The parameters of ``module`` that an inner loop adapts, by name.

    Args:
        module: the network.
        which: ``"all"`` (every parameter that requires grad), or one or more patterns: a name
            prefix (``"head"`` selects ``head.weight`` and ``head.bias``, the head of
            :class:`~lightning_meta.backbones.Conv4` and of the gradient-based modules) or a regular
            expression matched against the whole name (``".*bias"``).

    Raises:
        ValueError: when the patterns select no parameter.
    """
    named: Params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if which == "all":
        return named
    patterns = [which] if isinstance(which, str) else list(which)
    selected: Params = {name: p for name, p in named.items() if any(_matches(pattern, name) for pattern in patterns)}
    if not selected:
        groups = sorted({name.split(".")[0] for name in named})
        raise ValueError(
            f"adapt={which!r} selects none of the parameters of {type(module).__name__}, whose top-level "
            f"groups are {groups}; use 'all', or name prefixes or regular expressions of its parameters"
        )
    return selected


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.startswith(pattern.rstrip(".") + "."):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


# ---------------------------------------------------------------------- gradients
def in_function_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``), where ``torch.autograd.grad`` cannot run."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def gradients(loss_fn: Callable[[Params], Tensor], params: Params, create_graph: bool = False) -> Params:
    """The gradient of ``loss_fn(params)`` with respect to each of ``params`` (zero for unused ones).

    In a plain loop it uses ``torch.autograd.grad`` (parameters that do not require grad are
    differentiated as fresh leaves); inside ``vmap`` it uses ``torch.func.grad``. Gradients are
    taken even under ``torch.no_grad`` (evaluation adapts too).

    Args:
        loss_fn: the task's scalar loss as a function of the parameters.
        params: where to take the gradient.
        create_graph: keep the gradient differentiable (second-order MAML). Otherwise the result is a
            constant for any outer autograd.
    """
    if in_function_transform():
        if create_graph:
            return torch.func.grad(loss_fn)(params)
        with torch.no_grad():  # else an enclosing autograd would record the gradient's own graph
            return torch.func.grad(loss_fn)(params)
    # Per task, autograd.grad costs far less Python than torch.func.grad (0.6 vs 1.0 ms for the sine MLP).
    with torch.enable_grad():
        leaves = {name: p if p.requires_grad else p.detach().requires_grad_() for name, p in params.items()}
        found = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), create_graph=create_graph,
                                    allow_unused=True)  # fmt: skip
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), found, strict=True)}


def gradient_stand_in(params: Sequence[Tensor], grads: Sequence[Tensor | None], divisor: float) -> Tensor:
    """A zero whose gradient with respect to ``params`` is ``grads / divisor``.

    Added to every task's (detached) loss, the mean over tasks that Lightning differentiates has the
    mean meta-gradient, while the Trainer still runs its one backward (AMP, DDP, clipping).
    """
    total = sum((p * (g / divisor)).sum() for p, g in zip(params, grads, strict=True) if g is not None)
    if not isinstance(total, Tensor):  # no parameter influenced the losses
        return torch.zeros(())
    return total - total.detach()


# ---------------------------------------------------------------------- the inner loop
class InnerLoop(NamedTuple):
    """What :func:`inner_loop` returns.

    Attributes:
        params: the adapted parameters.
        state: the inner optimiser's final state.
        curve: with ``curve_loss``, ``[len(adaptation_curve_steps(steps))]`` losses (no gradient)
            after those steps, the last after all of them; else None.
        extra: with ``step_loss``, the sum of its (differentiable) terms; else None.
    """

    params: Params
    state: Any
    curve: Tensor | None
    extra: Tensor | None = None


def inner_loop(
    loss_fn: Callable[..., Tensor],
    params: Params,
    optimizer: InnerOptimizer,
    steps: int,
    *,
    create_graph: bool = False,
    state: Any = None,
    step_data: Sequence[Any] | Tensor | None = None,
    curve_loss: Callable[[Params], Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    step_loss: Callable[[Params, int], Tensor | None] | None = None,
) -> InnerLoop:
    """Adapt ``params`` with ``steps`` steps of ``optimizer`` on ``loss_fn``; works inside ``vmap``.

    The adapted parameters stay differentiable with respect to ``params`` and the optimiser's own
    parameters when these require grad (MAML: the meta-gradient flows through the updates; with
    ``create_graph`` through the inner gradients too). Detached ``params`` and a parameter-free
    optimiser (Reptile) give detached results and no graph is kept.
    Gradients are taken even under ``torch.no_grad`` (evaluation adapts).

    Per-step rates come from the optimiser, which is given the step (:class:`LSLR`); the two hooks
    let a method vary the rest by step (MAML++'s per-step batch norm and multi-step loss).

    Args:
        loss_fn: ``loss_fn(params)``, the task's support loss; with ``step_data``,
            ``loss_fn(params, step_data[k])`` at step ``k`` (mini-batches).
        params: the starting point, e.g. :func:`select_params` of the network.
        optimizer: the update rule (:class:`SGD`, :class:`Adam`, ...).
        steps: how many updates.
        create_graph: differentiate through the inner gradients (second order).
        state: the optimiser's starting state; default ``optimizer.init_state(params)``.
        step_data: per-step data for ``loss_fn`` (at least ``steps`` entries).
        curve_loss: if given, ``curve_loss(params)`` (e.g. the query loss) is measured without
            gradients at :func:`adaptation_curve_steps` ``(steps)`` and returned as ``curve``.
        on_step: ``on_step(k)`` before every forward the loop makes, with ``k`` the 0-based step it
            belongs to: step ``k``'s support loss, and the losses of parameters after ``u`` updates
            (``curve_loss``, ``step_loss``) as ``k = max(u - 1, 0)``, the step that made them.
            MAML++ picks each step's batch norm with it.
        step_loss: ``step_loss(params, u)`` after update ``u`` (1-based): a differentiable term, or
            None; the terms are summed into ``extra`` (MAML++'s multi-step loss).
    """
    # Whether anything outside wants gradients through the updates (MAML's initialisation, Meta-SGD's step sizes).
    track = torch.is_grad_enabled() and any(p.requires_grad for p in (*params.values(), *optimizer.parameters()))
    measured = set(adaptation_curve_steps(steps)) if curve_loss is not None else set()
    hook = on_step if on_step is not None else _no_hook
    if state is None:
        state = optimizer.init_state(params)
    points: list[Tensor] = []
    extra: Tensor | None = None
    for t in range(steps):
        if t in measured:
            hook(max(t - 1, 0))
            points.append(_without_grad(curve_loss, params))
        hook(t)
        support_loss = loss_fn if step_data is None else partial(_with_data, loss_fn, step_data[t])
        grads = gradients(support_loss, params, create_graph=create_graph and track)
        with torch.set_grad_enabled(track):
            params, state = optimizer.step(params, grads, state, t + 1)
        if step_loss is not None:
            hook(t)
            term = step_loss(params, t + 1)
            if term is not None:
                extra = term if extra is None else extra + term
    if curve_loss is not None:
        hook(max(steps - 1, 0))
        points.append(_without_grad(curve_loss, params))
    # Along the last dimension: a [T]-shaped loss of tasks run together gives a [T, points] curve.
    return InnerLoop(params, state, torch.stack(points, dim=-1) if points else None, extra)


def _no_hook(step: int) -> None:
    pass


def _with_data(loss_fn: Callable[..., Tensor], data: Any, params: Params) -> Tensor:
    return loss_fn(params, data)


def _without_grad(fn: Callable[[Params], Tensor] | None, params: Params) -> Tensor:
    assert fn is not None
    with torch.no_grad():
        return fn(params).detach()


# ---------------------------------------------------------------------- task batching
@dataclass(frozen=True)
class TaskRunner:
    """How :func:`map_tasks` runs the tasks of a meta-batch: one object, given to it, not a flag on a module.

    Args:
        mode: ``"loop"`` (one task after another), ``"vmap"`` (all together under
            ``torch.func.vmap``, with :func:`~lightning_meta.backbones.vmap_safe_batch_norm`) or
            ``"batched"`` (the per-task function takes ``chunk`` tasks at once, with their task
            dimension, and returns outputs with it; inside it :func:`tasks_together` says how many:
            :mod:`lightning_meta.task_batched`). They give the same results; which is faster depends
            on the model and device (:func:`fastest_task_batching`).
        backward: loop and batched: parameters to take each task's (chunk's) meta-gradient for at
            once (learn2learn's per-task backward), see :func:`map_tasks`.
        loss_scale: multiply each task's loss by this before its backward (the AMP loss scale, so
            that fp16 gradients do not underflow); it is divided out again.
        chunk: batched only: tasks per call (default all).
    """

    mode: str = "loop"
    backward: Sequence[Tensor] | None = None
    loss_scale: float = 1.0
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("loop", "vmap", "batched"):
            raise ValueError(f"mode={self.mode!r} must be 'loop', 'vmap' or 'batched'")

    @classmethod
    def for_trainer(
        cls, trainer: Any, mode: str, backward: Sequence[Tensor] | None = None,
        chunk: int | None = None,
    ) -> TaskRunner:  # fmt: skip
        """A runner whose per-task backward uses the loss scale of ``trainer``'s AMP (``precision="16-mixed"``)."""
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
        scale = float(scaler.get_scale()) if backward and scaler is not None and scaler.is_enabled() else 1.0
        return cls(mode, backward, scale, chunk)


def map_tasks(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    mode: TaskRunner | str,
    *,
    backward: Sequence[Tensor] | None = None,
    backward_scale: float = 1.0,
    chunk: int | None = None,
) -> Any:
    """Run ``fn`` on each task of a meta-batch and stack its outputs along a new leading task dimension.

    ``fn(*task_inputs)`` gets ``inputs[i][t]`` for task ``t`` and returns a tensor or a pytree of
    tensors (tuples, dicts; None entries are kept as None).

    With per-task backward (``runner.backward``), ``fn``'s first output must be the task's scalar
    loss (the chunk's ``[k]`` losses); its gradient is summed over tasks and the graph freed, so
    memory holds one task (chunk). The returned losses are detached plus a zero whose gradient is
    the mean over tasks (:func:`gradient_stand_in`), so one backward of their mean applies it; the
    other outputs are detached.

    Args:
        fn: the per-task function.
        inputs: tensors with a leading task dimension.
        mode: a :class:`TaskRunner`, or its ``mode`` alone (then ``backward``, ``backward_scale`` and
            ``chunk`` are its other fields).
        backward: with a mode name: :attr:`TaskRunner.backward`.
        backward_scale: with a mode name: :attr:`TaskRunner.loss_scale`.
        chunk: with a mode name: :attr:`TaskRunner.chunk`.
    """
    runner = mode if isinstance(mode, TaskRunner) else TaskRunner(mode, backward, backward_scale, chunk)
    tasks = inputs[0].shape[0]
    if runner.mode == "vmap":
        spec: list[tuple[pytree.TreeSpec, list[bool]]] = []

        def flat(*task_inputs: Tensor) -> list[Tensor]:
            leaves, tree = pytree.tree_flatten(fn(*task_inputs))
            spec.append((tree, [leaf is None for leaf in leaves]))
            return [leaf for leaf in leaves if leaf is not None]  # vmap returns tensors only

        with vmap_safe_batch_norm():
            found = iter(vmap(flat)(*inputs))
        tree, absent = spec[0]
        return pytree.tree_unflatten([None if none else next(found) for none in absent], tree)
    batched = runner.mode == "batched"
    params = list(runner.backward) if runner.backward else []
    summed: list[Tensor | None] = [None] * len(params)
    outputs = []
    step = (runner.chunk or tasks) if batched else 1
    for t in range(0, tasks, step):
        if batched:
            with tasks_together(min(step, tasks - t)):
                out = fn(*(x[t : t + step] for x in inputs))
        else:
            out = fn(*(x[t] for x in inputs))
        if params:
            loss, *rest = out
            grads = torch.autograd.grad(loss.sum() * runner.loss_scale, params, allow_unused=True)
            summed = [s if g is None else g if s is None else s.add_(g) for s, g in zip(summed, grads, strict=True)]
            out = (loss.detach(), *pytree.tree_map(_detach, rest))
        outputs.append(out)
    tree = pytree.tree_structure(outputs[0])
    columns = zip(*(pytree.tree_leaves(out) for out in outputs), strict=True)
    join = torch.cat if batched else torch.stack
    stacked = pytree.tree_unflatten([None if c[0] is None else join(c) for c in columns], tree)
    if params:
        loss, *rest = stacked
        stacked = (loss + gradient_stand_in(params, summed, runner.loss_scale * tasks), *rest)
    return stacked


def fastest_task_batching(
    run: Callable[[str], Tensor], modes: Sequence[str], params: Sequence[Tensor]
) -> dict[str, float]:
    """Seconds per call of ``run(mode)`` (a meta-batch's loss, with its meta-gradient for ``params``) for each mode.

    Each mode runs twice (the first warms up); the clock stops once the last result is read back,
    which waits for the device whatever it is. A mode that fails (a layer vmap or task-batched
    layers cannot run, running out of memory) is left out, except ``"loop"``, whose error is raised.
    """
    times: dict[str, float] = {}
    for mode in modes:
        try:
            for _ in range(2):
                start = time.perf_counter()
                loss = run(mode)
                last = loss
                if params and torch.is_grad_enabled() and loss.requires_grad:
                    found = [g for g in torch.autograd.grad(loss, list(params), allow_unused=True) if g is not None]
                    last = found[-1] if found else loss
                last.flatten()[:1].tolist()  # waits for the device: its work runs in order
                times[mode] = time.perf_counter() - start
        except (RuntimeError, torch.OutOfMemoryError) as err:  # TaskBatchingError is a RuntimeError
            if mode == "loop":
                raise
            times.pop(mode, None)
            rank_zero_info(f"task_batching={mode!r} unavailable ({err})")
    return times


def _detach(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()
