"""The batched convex solvers: KKT conditions, agreement with a generic QP solver, gradients by finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_meta.solvers import crammer_singer_svm, kernel_ridge, solve_qp


def episode(tasks: int, ways: int, shots: int, dim: int, seed: int, dtype=torch.float64):
    """Random support features ``[B, N*K, D]`` (classes a little apart) and shuffled labels ``[B, N*K]``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)]
                          for _ in range(tasks)])  # fmt: skip
    centres = torch.randn(tasks, ways, dim, generator=g, dtype=dtype)
    x = torch.randn(tasks, ways * shots, dim, generator=g, dtype=dtype) + centres.gather(
        1, labels.unsqueeze(-1).expand(-1, -1, dim)
    )
    return x, labels


@pytest.mark.parametrize(
    "tasks, ways, shots, dim, C",
    [(3, 5, 1, 16, 0.1), (2, 5, 5, 32, 0.1), (2, 3, 4, 8, 1.0), (2, 20, 1, 64, 0.01), (1, 2, 3, 4, 10.0)],
)
def test_svm_solution_satisfies_the_kkt_conditions(tasks, ways, shots, dim, C):
    x, labels = episode(tasks, ways, shots, dim, seed=ways * 100 + shots)
    kernel = x @ x.transpose(1, 2)
    sol = crammer_singer_svm(kernel, labels, ways, C=C, iterations=50)
    assert sol.converged.all()
    alpha, lam, nu = sol.alpha, sol.ineq_dual, sol.eq_dual
    y = F.one_hot(labels, ways).double()
    size = 1 + kernel.diagonal(dim1=1, dim2=2).amax()
    tol = 1e-9 * size
    # Stationarity of the Lagrangian: (K + I) alpha_m - y_m + lam_m + nu = 0 for every class m.
    stationarity = (kernel + torch.eye(kernel.shape[-1], dtype=kernel.dtype)) @ alpha - y + lam + nu.unsqueeze(-1)
    assert stationarity.abs().max() < tol
    # Primal feasibility: alpha <= C y and sum_m alpha[i, m] = 0.
    assert (alpha - C * y).max() < tol
    assert alpha.sum(-1).abs().max() < tol
    # Dual feasibility and complementary slackness.
    assert lam.min() >= 0
    assert (lam * (C * y - alpha)).abs().max() < tol
    # The constraints bind: some examples are support vectors, the solution is not trivially 0.
    assert (alpha.abs() > 1e-6).any()


def dense_problem(kernel: torch.Tensor, labels: torch.Tensor, ways: int, C: float):
    """The same dual as a generic QP over ``alpha`` flattened sample-major (MetaOptNet's kron(K, I) + I form)."""
    tasks, n = labels.shape
    eye = torch.eye(ways, dtype=kernel.dtype)
    Q = torch.stack([torch.kron(k, eye) for k in kernel]) + torch.eye(n * ways, dtype=kernel.dtype)
    y = F.one_hot(labels, ways).to(kernel.dtype).flatten(1)
    G = torch.eye(n * ways, dtype=kernel.dtype).expand(tasks, -1, -1)
    A = torch.kron(torch.eye(n, dtype=kernel.dtype), torch.ones(1, ways, dtype=kernel.dtype)).expand(tasks, -1, -1)
    return Q, -y, G, C * y, A, torch.zeros(tasks, n, dtype=kernel.dtype)


def test_svm_equals_the_generic_qp_solver_and_float32_is_close():
    x, labels = episode(3, 5, 3, 24, seed=1)
    kernel = x @ x.transpose(1, 2)
    sol = crammer_singer_svm(kernel, labels, 5, C=0.1, iterations=50)
    ref = solve_qp(*dense_problem(kernel, labels, 5, 0.1), iterations=50)
    assert ref.converged.all()
    torch.testing.assert_close(sol.alpha, ref.z.view_as(sol.alpha), rtol=0, atol=1e-10)
    single = crammer_singer_svm(kernel.float(), labels, 5, C=0.1, iterations=50, dtype=torch.float32)
    assert single.alpha.dtype == torch.float32
    torch.testing.assert_close(single.alpha.double(), sol.alpha, rtol=0, atol=1e-4)


