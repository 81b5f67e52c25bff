"""Policy-gradient objectives and the TRPO step (Schulman et al. 2015; 2017).

Every function takes per-step tensors and returns a scalar to minimise. :func:`trpo_step` changes
parameters in place; its ``reduce`` averages gradients and measured values over processes (the
module passes the Trainer strategy's mean), so every DDP rank takes the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def policy_gradient_loss(log_probs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE with advantages (Williams 1992): ``-mean(log pi(a|s) * A)``."""
    return -(log_probs * advantages.detach()).mean()


def ratio_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor) -> Tensor:
    """The importance-sampled surrogate ``-mean(pi / pi_old * A)``; at ``pi_old`` its gradient is the PG."""
    return -((log_probs - old_log_probs.detach()).exp() * advantages.detach()).mean()


def ppo_clip_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip: float = 0.2) -> Tensor:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7): ``-mean(min(r A, clip(r, 1-e, 1+e) A))``."""
    ratio = (log_probs - old_log_probs.detach()).exp()
    advantages = advantages.detach()
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


def _flat(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like, strict=True)]
    )


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10, tol: float = 1e-10
) -> Tensor:
    """Approximately solve ``A x = b`` for a symmetric positive definite ``A`` given as ``matvec``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iterations):
        ap = matvec(p)
        alpha = rr / (p @ ap + 1e-12)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = r @ r
        if rr_new < tol:
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def _identity(x: Tensor) -> Tensor:
    return x


def trpo_step(
    params: Sequence[Tensor],
    objective: Callable[[], tuple[Tensor, Tensor]],
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iterations: int = 10,
    backtrack_ratio: float = 0.5,
    max_backtracks: int = 15,
    reduce: Callable[[Tensor], Tensor] = _identity,
) -> dict[str, Tensor]:
    """One TRPO update (Schulman et al. 2015, appendix C) of ``params``, in place.

    The natural-gradient direction comes from conjugate gradient on Hessian-vector products of the
    KL; the step is scaled to the KL bound and shrunk by backtracking until the loss improves and
    the KL stays within ``max_kl``. When no step qualifies the parameters are left unchanged.

    Args:
        params: the parameters to update (leaf tensors).
        objective: evaluates ``(loss, kl)`` at the current values of ``params``: the surrogate loss
            to minimise and the mean KL from the policy that sampled the data (0 at the start).
        max_kl: the trust region (delta).
        damping: added to the KL Hessian for numerical stability.
        cg_iterations: conjugate-gradient iterations.
        backtrack_ratio: the line search shrinks the step by this factor each try.
        max_backtracks: tries of the line search.
        reduce: averages a tensor over processes (identity on one).

    Returns:
        ``{"loss_before", "loss_after", "kl", "accepted"}`` (the last 1.0 or 0.0).
    """
    params = list(params)
    loss, kl = objective()
    grad = reduce(_flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params))
    kl_grad = _flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params)

    def fisher_vector(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True, allow_unused=True)
        return reduce(_flat(hv, params)) + damping * v

    direction = conjugate_gradient(fisher_vector, -grad, cg_iterations)
    curvature = direction @ fisher_vector(direction)
    full_step = direction * torch.sqrt(2 * max_kl / (curvature + 1e-12))
    loss_before = reduce(loss.detach())
    start = torch.cat([p.detach().reshape(-1) for p in params])
    stats = {"loss_before": loss_before, "loss_after": loss_before, "kl": torch.zeros(()), "accepted": torch.zeros(())}
    for i in range(max_backtracks):
        _assign(params, start + backtrack_ratio**i * full_step)
        with torch.no_grad():
            new_loss, new_kl = (reduce(x.detach()) for x in objective())
        if bool(new_loss < loss_before) and bool(new_kl <= max_kl):
            stats.update(loss_after=new_loss, kl=new_kl, accepted=torch.ones(()))
            return stats
    _assign(params, start)
    return stats


def _assign(params: Sequence[Tensor], flat: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
