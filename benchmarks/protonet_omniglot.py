"""ProtoNet on real Omniglot: train the paper's 1-shot and 5-shot models, test on 5- and 20-way episodes.

Snell et al. 2017 train with 60-way episodes and the test shot, so the 5-way and 20-way results of a
shot come from the same training run; here too. Prints a markdown table to paste in RESULTS.md.

    python benchmarks/protonet_omniglot.py --root ../shared/data/omniglot --epochs 30
"""

from __future__ import annotations

import argparse
import platform

import torch
from runs import fit_and_test

PUBLISHED = {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--test_episodes", type=int, default=1000)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--log_dir", default="lightning_logs/benchmarks")
    args = parser.parse_args()
    data = ["--data.root", args.root] + (["--data.cache_dir", args.cache_dir] if args.cache_dir else [])
    logger = ["--trainer.logger.init_args.save_dir", args.log_dir, "--trainer.enable_progress_bar", "false"]
    rows = []
    for shots in args.shots:
        fit_s, _, results = fit_and_test(
            f"protonet/omniglot_5w{shots}s.yaml",
            [f"protonet/omniglot_{ways}w{shots}s.yaml" for ways in (5, 20)],
            data + logger,
            ["--trainer.max_epochs", str(args.epochs)],
            args.test_episodes,
        )
        for (m, test_s), ways in zip(results, (5, 20), strict=True):
            rows.append(
                f"| {ways}-way {shots}-shot | {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} "
                f"| {PUBLISHED[(ways, shots)]} "
                f"| {args.epochs} epochs x 100 episodes, {fit_s / 60:.1f} min | {test_s:.0f} s |"
            )
            print(rows[-1], flush=True)
    machine = platform.processor() or platform.machine()
    print(f"\nMachine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| setting | test acc % (95% CI) | Snell et al. 2017 | training (wall) | test (wall) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
