"""Meta Networks training-step time against Matching Networks and MAML on the same Omniglot episodes.

One training step (forward, loss, backward, Adam) on the same random Omniglot-sized episodes
(28x28, one channel), median of ``--steps`` after a warm-up, with each method as its shipped
Omniglot config builds it: ``MetaNetwork`` (Munkhdalai and Yu 2017; Conv4-64 base and
representation learners, 64-unit layer-augmented layers, fast weights from loss gradients, the
memory read), ``MatchingNet`` (Vinyals et al. 2016, Conv4-64, no FCE) and second-order ``MAML``
(Finn et al. 2017: Conv4-64 with stride-2 convolutions, 1 inner step at lr 0.4, the loop). One
episode per step as Meta Networks trains (``tasks_per_batch: 1``), and MAML's meta-batch of 32 as
a second row for it. Prints the CPU's features and a markdown table with ratios to MetaNetwork.

    python benchmarks/metanetwork_speed.py --steps 10
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from maml_speed import cpu_features
from timing import ms_per_step, random_episodes, table_row

from lightning_meta import MAML, Conv4, MatchingNet, MetaNetwork

SHAPES = {"5w1s15q": (5, 1, 15), "20w1s15q": (20, 1, 15)}
METHODS = ["MetaNetwork", "MatchingNet", "MAML", "MAML (32 tasks)"]


def make_step(method: str, ways: int, shots: int, queries: int, bf16: bool) -> tuple[Callable[[], None], int]:
    torch.manual_seed(0)
    tasks = 32 if "32 tasks" in method else 1
    batch = random_episodes(tasks, ways, shots, queries, (1, 28, 28))
    if method == "MetaNetwork":
        model: torch.nn.Module = MetaNetwork(ways, Conv4(1, 64, 28), hidden=64, attention_scale=10.0)
    elif method == "MatchingNet":
        model = MatchingNet(Conv4(1, 64, 28), fce=False)
    else:
        backbone = Conv4(1, 64, 28, ways, "stride", track_running_stats=False)
        model = MAML(backbone, 0.4, 1, 3, task_batching="loop")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.episode_loss(batch)[0].mean()  # MetaNetwork's includes its representation loss
        loss.backward()
        optimizer.step()

    return step, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    print(f"{cpu_features()}; {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.steps}\n")
    print(table_row(["episodes", "precision", "method", "ms/step", "episodes/s", "episodes/s vs MetaNetwork"]))
    print(table_row(["---"] * 6))
    for shape in args.shapes:
        for precision in args.precisions:
            reference = None
            for method in args.methods:
                step, tasks = make_step(method, *SHAPES[shape], precision == "bf16")
                ms = ms_per_step(step, args.steps)
                rate = 1000 * tasks / ms
                reference = rate if method == "MetaNetwork" else reference
                ratio = f"{rate / reference:.2f}x" if reference else "-"
                print(table_row([shape, precision, method, f"{ms:.1f}", f"{rate:.1f}", ratio]), flush=True)


if __name__ == "__main__":
    main()
