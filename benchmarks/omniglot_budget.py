"""Train configs on real Omniglot within a fixed time budget each, then test the best checkpoint.

    python benchmarks/omniglot_budget.py --root ../shared/data/omniglot --minutes 10 \
        --configs maml/omniglot_5w1s reptile/omniglot_5w1s

Each config trains for at most ``--minutes`` (the papers train far longer), keeps the best
checkpoint by val/acc, and is tested on ``--test_episodes`` episodes. ``--fit_args`` adds
command-line arguments to every fit (e.g. ``"--trainer.max_steps 300"`` for a fixed number of
meta-batches instead of a time budget). Prints markdown rows.
"""

from __future__ import annotations

import argparse
import shlex

import torch
from runs import fit_and_test

# Test accuracy (%) of the papers: Finn et al. 2017 Table 1 (MAML), Nichol et al. 2018 Table 1
# (FOMAML, Reptile with transduction), Vinyals et al. 2016 Table 1 (Matching Networks); configs without a
# published figure print "-".
PUBLISHED = {
    "maml/omniglot_5w1s": 98.7,
    "maml/omniglot_5w5s": 99.9,
    "maml/fomaml_omniglot_5w1s": 98.3,
    "maml/fomaml_omniglot_5w5s": 99.2,
    "reptile/omniglot_5w1s": 97.68,
    "reptile/omniglot_5w5s": 99.48,
    "matchingnet/omniglot_5w1s": 98.1,
    "matchingnet/omniglot_5w5s": 98.9,
    # Raghu et al. 2020 Table 2 (ANIL, Conv4); Antoniou et al. 2019 Table 1 (MAML++); Munkhdalai and Yu 2017
    # Table 1 (Meta Networks). MetaOptNet (Lee et al. 2019) and the baselines (Chen et al. 2019, Tian et al.
    # 2020) publish no Omniglot figure; R2-D2's Omniglot figures (Bertinetto et al. 2019, Table 1) are for
    # its 96-192-384-512 network, not the 64-filter one of our configs.
    "anil/omniglot_20w1s": 96.2,
    "anil/omniglot_20w5s": 98.0,
    "mamlpp/omniglot_5w1s": 99.47,
    "mamlpp/omniglot_5w5s": 99.85,
    "mamlpp/omniglot_20w1s": 97.65,
    "mamlpp/omniglot_20w5s": 99.33,
    "metanetwork/omniglot_5w1s": 98.95,
    "metanetwork/omniglot_20w1s": 97.00,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--test_episodes", type=int, default=1000)
    parser.add_argument("--configs", nargs="+", default=list(PUBLISHED))
    parser.add_argument("--fit_args", default="", help="extra arguments for every fit, one string")
    parser.add_argument("--log_dir", default="lightning_logs/benchmarks")
    args = parser.parse_args()
    common = ["--data.root", args.root, "--trainer.logger.init_args.save_dir", args.log_dir]
    common += ["--data.cache_dir", args.cache_dir] if args.cache_dir else []
    common += ["--trainer.enable_progress_bar", "false"]
    fit_args = ["--trainer.max_time", f"00:00:{args.minutes:02d}:00", *shlex.split(args.fit_args)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fit args: {' '.join(fit_args)}")
    print("| config | test acc % (95% CI) | published | training (wall) | meta-batches | test (wall) |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        fit_s, steps, results = fit_and_test(f"{name}.yaml", [f"{name}.yaml"], common, fit_args, args.test_episodes)
        m, test_s = results[0]
        print(
            f"| `configs/{name}.yaml` | {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} "
            f"| {PUBLISHED.get(name, '-')} | {fit_s / 60:.1f} min | {steps} | {test_s:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