def test_generic_qp_solves_a_box_projection():
    """min 1/2 |z - c|^2 s.t. z <= u, sum z = 0 has z = min(c - t, u) for the t that makes the sum 0."""
    c = torch.tensor([[3.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, 1.0, 1.0, 0.2]], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64).unsqueeze(0)
    sol = solve_qp(eye, -c, eye, u, torch.ones(1, 1, 4, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    # By hand: z = (1, -1 - t, 0.5 - t, 0.2) with sum 0 gives t = 0.35.
    expected = torch.tensor([[1.0, -1.35, 0.15, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(sol.z, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("ways, shots", [(5, 1), (5, 5), (20, 1)])
def test_svm_iterates_are_qpths(ways, shots):
    """Each early iterate and its gradient, not only the optimum, are qpth's (MetaOptNet's solver and its training)."""
    QPFunction = pytest.importorskip("qpth.qp", reason="qpth (learn2learn's QP solver) is not installed").QPFunction

    x, labels = episode(3, ways, shots, 64, seed=7)
    weights = torch.randn(3, ways * shots, ways, dtype=x.dtype, generator=torch.Generator().manual_seed(8))
    for iterations in (1, 2, 3, 4, 15):
        ours_x, theirs_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours = crammer_singer_svm(0.1 * ours_x @ ours_x.transpose(1, 2), labels, ways, 0.1, iterations).alpha
        qpth = QPFunction(verbose=-1, maxIter=iterations)
        theirs = []
        for t in range(3):  # one task at a time, as learn2learn's SVClassifier calls it
            kernel = 0.1 * theirs_x[t : t + 1] @ theirs_x[t : t + 1].transpose(1, 2)
            Q, p, G, h, A, b = (v[0] for v in dense_problem(kernel, labels[t : t + 1], ways, 0.1))
            theirs.append(qpth(Q, p, G, h, A, b).view(ways * shots, ways))
        torch.testing.assert_close(ours, torch.stack(theirs), rtol=0, atol=1e-12, msg=f"iterations={iterations}")
        (ours * weights).sum().backward()
        (torch.stack(theirs) * weights).sum().backward()
        assert ours_x.grad is not None and theirs_x.grad is not None
        scale = theirs_x.grad.abs().max()
        torch.testing.assert_close(ours_x.grad / scale, theirs_x.grad / scale, rtol=0, atol=1e-12)


def test_svm_gradient_matches_finite_differences():
    x, labels = episode(2, 3, 2, 5, seed=3)
    query = torch.randn(2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x.requires_grad_(True)

    def scores(x: torch.Tensor) -> torch.Tensor:
        sol = crammer_singer_svm(x @ x.transpose(1, 2), labels, 3, C=0.1, iterations=60)
        assert sol.converged.all()
        return (query @ x.transpose(1, 2)) @ sol.alpha

    # Support vectors on both sides of the box, so the gradient sees active and inactive constraints.
    alpha = crammer_singer_svm(x @ x.transpose(1, 2), labels, 3, C=0.1, iterations=60).alpha.detach()
    own = alpha.gather(-1, labels.unsqueeze(-1))
    assert (own > 1e-4).any() and (own < 0.1 - 1e-4).any()
    assert torch.autograd.gradcheck(scores, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_early_stopped_svm_has_a_finite_gradient_to_every_feature():
    x, labels = episode(4, 5, 15, 64, seed=5, dtype=torch.float32)
    x.requires_grad_(True)
    sol = crammer_singer_svm(x @ x.transpose(1, 2), labels, 5, iterations=3, dtype=torch.float32)
    assert not sol.converged.all(), "3 iterations should stop short of the tolerance here"
    sol.alpha.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad.abs().sum(-1) > 0).all()


def test_solvers_run_in_their_own_precision_under_autocast():
    x, labels = episode(2, 5, 2, 16, seed=6, dtype=torch.float32)
    kernel = x @ x.transpose(1, 2)
    plain = crammer_singer_svm(kernel, labels, 5).alpha
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = crammer_singer_svm(kernel, labels, 5).alpha
        ridge = kernel_ridge(kernel, labels, 5)
    assert auto.dtype == torch.float64 and ridge.dtype == torch.float64
    torch.testing.assert_close(auto, plain)


def test_kernel_ridge_is_the_ridge_solution_and_differentiable():
    x, labels = episode(2, 5, 3, 10, seed=7)
    kernel = x @ x.transpose(1, 2)
    alpha = kernel_ridge(kernel, labels, 5, lam=50.0)
    y = F.one_hot(labels, 5).double()
    # Dual ridge weights give the primal ridge solution W = X' alpha = (X'X + lam I)^-1 X'Y.
    w = torch.linalg.solve(x.transpose(1, 2) @ x + 50.0 * torch.eye(10, dtype=x.dtype), x.transpose(1, 2) @ y)
    torch.testing.assert_close(x.transpose(1, 2) @ alpha, w)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kernel_ridge(x @ x.transpose(1, 2), labels, 5, lam=50.0), (x,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"C": 0.0}, r"C=0\.0 must be more than 0"),
        ({"C": -1.0}, r"C=-1\.0 must be more than 0"),
        ({"C": float("inf")}, r"C=inf must be a finite number"),
        ({"iterations": 0}, r"iterations=0 must be a whole number of 1 or more"),
        ({"iterations": 2.5}, r"iterations=2\.5 must be a whole number"),
        ({"diag": -1.0}, r"diag=-1\.0 must be 0 or more"),
    ],
)
def test_bad_solver_arguments_are_clear_errors(kwargs, message):
    x, labels = episode(1, 3, 2, 4, seed=8)
    with pytest.raises(ValueError, match=message):
        crammer_singer_svm(x @ x.transpose(1, 2), labels, 3, **kwargs)


def test_bad_shapes_are_clear_errors():
    x, labels = episode(1, 3, 2, 4, seed=9)
    with pytest.raises(ValueError, match="kernel must be"):
        crammer_singer_svm(x, labels)
    with pytest.raises(ValueError, match="labels must be"):
        crammer_singer_svm(x @ x.transpose(1, 2), labels[:, :3])
