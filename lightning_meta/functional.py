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
- :func:`map_tasks` runs a per-task function over a meta-batch, one task after another or under
  ``vmap``, optionally taking each task's meta-gradient at once (learn2learn's per-task backward).
- Inner optimisers (:class:`SGD`, :class:`MetaSGD`, :class:`Momentum`, :class:`Adam`) are
  ``nn.Module`` classes with typed arguments, so YAML names them by ``class_path``, and learned
  state (Meta-SGD's step sizes) registers with the LightningModule that holds them. Their ``step``
  is out of place, so second-order MAML differentiates through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .backbones import vmap_safe_batch_norm

Params = dict[str, Tensor]


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


# ---------------------------------------------------------------------- inner optimisers
class InnerOptimizer(nn.Module):
    """Base of the inner-loop optimisers: a functional, differentiable update rule.

    ``state = opt.init_state(params)``, then ``params, state = opt.step(params, grads, state, t)``
    for ``t = 1, 2, ...``. Nothing is updated in place, so autograd (second-order MAML) and
    ``vmap`` see through a step. Optimisers with learned or persistent state are given the names and
    shapes of the parameters they will update once, by :meth:`bind` (the modules call it at
    construction, so the state is saved in checkpoints and optimised by the outer optimiser).
    """

    #: Whether :meth:`keep` carries state from one task to the next (then tasks must run in order).
    persistent: bool = False

    def bind(self, named_params: Mapping[str, Tensor]) -> None:
        """Prepare state for these parameters (names and shapes); a no-op for stateless optimisers."""

    def init_state(self, params: Params) -> Any:
        """The state before a task's first step."""
        return None

    def step(self, params: Params, grads: Params, state: Any, t: int) -> tuple[Params, Any]:
        """One update: new parameters and state. ``t`` is the 1-based step within the task."""
        raise NotImplementedError

    def keep(self, state: Any) -> None:
        """Remember a finished training task's state for the next :meth:`init_state` (persistent optimisers)."""


def _check_lr(owner: str, lr: float) -> None:
    if not (lr > 0 and math.isfinite(lr)):  # NaN fails the comparison, inf the second test
        raise ValueError(
            f"{owner}: lr={lr} must be a positive, finite step size; set MAML's or Reptile's inner_lr (or the "
            "inner_optimizer's lr) to a value above 0, or inner_steps to 0 for no adaptation"
        )


def _key(name: str) -> str:
    return name.replace(".", "/")  # module and buffer names may not contain dots


class SGD(InnerOptimizer):
    """Plain gradient descent, MAML's inner loop (Finn et al. 2017, eq. 1): ``p - lr * g``.

    Args:
        lr: the step size (alpha).
    """

    def __init__(self, lr: float = 0.4) -> None:
        super().__init__()
        _check_lr("SGD", lr)
        self.lr = lr

    def step(self, params: Params, grads: Params, state: Any, t: int) -> tuple[Params, Any]:
        return {name: p - self.lr * grads[name] for name, p in params.items()}, state

    def extra_repr(self) -> str:
        return f"lr={self.lr}"


class MetaSGD(InnerOptimizer):
    """Meta-SGD (Li et al. 2017): gradient descent with step sizes learned by the outer loop.

    ``p - lr_p * g``, with one step size per parameter tensor (``per="tensor"``) or per element
    (``per="element"``, the paper's choice), all initialised to ``lr``. The step sizes are
    ``nn.Parameter``s created by :meth:`bind`.

    Args:
        lr: initial step size.
        per: ``"tensor"`` or ``"element"``.
    """

    def __init__(self, lr: float = 0.4, per: Literal["tensor", "element"] = "tensor") -> None:
        super().__init__()
        if per not in ("tensor", "element"):
            raise ValueError(f"per={per!r} must be 'tensor' or 'element'")
        _check_lr("MetaSGD", lr)
        self.lr, self.per = lr, per
        self.lrs = nn.ParameterDict()

    def bind(self, named_params: Mapping[str, Tensor]) -> None:
        for name, p in named_params.items():
            if _key(name) not in self.lrs:
                shape = p.shape if self.per == "element" else ()
                self.lrs[_key(name)] = nn.Parameter(torch.full(shape, float(self.lr), dtype=p.dtype, device=p.device))

    def step(self, params: Params, grads: Params, state: Any, t: int) -> tuple[Params, Any]:
        missing = [name for name in params if _key(name) not in self.lrs]
        if missing:
            raise RuntimeError(f"MetaSGD has no step size for {missing}; call bind(named_params) with them first")
        return {name: p - self.lrs[_key(name)] * grads[name] for name, p in params.items()}, state

    def extra_repr(self) -> str:
        return f"lr={self.lr}, per={self.per!r}"


class Momentum(InnerOptimizer):
    """Gradient descent with (heavy-ball) momentum, in PyTorch's form: ``v = momentum * v + g; p - lr * v``.

    Args:
        lr: step size.
        momentum: decay of the velocity.
    """

    def __init__(self, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        _check_lr("Momentum", lr)
        self.lr, self.momentum = lr, momentum

    def init_state(self, params: Params) -> Params:
        return {name: torch.zeros_like(p) for name, p in params.items()}

    def step(self, params: Params, grads: Params, state: Params, t: int) -> tuple[Params, Params]:
        velocity = {name: self.momentum * state[name] + grads[name] for name in params}
        return {name: p - self.lr * velocity[name] for name, p in params.items()}, velocity

    def extra_repr(self) -> str:
        return f"lr={self.lr}, momentum={self.momentum}"


class AdamState(NamedTuple):
    """Adam's moments and the number of steps they have seen (for the bias correction)."""

    exp_avg: Params
    exp_avg_sq: Params
    step_count: int


class Adam(InnerOptimizer):
    """Adam (Kingma and Ba 2015) as Reptile's inner optimiser, with beta1 = 0 by default (Nichol et al. 2018, sec. 6).

    With ``persistent=True`` the moments and step count carry over from one training task to the
    next and across meta-iterations, as in the Reptile paper's code (which resets only the model's
    variables between tasks); tasks then run one after another. Evaluation tasks start from the
    training state and leave it unchanged (the paper's code restores it after each). The state is
    saved in checkpoints. With ``persistent=False`` every task starts from zero moments.

    Args:
        lr: step size.
        betas: decay rates of the first and second moments.
        eps: added to the denominator.
        persistent: keep the state across tasks, see above.
    """

    def __init__(
        self, lr: float = 0.001, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8, persistent: bool = False
    ) -> None:
        super().__init__()
        _check_lr("Adam", lr)
        self.lr, self.betas, self.eps, self.persistent = lr, (float(betas[0]), float(betas[1])), eps, persistent
        self.exp_avg, self.exp_avg_sq = _TensorStore(), _TensorStore()
        self.count = 0

    def bind(self, named_params: Mapping[str, Tensor]) -> None:
        if self.persistent:
            for store in (self.exp_avg, self.exp_avg_sq):
                store.add(named_params)

    def init_state(self, params: Params) -> AdamState:
        if self.persistent and all(self.exp_avg.has(name) for name in params):
            # Clones: keep() writes the buffers in place while a task's graph may still hold them.
            m, v = ({name: store.get(name).clone() for name in params} for store in (self.exp_avg, self.exp_avg_sq))
            return AdamState(m, v, self.count)
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return AdamState(zeros, dict(zeros), 0)

    def step(self, params: Params, grads: Params, state: AdamState, t: int) -> tuple[Params, AdamState]:
        beta1, beta2 = self.betas
        count = state.step_count + 1
        new_params, exp_avg, exp_avg_sq = {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            m = beta1 * state.exp_avg[name] + (1 - beta1) * g if beta1 else g
            v = beta2 * state.exp_avg_sq[name] + (1 - beta2) * g * g
            m_hat = m / (1 - beta1**count) if beta1 else m
            new_params[name] = p - self.lr * m_hat / (_sqrt(v / (1 - beta2**count)) + self.eps)
            exp_avg[name], exp_avg_sq[name] = m, v
        return new_params, AdamState(exp_avg, exp_avg_sq, count)

    def keep(self, state: AdamState) -> None:
        if not self.persistent:
            return
        with torch.no_grad():
            self.exp_avg.put(state.exp_avg)
            self.exp_avg_sq.put(state.exp_avg_sq)
        self.count = state.step_count

    def get_extra_state(self) -> dict[str, int]:
        return {"count": self.count}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.count = int(state.get("count", 0))

    def extra_repr(self) -> str:
        return f"lr={self.lr}, betas={self.betas}, eps={self.eps}, persistent={self.persistent}"


def _sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()``; differentiated, its gradient at 0 is 0 rather than inf (which made second-order Adam NaN)."""
    if not torch.is_grad_enabled():
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class _TensorStore(nn.Module):
    """Buffers keyed by parameter name: persistent optimiser state that moves with the module and is checkpointed."""

    def add(self, named: Mapping[str, Tensor]) -> None:
        for name, p in named.items():
            if not self.has(name):
                self.register_buffer(_key(name), torch.zeros_like(p, memory_format=torch.contiguous_format).detach())

    def has(self, name: str) -> bool:
        return _key(name) in self._buffers

    def get(self, name: str) -> Tensor:
        found = self._buffers[_key(name)]
        assert found is not None
        return found

    def put(self, values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            if self.has(name):
                self.get(name).copy_(value.detach())
            else:
                self.register_buffer(_key(name), value.detach().clone())


# ---------------------------------------------------------------------- the inner loop
class InnerLoop(NamedTuple):
    """What :func:`inner_loop` returns.

    Attributes:
        params: the adapted parameters.
        state: the inner optimiser's final state.
        curve: with ``curve_loss``, ``[len(adaptation_curve_steps(steps))]`` losses (no gradient)
            after those steps, the last after all of them; else None.
    """

    params: Params
    state: Any
    curve: Tensor | None


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
) -> InnerLoop:
    """Adapt ``params`` with ``steps`` steps of ``optimizer`` on ``loss_fn``; works inside ``vmap``.

    The adapted parameters stay differentiable with respect to ``params`` and the optimiser's own
    parameters when these require grad (MAML: the meta-gradient flows through the updates; with
    ``create_graph`` through the inner gradients too). Detached ``params`` and a parameter-free
    optimiser (Reptile) give detached results and no graph is kept.
    Gradients are taken even under ``torch.no_grad`` (evaluation adapts).

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
    """
    # Whether anything outside wants gradients through the updates (MAML's initialisation, Meta-SGD's step sizes).
    track = torch.is_grad_enabled() and any(p.requires_grad for p in (*params.values(), *optimizer.parameters()))
    measured = set(adaptation_curve_steps(steps)) if curve_loss is not None else set()
    if state is None:
        state = optimizer.init_state(params)
    points: list[Tensor] = []
    for t in range(steps):
        if t in measured:
            points.append(_without_grad(curve_loss, params))
        step_loss = loss_fn if step_data is None else partial(_with_data, loss_fn, step_data[t])
        grads = gradients(step_loss, params, create_graph=create_graph and track)
        with torch.set_grad_enabled(track):
            params, state = optimizer.step(params, grads, state, t + 1)
    if curve_loss is not None:
        points.append(_without_grad(curve_loss, params))
    # Along the last dimension: a [T]-shaped loss of tasks run together gives a [T, points] curve.
    return InnerLoop(params, state, torch.stack(points, dim=-1) if points else None)


def _with_data(loss_fn: Callable[..., Tensor], data: Any, params: Params) -> Tensor:
    return loss_fn(params, data)


def _without_grad(fn: Callable[[Params], Tensor] | None, params: Params) -> Tensor:
    assert fn is not None
    with torch.no_grad():
        return fn(params).detach()


# ---------------------------------------------------------------------- task batching
def map_tasks(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    mode: str,
    *,
    backward: Sequence[Tensor] | None = None,
    backward_scale: float = 1.0,
    chunk: int | None = None,
) -> Any:
    """Run ``fn`` on each task of a meta-batch and stack its outputs along a new leading task dimension.

    ``fn(*task_inputs)`` gets ``inputs[i][t]`` for task ``t`` and returns a tensor or a pytree of
    tensors (tuples, dicts; None entries are kept as None).

    Args:
        fn: the per-task function.
        inputs: tensors with a leading task dimension.
        mode: ``"loop"`` (one task after another), ``"vmap"`` (all together under
            ``torch.func.vmap``, with :func:`~lightning_meta.backbones.vmap_safe_batch_norm`) or
            ``"batched"`` (``fn`` itself takes ``chunk`` tasks at once, with their task dimension,
            and returns outputs with it: :mod:`lightning_meta.task_batched`). They give the same
            results; which is faster depends on the model and device.
        backward: loop and batched: parameters to take each task's (chunk's) meta-gradient for at
            once. ``fn``'s first output must then be the task's scalar loss (the chunk's ``[k]``
            losses); its gradient is summed over tasks and the graph freed, so memory holds one task
            (chunk): learn2learn's per-task backward. The returned losses are detached plus a zero
            whose gradient is the mean over tasks (:func:`gradient_stand_in`), so one backward of
            their mean applies it; the other outputs are detached.
        backward_scale: multiply each task's loss by this before its backward (the AMP loss scale,
            so that fp16 gradients do not underflow); it is divided out again.
        chunk: batched only: tasks per call of ``fn`` (default all).
    """
    tasks = inputs[0].shape[0]
    if mode == "vmap":
        spec: list[tuple[pytree.TreeSpec, list[bool]]] = []

        def flat(*task_inputs: Tensor) -> list[Tensor]:
            leaves, tree = pytree.tree_flatten(fn(*task_inputs))
            spec.append((tree, [leaf is None for leaf in leaves]))
            return [leaf for leaf in leaves if leaf is not None]  # vmap returns tensors only

        with vmap_safe_batch_norm():
            found = iter(vmap(flat)(*inputs))
        tree, absent = spec[0]
        return pytree.tree_unflatten([None if none else next(found) for none in absent], tree)
    if mode not in ("loop", "batched"):
        raise ValueError(f"mode={mode!r} must be 'loop', 'vmap' or 'batched'")
    params = list(backward) if backward else []
    summed: list[Tensor | None] = [None] * len(params)
    outputs = []
    step = (chunk or tasks) if mode == "batched" else 1
    for t in range(0, tasks, step):
        out = fn(*(x[t : t + step] if mode == "batched" else x[t] for x in inputs))
        if params:
            loss, *rest = out
            grads = torch.autograd.grad(loss.sum() * backward_scale, params, allow_unused=True)
            summed = [s if g is None else g if s is None else s.add_(g) for s, g in zip(summed, grads, strict=True)]
            out = (loss.detach(), *pytree.tree_map(_detach, rest))
        outputs.append(out)
    tree = pytree.tree_structure(outputs[0])
    columns = zip(*(pytree.tree_leaves(out) for out in outputs), strict=True)
    join = torch.cat if mode == "batched" else torch.stack
    stacked = pytree.tree_unflatten([None if c[0] is None else join(c) for c in columns], tree)
    if params:
        loss, *rest = stacked
        stacked = (loss + gradient_stand_in(params, summed, backward_scale * tasks), *rest)
    return stacked


def _detach(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()
