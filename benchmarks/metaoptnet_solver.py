"""Time per episode of MetaOptNet's SVM head: the structured solver against a generic dense QP solver (and cvxpylayers).

Solves the Crammer-Singer dual of every episode of a meta-batch, forward and backward (the gradient
with respect to the support features), with

- ``structured``: :func:`lightning_meta.solvers.crammer_singer_svm` (per-class Cholesky + Schur complement),
- ``dense``: :func:`lightning_meta.solvers.solve_qp` on the same problem as the full ``(n N)``-square
  QP that qpth factorises in MetaOptNet's code (forward only: it has no backward),
- ``cvxpylayers``: the same problem as a ``CvxpyLayer`` (forward and backward), when cvxpylayers is
  installed (``pip install cvxpylayers``); it solves on the CPU, one problem at a time.

Prints one line per solver: milliseconds per episode (median of ``--repeats``), and the largest
difference of its solution from the structured one.

    python benchmarks/metaoptnet_solver.py                      # 8 episodes of 5-way 15-shot, 16000-d
    python benchmarks/metaoptnet_solver.py --shots 1 --dim 640 --device cuda
    python benchmarks/metaoptnet_solver.py --tiny               # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_meta.solvers import crammer_singer_svm, solve_qp


def episode(tasks: int, ways: int, shots: int, dim: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    centres = torch.randn(tasks, ways, dim, generator=g)
    x = torch.randn(tasks, ways * shots, dim, generator=g) + centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim))
    return (x / dim**0.5).to(device, dtype), labels.to(device)


def timed(fn, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=15)
    parser.add_argument("--dim", type=int, default=16000, help="embedding size (16000: ResNet-12 at 84 px)")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--C", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="2 episodes of 5-way 2-shot, 32-d, 1 repeat")
    args = parser.parse_args()
    if args.tiny:
        args.tasks, args.shots, args.dim, args.repeats = 2, 2, 32, 1
    dtype = getattr(torch, args.dtype)
    x, labels = episode(args.tasks, args.ways, args.shots, args.dim, args.device, dtype)
    n, ways = labels.shape[1], args.ways
    print(f"{args.tasks} episodes of {ways}-way {args.shots}-shot, {args.dim}-d features, {args.iterations} "
          f"iterations, {args.dtype} on {args.device}, torch {torch.__version__}")  # fmt: skip

    def structured() -> torch.Tensor:
        xs = x.detach().requires_grad_(True)
        alpha = crammer_singer_svm(xs @ xs.transpose(1, 2), labels, ways, args.C, args.iterations, dtype=dtype).alpha
        alpha.square().sum().backward()
        return alpha.detach()

    seconds, reference = timed(structured, args.repeats, args.device)
    print(f"structured   forward+backward {1000 * seconds / args.tasks:9.3f} ms/episode")

    def dense() -> torch.Tensor:
        kernel = x @ x.transpose(1, 2)
        eye = torch.eye(ways, dtype=dtype, device=x.device)
        Q = torch.stack([torch.kron(k, eye) for k in kernel]) + torch.eye(n * ways, dtype=dtype, device=x.device)
        y = F.one_hot(labels, ways).to(dtype).flatten(1)
        G = torch.eye(n * ways, dtype=dtype, device=x.device).expand(args.tasks, -1, -1)
        ones = torch.ones(1, ways, dtype=dtype, device=x.device)
        A = torch.kron(torch.eye(n, dtype=dtype, device=x.device), ones).expand(args.tasks, -1, -1)
        b = torch.zeros(args.tasks, n, dtype=dtype, device=x.device)
        return solve_qp(Q, -y, G, args.C * y, A, b, iterations=args.iterations).z.view(args.tasks, n, ways)

    seconds, alpha = timed(dense, args.repeats, args.device)
    print(f"dense QP     forward only     {1000 * seconds / args.tasks:9.3f} ms/episode   "
          f"max |alpha - structured| {(alpha - reference).abs().max().item():.2e}")  # fmt: skip

    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        print("cvxpylayers   not installed (pip install cvxpylayers) - skipped")
        return
    features, onehot = cp.Parameter((n, args.dim)), cp.Parameter((n, ways))
    a = cp.Variable((n, ways))
    # The same dual: 1/2 sum_m |X' a_m|^2 + 1/2 |a|^2 - <Y, a>, DPP in the features.
    objective = 0.5 * cp.sum_squares(features.T @ a) + 0.5 * cp.sum_squares(a) - cp.sum(cp.multiply(onehot, a))
    problem = cp.Problem(cp.Minimize(objective), [a <= args.C * onehot, cp.sum(a, axis=1) == 0])
    layer = CvxpyLayer(problem, parameters=[features, onehot], variables=[a])
    y = F.one_hot(labels, ways).to(torch.float64).cpu()

    def cvxpy_layer() -> torch.Tensor:
        xs = x.detach().double().cpu().requires_grad_(True)
        (alpha,) = layer(xs, y)
        alpha.square().sum().backward()
        return alpha.detach()

    seconds, alpha = timed(cvxpy_layer, args.repeats, "cpu")
    print(f"cvxpylayers  forward+backward {1000 * seconds / args.tasks:9.3f} ms/episode   "
          f"max |alpha - structured| {(alpha.to(reference) - reference).abs().max().item():.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
