"""Batched, differentiable solvers for the convex heads of few-shot methods.

:func:`crammer_singer_svm` solves, for every task of a meta-batch at once, the dual of the
multi-class linear SVM of Crammer and Singer (2001) that MetaOptNet fits on the support set (Lee
et al. 2019, eq. 4 and their code), with a primal-dual interior-point method (Mehrotra's
predictor-corrector, iterate for iterate as qpth/OptNet, Amos and Kolter 2017, so that MetaOptNet's
iteration counts mean what they mean there). The problem's structure (one kernel block per class,
one equality per support example) makes each Newton step ``ways`` Cholesky factorisations of
``n x n`` matrices plus one ``n x n`` Schur complement, rather than one LU of the
``(n * ways)``-square KKT matrix that a generic QP solver factorises. Its gradient with respect to
the kernel comes from implicit differentiation of the KKT conditions at the returned iterate (Lee
et al. 2019, theorem 1; Amos and Kolter 2017, section 3), so no graph through the iterations is kept.

:func:`kernel_ridge` is the closed-form ridge regression head (MetaOptNet-RR), and :func:`solve_qp`
a generic dense batched QP solver (same method, forward only) used as a reference by the tests and
the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["QPSolution", "SVMSolution", "crammer_singer_svm", "kernel_ridge", "solve_qp"]

Newton = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]
Factor = Callable[[Tensor, Tensor, Tensor], Newton]


class SVMSolution(NamedTuple):
    """The solution of :func:`crammer_singer_svm` for a batch of ``B`` tasks of ``n`` examples and ``N`` classes.

    Attributes:
        alpha: ``[B, n, N]`` dual variables; class ``m``'s weight vector is ``sum_i alpha[i, m] x_i``.
            Differentiable with respect to the kernel.
        slack: ``[B, n, N]`` ``C * onehot - alpha``, non-negative (the inequality constraints' slack).
        ineq_dual: ``[B, n, N]`` the multipliers of ``alpha <= C * onehot``, non-negative.
        eq_dual: ``[B, n]`` the multipliers of ``sum_m alpha[i, m] = 0``.
        converged: ``[B]`` whether the task met the tolerance within the iterations.
    """

    alpha: Tensor
    slack: Tensor
    ineq_dual: Tensor
    eq_dual: Tensor
    converged: Tensor


class QPSolution(NamedTuple):
    """The solution of :func:`solve_qp`: primal ``z`` ``[B, nz]``, slack and multipliers of ``Gz <= h``, ``Az = b``."""

    z: Tensor
    slack: Tensor
    ineq_dual: Tensor
    eq_dual: Tensor
    converged: Tensor


# ----------------------------------------------------------------------------- checks
def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a whole number of 1 or more; set {name} to e.g. 3 or 15")
    return int(value)


def _check_positive(name: str, value: Any, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not zero_ok):
        bound = "0 or more" if zero_ok else "more than 0"
        raise ValueError(f"{name}={value!r} must be {bound}; MetaOptNet uses C=0.1 for the SVM, 50 for ridge")
    return float(value)


#: qpth's defaults (``QPFunction(eps=1e-12, notImprovedLim=3)``): a task stops once its merit is below
#: ``_EPS`` or after ``_NOT_IMPROVED`` iterations in a row that did not lower it.
_EPS = 1e-12
_NOT_IMPROVED = 3
#: qpth's backward clamps slacks and multipliers at this floor before forming ``D = lam / s``.
_BACKWARD_FLOOR = 1e-8


# ----------------------------------------------------------------------------- the interior-point loop
def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Per task, the largest ``t`` with ``v + t dv >= 0`` (``v > 0``); ``inf`` where no entry decreases."""
    ratio = torch.where(dv < 0, -v / dv.clamp(max=-torch.finfo(v.dtype).tiny), torch.full_like(v, math.inf))
    return ratio.flatten(1).amin(1)


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def _weights(s: Tensor, lam: Tensor, scale: Tensor) -> Tensor:
    """``D = lam / s`` of the Newton system, kept finite.

    Near the optimum it spans eps..1/eps (inactive vs active constraints); the clamp only matters
    once a slack underflows, where it no longer changes the step.
    """
    return (lam / s).clamp(max=_bcast(scale, s) / torch.finfo(s.dtype).eps)


def _scale(q: Tensor) -> Tensor:
    """Per task, the size of the quadratic term (bounds ``D`` in :func:`_weights`)."""
    return 1 + q.diagonal(dim1=-2, dim2=-1).abs().amax(-1)


def _mehrotra(
    z: Tensor,
    s: Tensor,
    lam: Tensor,
    nu: Tensor,
    residuals: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    factor: Factor,
    iterations: int,
    tol: float,
    scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mehrotra's predictor-corrector primal-dual interior-point iterations, batched over tasks, as qpth's.

    ``residuals(z, s, lam, nu)`` returns the dual (stationarity), inequality and equality
    residuals; ``factor(s, lam, D)`` factorises the Newton system at ``s, lam`` with ``D = lam / s``
    and returns the function that solves it for right-hand sides ``(r_d, r_p, r_e, r_c)``.

    The loop is qpth's (``qpth.solvers.pdipm.batch.forward``, Amos and Kolter 2017), so that
    MetaOptNet's iteration counts (15 in training, 3 at test) mean what they mean in its code:
    ``iterations`` iterates are scored, the starting point first, and the best of them is returned
    (the step after the last scored iterate is not taken); the score is the 2-norms of the three
    residuals plus the total complementarity gap; the step is ``min(1, 0.999 t_max)``. Each task
    stops on its own (qpth stops a batch) once its best score is below ``tol`` or has not improved
    for 3 iterations, or when a step would leave the interior or overflow. Returns the best
    ``z, s, lam, nu`` and which tasks reached ``tol``.
    """

    def keep_better(best: list[Tensor], now: list[Tensor], better: Tensor) -> None:
        for i, (b, n) in enumerate(zip(best, now, strict=True)):
            best[i] = torch.where(_bcast(better, b), n, b)

    best, best_merit = [z, s, lam, nu], torch.full_like(scale, math.inf)
    stalled = torch.zeros_like(scale, dtype=torch.int64)
    frozen = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    for i in range(iterations):
        r_d, r_p, r_e = residuals(z, s, lam, nu)
        gap = s * lam
        merit = torch.stack([r.flatten(1).norm(dim=1) for r in (r_d, r_p, r_e)]).sum(0) + gap.flatten(1).sum(1)
        better = ~frozen & (merit < best_merit)
        keep_better(best, [z, s, lam, nu], better)
        best_merit = torch.where(better, merit, best_merit)
        stalled = torch.where(better, 0, stalled + 1)
        frozen = frozen | (stalled >= _NOT_IMPROVED) | (best_merit < tol)
        if i == iterations - 1 or bool(frozen.all()):
            break
        mu = gap.flatten(1).mean(1)
        solve = factor(s, lam, _weights(s, lam, scale))
        _, ds_aff, dlam_aff, _ = solve(r_d, r_p, r_e, gap)
        t = _bcast(torch.minimum(_max_step(s, ds_aff), _max_step(lam, dlam_aff)).clamp(max=1.0), s)
        sigma = (((s + t * ds_aff) * (lam + t * dlam_aff)).flatten(1).sum(1) / gap.flatten(1).sum(1)) ** 3
        r_c = gap + ds_aff * dlam_aff - _bcast(sigma * mu, s)
        dz, ds, dlam, dnu = solve(r_d, r_p, r_e, r_c)
        step = (0.999 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0)
        new = [v + _bcast(step, v) * dv for v, dv in ((z, dz), (s, ds), (lam, dlam), (nu, dnu))]
        ok = torch.stack([v.flatten(1).isfinite().all(1) for v in new if v[0].numel()]).all(0)
        ok = ok & (new[1].flatten(1) > 0).all(1) & (new[2].flatten(1) > 0).all(1)
        frozen = frozen | ~ok
        # torch.where, not a zero step: a frozen task's Newton step may hold inf or nan.
        z, s, lam, nu = (torch.where(_bcast(frozen, v), v, n) for v, n in zip((z, s, lam, nu), new, strict=True))
    z, s, lam, nu = best
    return z, s, lam, nu, best_merit < tol


def _shift_positive(v: Tensor) -> Tensor:
    """The start of qpth: move each task's slacks (or multipliers) so that the smallest is 1 if any is <= 0."""
    low = v.flatten(1).amin(1)
    return v + _bcast(torch.where(low <= 0, 1 - low, torch.zeros_like(low)), v)


# ----------------------------------------------------------------------------- Crammer-Singer SVM
def _cs_factor(q: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Factorise ``H_m = Q + diag(d_m)`` for every class and the Schur complement ``S = sum_m H_m^-1``."""
    h = q.unsqueeze(1) + torch.diag_embed(d)  # [B, N, n, n]
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky_ex(h).L)
    schur = torch.linalg.cholesky_ex(h_inv.sum(1)).L
    return h_inv, schur


def _cs_solve(h_inv: Tensor, schur: Tensor, g: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``H_m x_m + nu = g_m`` for every class ``m`` with ``sum_m x_m = r`` (``g``: ``[B, N, n]``)."""
    hg = (h_inv @ g.unsqueeze(-1)).squeeze(-1)
    nu = torch.cholesky_solve((hg.sum(1) - r).unsqueeze(-1), schur).squeeze(-1)
    return hg - (h_inv @ nu[:, None, :, None]).squeeze(-1), nu


def _cs_ipm(q: Tensor, y: Tensor, c: float, iterations: int, tol: float) -> tuple[Tensor, ...]:
    """The interior-point solve on class-major tensors: ``q`` ``[B, n, n]``, one-hot ``y`` ``[B, N, n]``."""
    h = c * y
    # Start (qpth's): the Newton system with D = 1, i.e. min 1/2 a'Qa - y'a + 1/2 |a - h|^2 on the equalities.
    h_inv, schur = _cs_factor(q, torch.ones_like(y))
    alpha, nu = _cs_solve(h_inv, schur, y + h, torch.zeros_like(y[:, 0]))
    s = _shift_positive(h - alpha)
    lam = _shift_positive(alpha - h)

    def residuals(a: Tensor, s: Tensor, lam: Tensor, nu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return a @ q - y + lam + nu.unsqueeze(1), a + s - h, a.sum(1)

    def factor(s: Tensor, lam: Tensor, d: Tensor) -> Newton:
        h_inv, schur = _cs_factor(q, d)

        def solve(r_d: Tensor, r_p: Tensor, r_e: Tensor, r_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            shift = (lam * r_p - r_c) / s
            da, dnu = _cs_solve(h_inv, schur, -r_d - shift, -r_e)
            return da, -r_p - da, d * da + shift, dnu

        return solve

    return _mehrotra(alpha, s, lam, nu, residuals, factor, iterations, tol, _scale(q))


class _CrammerSingerDual(torch.autograd.Function):
    """The SVM dual's solution as a function of the kernel; backward by implicit differentiation of the KKT system."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, y: Tensor, c: float, iterations: int, tol: float) -> tuple[Tensor, ...]:
        alpha, s, lam, nu, done = _cs_ipm(q, y, c, iterations, tol)
        ctx.save_for_backward(q, alpha, s, lam)
        ctx.mark_non_differentiable(s, lam, nu, done)
        return alpha, s, lam, nu, done

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_alpha: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        q, alpha, s, lam = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            # d alpha solves [[Q + D, A'], [A, 0]] [d alpha; d nu] = [-dQ alpha; 0] with D = lam / s
            # (the differentiated complementarity), so dL/dQ = -u alpha' for [u; w] = KKT^-1 [dL/d alpha; 0].
            # D is qpth's, slack and multiplier clamped at 1e-8: the gradient MetaOptNet trains with.
            h_inv, schur = _cs_factor(q, lam.clamp(min=_BACKWARD_FLOOR) / s.clamp(min=_BACKWARD_FLOOR))
            u, _w = _cs_solve(h_inv, schur, grad_alpha.to(q.dtype), torch.zeros_like(alpha[:, 0]))
            grad_q = u.transpose(1, 2) @ alpha
            grad_q = -0.5 * (grad_q + grad_q.transpose(1, 2))
        return grad_q, None, None, None, None


def crammer_singer_svm(
    kernel: Tensor,
    labels: Tensor,
    ways: int | None = None,
    C: float = 0.1,
    iterations: int = 15,
    diag: float = 1.0,
    tol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> SVMSolution:
    """Solve the dual of the Crammer-Singer multi-class SVM for every task of a batch, differentiably.

    The problem (Lee et al. 2019, eq. 4, in its dual form as their ``MetaOptNetHead_SVM_CS``), per
    task, over ``alpha`` in ``R^{n x N}``::

        min  1/2 sum_m alpha_m' (K + diag I) alpha_m - sum_i alpha[i, y_i]
        s.t. alpha[i, m] <= C [m = y_i],   sum_m alpha[i, m] = 0   for every i, m.

    ``diag`` = 1 is MetaOptNet's: it makes the problem strictly convex (a unique solution, whose
    gradient exists) and acts as a ridge on the dual. The class-``m`` score of a point ``x`` is
    ``sum_i alpha[i, m] <x_i, x>``.

    Args:
        kernel: ``[B, n, n]`` Gram matrix of the support features (gradients flow back through it).
        labels: ``[B, n]`` integer labels in ``[0, ways)``.
        ways: number of classes ``N``; by default ``labels.max() + 1``.
        C: the SVM's cost (0.1 in MetaOptNet).
        iterations: qpth's ``maxIter``: the best of the first ``iterations`` interior-point iterates,
            the starting point counting as the first (MetaOptNet: 15 in training, 3 at test).
        diag: added to the kernel's diagonal.
        tol: a task stops once the 2-norms of its KKT residuals plus its total duality gap are below
            ``tol``; by default 1e-12, qpth's ``eps``.
        dtype: the solver's precision, whatever the input's (autocast is off inside).

    Returns:
        An :class:`SVMSolution`; ``alpha`` is in ``dtype``.
    """
    C = _check_positive("C", C)
    iterations = _check_positive_int("iterations", iterations)
    diag = _check_positive("diag", diag, zero_ok=True)
    if kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must be [tasks, n, n], got shape {tuple(kernel.shape)}")
    if labels.shape != kernel.shape[:2] or labels.is_floating_point():
        raise ValueError(f"labels must be [tasks, n] = {tuple(kernel.shape[:2])} integers, got {tuple(labels.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} must be torch.float32 or torch.float64")
    ways = int(labels.max()) + 1 if ways is None else _check_positive_int("ways", ways)
    with torch.autocast(kernel.device.type, enabled=False):
        q = kernel.to(dtype)
        q = q + diag * torch.eye(q.shape[-1], dtype=dtype, device=q.device)
        y = torch.nn.functional.one_hot(labels.long(), ways).to(dtype).transpose(1, 2)  # [B, N, n]
        alpha, s, lam, nu, done = _CrammerSingerDual.apply(q, y, C, iterations, _EPS if tol is None else tol)
    return SVMSolution(alpha.transpose(1, 2), s.transpose(1, 2), lam.transpose(1, 2), nu, done)


# ----------------------------------------------------------------------------- ridge and generic QP
def kernel_ridge(
    kernel: Tensor, labels: Tensor, ways: int | None = None, lam: float = 50.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Dual ridge regression onto one-hot targets: ``alpha = (K + lam I)^-1 Y``, ``[B, n, N]`` in ``dtype``.

    MetaOptNet-RR's head (Lee et al. 2019, section 4.1, lam = 50), which their QP solver reaches in
    one iteration; here it is one Cholesky solve, differentiable by autograd (autocast off inside).
    """
    lam = _check_positive("lam", lam)
    ways = int(labels.max()) + 1 if ways is None else _check_positive_int("ways", ways)
    with torch.autocast(kernel.device.type, enabled=False):
        k = kernel.to(dtype) + lam * torch.eye(kernel.shape[-1], dtype=dtype, device=kernel.device)
        y = torch.nn.functional.one_hot(labels.long(), ways).to(dtype)
        return torch.cholesky_solve(y, torch.linalg.cholesky(k))


def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor,
    h: Tensor,
    A: Tensor | None = None,
    b: Tensor | None = None,
    iterations: int = 30,
    tol: float | None = None,
) -> QPSolution:
    """A generic batched QP ``min 1/2 z'Qz + p'z s.t. Gz <= h, Az = b`` by the same interior-point method.

    Dense: each iteration solves the ``(nz + ne)``-square reduced KKT system by LU, as qpth does
    with its full KKT matrix. Forward only (no gradient); the reference that the tests and
    ``benchmarks/metaoptnet_solver.py`` hold :func:`crammer_singer_svm` against.

    Args:
        Q: ``[B, nz, nz]`` positive semi-definite (positive definite on the equalities' null space).
        p: ``[B, nz]`` linear term.
        G: ``[B, ni, nz]`` inequality matrix.
        h: ``[B, ni]`` inequality bound.
        A: ``[B, ne, nz]`` equality matrix, or None.
        b: ``[B, ne]`` equality right-hand side, or None.
        iterations: at most this many iterates, as in :func:`crammer_singer_svm`.
        tol: stopping tolerance, as in :func:`crammer_singer_svm`.
    """
    iterations = _check_positive_int("iterations", iterations)
    batch, nz = p.shape
    if A is None:
        A, b = Q.new_zeros(batch, 0, nz), Q.new_zeros(batch, 0)
    assert b is not None
    ne = A.shape[1]
    tol = _EPS if tol is None else tol
    Gt, At = G.transpose(1, 2), A.transpose(1, 2)

    def solve_reduced(d: Tensor, rhs_z: Tensor, rhs_e: Tensor) -> tuple[Tensor, Tensor]:
        top = torch.cat([Q + Gt @ (d.unsqueeze(-1) * G), At], 2)
        bottom = torch.cat([A, A.new_zeros(batch, ne, ne)], 2)
        x = torch.linalg.solve(torch.cat([top, bottom], 1), torch.cat([rhs_z, rhs_e], 1))
        return x[:, :nz], x[:, nz:]

    z, nu = solve_reduced(torch.ones_like(h), -p + (Gt @ h.unsqueeze(-1)).squeeze(-1), b)
    gz = (G @ z.unsqueeze(-1)).squeeze(-1)
    s, lam = _shift_positive(h - gz), _shift_positive(gz - h)

    def residuals(z: Tensor, s: Tensor, lam: Tensor, nu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r_d = (Q @ z.unsqueeze(-1) + Gt @ lam.unsqueeze(-1) + At @ nu.unsqueeze(-1)).squeeze(-1) + p
        return r_d, (G @ z.unsqueeze(-1)).squeeze(-1) + s - h, (A @ z.unsqueeze(-1)).squeeze(-1) - b

    def factor(s: Tensor, lam: Tensor, d: Tensor) -> Newton:
        def solve(r_d: Tensor, r_p: Tensor, r_e: Tensor, r_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            shift = (lam * r_p - r_c) / s
            dz, dnu = solve_reduced(d, -r_d - (Gt @ shift.unsqueeze(-1)).squeeze(-1), -r_e)
            gdz = (G @ dz.unsqueeze(-1)).squeeze(-1)
            return dz, -r_p - gdz, d * gdz + shift, dnu

        return solve

    return QPSolution(*_mehrotra(z, s, lam, nu, residuals, factor, iterations, tol, _scale(Q)))


def ridge_regression(x: Tensor, y: Tensor, lam: Tensor | float, woodbury: bool | None = None) -> Tensor:
    """The ridge solution ``argmin_W ||X W - Y||^2 + lam ||W||^2``, ``[B, D, M]``, of ``X [B, n, D]``, ``Y [B, n, M]``.

    With ``woodbury`` (by default when ``n <= D``, the few-shot case) it is
    ``X^T (X X^T + lam I)^{-1} Y``, an ``n x n`` solve per task (Bertinetto et al. 2019, eq. 5),
    else ``(X^T X + lam I)^{-1} X^T Y``, a ``D x D`` one; the two are equal. Differentiable in
    ``X``, ``Y`` and ``lam``, batched over the leading dimension.
    """
    n, d = x.shape[-2:]
    xt = x.transpose(-1, -2)
    if woodbury is None:
        woodbury = n <= d
    if woodbury:
        gram = x @ xt + lam * torch.eye(n, dtype=x.dtype, device=x.device)
        return xt @ torch.linalg.solve(gram, y)
    gram = xt @ x + lam * torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, xt @ y)
