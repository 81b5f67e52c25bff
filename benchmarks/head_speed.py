"""MetaOptNet-SVM and R2-D2 meta-training step time on ResNet-12 at 84x84 against learn2learn's ``SVClassifier`` recipe.

One meta-training step (embed support and query, solve the head per episode, query loss,
backward, Adam) on the same random episodes, median of ``--steps`` after a warm-up:

- ``MetaOptNet-SVM``: :class:`lightning_meta.MetaOptNet` (batched interior-point solver with
  implicit gradients, ``solver_iters=15`` as the paper's training), float64 solve as shipped;
- ``MetaOptNet-SVM fp32``: the same with ``solver_dtype="float32"``;
- ``R2-D2``: :class:`lightning_meta.R2D2` (Woodbury ridge regression);
- ``learn2learn SVClassifier``: learn2learn's recipe (``learn2learn.nn.SVClassifier``: qpth's
  ``QPFunction``, 15 iterations, one episode at a time, as in its MetaOptNet example), on our
  ResNet-12 (the same weights, so the difference is the head) and on learn2learn's own
  ``ResNet12Backbone`` (its whole recipe).

All on the paper's ResNet-12 (64-160-320-640, DropBlock) without global pooling (16000-d
embeddings at 84 px, as MetaOptNet), fp32. Prints the CPU's features and a markdown table with
ratios to learn2learn's recipe on the same backbone.

    python benchmarks/head_speed.py                          # 2 episodes of 5-way 5-shot, 6 queries
    python benchmarks/head_speed.py --tasks 8 --shots 15 --device cuda   # the paper's training episodes
    python benchmarks/head_speed.py --tiny                   # a smoke run: one small episode, 1 step
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from maml_speed import cpu_features
from timing import ms_per_step, random_episodes, table_row

from lightning_meta import R2D2, MetaOptNet, ResNet12

METHODS = [
    "learn2learn SVClassifier",
    "MetaOptNet-SVM",
    "MetaOptNet-SVM fp32",
    "R2-D2",
    "learn2learn SVClassifier (its ResNet12Backbone)",
]


def make_step(method: str, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    batch = random_episodes(args.tasks, args.ways, args.shots, args.queries, (3, args.size, args.size))
    batch = batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if k != "ways"})
    if method.startswith("learn2learn"):
        import learn2learn as l2l

        if "ResNet12Backbone" in method:
            body: torch.nn.Module = l2l.vision.models.ResNet12Backbone(avg_pool=False)
        else:
            body = ResNet12(avg_pool=False)
        body = body.to(device).train()
        optimizer = torch.optim.Adam(body.parameters(), 1e-3)
        shots_total = batch.support_x.shape[1]

        def step() -> None:  # embed every episode of the meta-batch, then one SVClassifier per episode
            optimizer.zero_grad()
            x = torch.cat([batch.support_x, batch.query_x], 1)
            features = body(x.flatten(0, 1)).view(args.tasks, x.shape[1], -1)
            loss = 0.0
            for t in range(args.tasks):
                classifier = l2l.nn.SVClassifier(
                    features[t, :shots_total], batch.support_y[t], ways=args.ways, C_reg=0.1, max_iters=15
                )
                loss = loss + F.cross_entropy(classifier(features[t, shots_total:]), batch.query_y[t])
            (loss / args.tasks).backward()
            optimizer.step()

        return step
    backbone = ResNet12(avg_pool=False)
    if method == "R2-D2":
        model: torch.nn.Module = R2D2(backbone)
    else:
        dtype = "float32" if method.endswith("fp32") else "float64"
        model = MetaOptNet(backbone, solver_iters=15, solver_dtype=dtype)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step() -> None:
        optimizer.zero_grad()
        model.episode_loss(batch)[0].mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="one 5-way 1-shot 1-query episode, 1 timed step (smoke)")
    args = parser.parse_args()
    if args.tiny:  # 84 px still: learn2learn's DropBlock divides by zero on maps smaller than its block
        args.tasks, args.shots, args.queries, args.steps = 1, 1, 1, 1
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_features()
    print(
        f"{where}; {torch.get_num_threads()} threads, torch {torch.__version__}; {args.tasks} episodes of "
        f"{args.ways}-way {args.shots}-shot, {args.queries} queries per class, {args.size} px, fp32 network; "
        f"median of {args.steps} steps\n"
    )
    print(table_row(["method", "ms/step", "episodes/s", "vs learn2learn (same backbone)"]))
    print(table_row(["---"] * 4))
    reference = None
    for method in args.methods:
        try:
            ms = ms_per_step(make_step(method, args, device), args.steps)
        except ImportError as err:
            print(table_row([method, f"skipped: {err}", "", ""]))
            continue
        if method == "learn2learn SVClassifier":
            reference = ms
        ratio = "-" if reference is None or "ResNet12Backbone" in method else f"{reference / ms:.2f}x"
        print(table_row([method, f"{ms:.0f}", f"{1000 * args.tasks / ms:.2f}", ratio]), flush=True)


if __name__ == "__main__":
    main()
