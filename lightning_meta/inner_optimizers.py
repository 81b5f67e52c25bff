"""The inner loop's update rules: one room for every inner optimiser.

An inner optimiser is an ``nn.Module`` with typed arguments, so YAML names it by ``class_path``,
and learned state (Meta-SGD's step sizes) registers with the LightningModule that holds it. Its
``step`` is out of place, so second-order MAML differentiates through it and ``vmap`` sees through
it. :func:`resolve_inner_optimizer` is where the modules turn their ``inner_lr`` shorthand into one.

- :class:`SGD`: MAML's inner loop (Finn et al. 2017).
- :class:`MetaSGD`: learned step sizes (Li et al. 2017), per tensor or element, optionally per
  step; :class:`LSLR` is its per-step, per-tensor form (MAML++, Antoniou et al. 2019).
- :class:`Momentum`: heavy-ball SGD (P>M>F's fine-tuning, Hu et al. 2022).
- :class:`Adam`: Reptile's (Nichol et al. 2018), optionally persistent across tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


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
    (``per="element"``, the paper's choice), all initialised to ``lr``. With ``steps``, each of
    the first ``steps`` inner steps has its own step sizes and later steps (a longer evaluation)
    reuse the last: MAML++'s LSLR (:class:`LSLR`). The step sizes are ``nn.Parameter``s created
    by :meth:`bind`.

    Args:
        lr: initial step size.
        per: ``"tensor"`` or ``"element"``.
        steps: inner steps with their own step sizes; None for one set shared by every step.
    """

    def __init__(self, lr: float = 0.4, per: Literal["tensor", "element"] = "tensor", steps: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if per not in ("tensor", "element"):
            raise ValueError(f"{name}: per={per!r} must be 'tensor' or 'element'")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{name}: steps={steps!r} must be >= 1 (one rate per inner step), or None")
        _check_lr(name, lr)
        self.lr, self.per, self.steps = lr, per, steps
        self.lrs = nn.ParameterDict()

    def bind(self, named_params: Mapping[str, Tensor]) -> None:
        for name, p in named_params.items():
            if _key(name) not in self.lrs:
                shape = (*(() if self.steps is None else (self.steps,)), *(p.shape if self.per == "element" else ()))
                self.lrs[_key(name)] = nn.Parameter(torch.full(shape, float(self.lr), dtype=p.dtype, device=p.device))

    def rate(self, name: str, t: int) -> Tensor:
        """The step size of parameter ``name`` at (1-based) inner step ``t``."""
        lr = self.lrs[_key(name)]
        return lr if self.steps is None else lr[min(t, self.steps) - 1]

    def step(self, params: Params, grads: Params, state: Any, t: int) -> tuple[Params, Any]:
        missing = [name for name in params if _key(name) not in self.lrs]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__} has no step size for {missing}; call bind(named_params) with them first"
            )
        return {name: p - self.rate(name, t) * grads[name] for name, p in params.items()}, state

    def extra_repr(self) -> str:
        return f"lr={self.lr}, per={self.per!r}, steps={self.steps}"


class LSLR(MetaSGD):
    """Learned per-layer per-step inner learning rates (LSLR, Antoniou et al. 2019, section 4).

    :class:`MetaSGD` with one learned rate per parameter tensor and per step, all initialised to
    ``lr`` (their ``LSLRGradientDescentLearningRule``): ``p - lr[p, t] * g`` at inner step ``t``.
    Steps beyond ``steps`` (a longer evaluation) reuse the last rate.

    Args:
        lr: initial rate.
        steps: inner steps with their own rate.
    """

    def __init__(self, lr: float = 0.1, steps: int = 5) -> None:
        super().__init__(lr, "tensor", steps)

    def extra_repr(self) -> str:
        return f"lr={self.lr}, steps={self.steps}"


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


#: The inner optimisers a module's ``inner_optimizer`` may name by a string, built with its ``inner_lr``.
BY_NAME: dict[str, Callable[[float], InnerOptimizer]] = {"sgd": SGD, "adam": Adam, "momentum": Momentum}


def resolve_inner_optimizer(
    owner: str,
    inner_optimizer: InnerOptimizer | str | None,
    inner_lr: float,
    *,
    learn: bool | Literal["tensor", "element"] = False,
    per_step: int | None = None,
    flag: str = "learn_inner_lr",
    default: str = "sgd",
) -> InnerOptimizer:
    """The inner optimiser a gradient-based module runs: ``inner_optimizer`` is the knob, ``inner_lr`` its sugar.

    The one place where a module's ``inner_lr`` (and Meta-SGD / LSLR switch) becomes an inner
    optimiser: an :class:`InnerOptimizer` is used as given; a name (``"sgd"``, ``"adam"``,
    ``"momentum"``) or None (``default``) is built with ``lr=inner_lr``; with ``learn`` the step
    sizes are learned from ``inner_lr`` (:class:`MetaSGD`, per ``"tensor"`` for True or ``"element"``;
    with ``per_step`` one set per inner step, :class:`LSLR`).

    Args:
        owner: the module's name, for error messages.
        inner_optimizer: an inner optimiser, a name of :data:`BY_NAME`, or None for ``default``.
        inner_lr: the step size of a named or default optimiser, and the initial learned one.
        learn: learn the step sizes (Meta-SGD): False, True / ``"tensor"`` or ``"element"``.
        per_step: with ``learn``, inner steps with their own learned step sizes (LSLR).
        flag: the module's argument that sets ``learn``, for error messages.
        default: the name used when ``inner_optimizer`` is None.

    Raises:
        ValueError: for an unknown name, a bad ``learn``, or ``learn`` beside an explicit optimiser.
    """
    if learn not in (False, True, "tensor", "element"):
        raise ValueError(f"{owner}: {flag}={learn!r} must be False, True, 'tensor' or 'element'")
    if isinstance(inner_optimizer, InnerOptimizer):
        if learn:
            what = f"LSLR(lr=inner_lr, steps={per_step})" if per_step else "MetaSGD(lr=inner_lr, per=...)"
            raise ValueError(
                f"{owner}: {flag}={learn!r} and inner_optimizer={inner_optimizer!r} both choose the inner optimizer; "
                f"give one ({flag} is inner_optimizer={what})"
            )
        return inner_optimizer
    name = default if inner_optimizer is None else inner_optimizer
    if not isinstance(name, str) or name not in BY_NAME:
        raise ValueError(
            f"{owner}: inner_optimizer={inner_optimizer!r} must be one of {sorted(BY_NAME)} or an InnerOptimizer "
            "(lightning_meta.functional.SGD, MetaSGD, LSLR, Momentum, Adam)"
        )
    if learn:
        per: Literal["tensor", "element"] = "element" if learn == "element" else "tensor"
        return LSLR(inner_lr, per_step) if per_step and per == "tensor" else MetaSGD(inner_lr, per, per_step)
    return BY_NAME[name](inner_lr)


def current_lr(optimizer: InnerOptimizer) -> float | None:
    """The optimiser's step size now: the mean of learned ones (Meta-SGD, LSLR), else its ``lr``; None without one."""
    learned = getattr(optimizer, "lrs", None)
    if isinstance(learned, nn.ParameterDict) and len(learned):
        with torch.no_grad():
            return float(torch.cat([lr.detach().flatten() for lr in learned.values()]).mean())
    lr = getattr(optimizer, "lr", None)
    return float(lr) if isinstance(lr, int | float) else None
