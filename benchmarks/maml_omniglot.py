"""MAML and first-order MAML on real Omniglot within a fixed training-time budget per run.

    python benchmarks/maml_omniglot.py --root ../shared/data/omniglot --minutes 12

Each config trains for at most ``--minutes`` (the paper trains for 60000 meta-batches), keeps the
best checkpoint by val/acc, and is tested on ``--test_episodes`` episodes. Prints markdown rows.
"""

from __future__ import annotations

import argparse

import torch
from runs import fit_and_test

PUBLISHED = {"maml/omniglot_5w1s": 98.7, "maml/omniglot_5w5s": 99.9, "maml/fomaml_omniglot_5w1s": 98.3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--minutes", type=int, default=12)
    parser.add_argument("--test_episodes", type=int, default=1000)
    parser.add_argument("--configs", nargs="+", default=list(PUBLISHED))
    parser.add_argument("--log_dir", default="lightning_logs/benchmarks")
    args = parser.parse_args()
    common = ["--data.root", args.root, "--trainer.logger.init_args.save_dir", args.log_dir]
    common += ["--data.cache_dir", args.cache_dir] if args.cache_dir else []
    common += ["--trainer.enable_progress_bar", "false"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| config | test acc % (95% CI) | published | training (wall) | meta-batches | test (wall) |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        budget = f"00:00:{args.minutes:02d}:00"
        fit_s, steps, results = fit_and_test(
            f"{name}.yaml", [f"{name}.yaml"], common, ["--trainer.max_time", budget], args.test_episodes
        )
        m, test_s = results[0]
        print(
            f"| `configs/{name}.yaml` | {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} | {PUBLISHED[name]} "
            f"| {fit_s / 60:.1f} min | {steps} | {test_s:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
