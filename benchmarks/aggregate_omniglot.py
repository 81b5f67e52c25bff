"""Aggregate against its members on real Omniglot: train ProtoNet, MatchingNet and MAML, then the aggregate over them.

    python benchmarks/aggregate_omniglot.py --root ../shared/data/omniglot --ways 20 --minutes 5 --aggregate_minutes 4

1. Fits each member's shipped config (``configs/{protonet,matchingnet,maml}/omniglot_<N>w1s.yaml``)
   for at most ``--minutes`` each (the same budget for every member) and keeps its best
   checkpoint by ``val/acc``.
2. Fits ``configs/aggregate/omniglot_<N>w1s.yaml`` over those checkpoints, frozen
   (``train_members: false``; only the weighting learns), for at most ``--aggregate_minutes``.
3. Tests the best aggregate on ``--test_episodes`` test episodes, recording every episode's
   accuracy for the aggregate and for each member alone on the same episodes, and prints a
   markdown table and a paired comparison of the aggregate with the best member (the mean
   per-episode difference with its 95% confidence interval and a two-sided p-value).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from lightning.pytorch import Callback
from runs import CONFIGS

from lightning_meta.cli import make_cli
from lightning_meta.metrics import episode_accuracy

MEMBERS = ["protonet", "matchingnet", "maml"]


class EpisodeRecorder(Callback):
    """Keeps the accuracy of every test episode: the aggregate's and each member's alone."""

    def __init__(self) -> None:
        self.aggregate: list[torch.Tensor] = []
        self.members: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        combined = pl_module._last
        query_y = batch.query_y
        self.aggregate.append(episode_accuracy(outputs["output"].predictions, query_y).float().cpu())
        per_member = [episode_accuracy(combined.log_probs[:, i], query_y) for i in range(combined.log_probs.shape[1])]
        self.members.append(torch.stack(per_member, 1).float().cpu())
        self.weights.append(combined.weights.detach().float().cpu())


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean of ``a - b`` over episodes, its 95% CI half-width and the two-sided p-value (normal approximation)."""
    d = (a - b).double()
    mean, sd = d.mean().item(), d.std().item()
    half = 1.96 * sd / math.sqrt(len(d))
    z = mean / (sd / math.sqrt(len(d))) if sd > 0 else 0.0
    return mean, half, math.erfc(abs(z) / math.sqrt(2))


def ci(x: torch.Tensor) -> str:
    return f"{100 * x.mean():.2f} ± {100 * 1.96 * x.std().item() / math.sqrt(len(x)):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--ways", type=int, default=20, choices=[5, 20])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each member")
    parser.add_argument("--aggregate_minutes", type=float, default=4.0)
    parser.add_argument("--test_episodes", type=int, default=1000)
    parser.add_argument("--val_episodes", type=int, default=100)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--log_dir", default="lightning_logs/benchmarks")
    parser.add_argument("--checkpoints", nargs="*", default=None, help="skip step 1: the members' checkpoints")
    args = parser.parse_args()
    common = ["--data.root", args.root, "--trainer.logger.init_args.save_dir", args.log_dir]
    common += ["--data.cache_dir", args.cache_dir] if args.cache_dir else []
    common += ["--trainer.enable_progress_bar", "false"]

    def budget(minutes: float) -> list[str]:
        seconds = int(minutes * 60)
        return ["--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]

    # Validation four times an epoch on fewer episodes, so that a short budget still keeps a best checkpoint.
    validation = ["--trainer.val_check_interval", "0.25", "--data.val_episodes", str(args.val_episodes)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.ways}-way 1-shot")
    checkpoints = args.checkpoints
    if not checkpoints:
        checkpoints = []
        for name in MEMBERS:
            start = time.perf_counter()
            fit = make_cli(["fit", "--config", str(CONFIGS / name / f"omniglot_{args.ways}w1s.yaml"), *common,
                            *budget(args.minutes), *validation])  # fmt: skip
            best = fit.trainer.checkpoint_callback
            checkpoints.append(best.best_model_path)
            minutes = (time.perf_counter() - start) / 60
            print(f"member {name}: {fit.trainer.global_step} steps in {minutes:.1f} min, "
                  f"best val/acc {best.best_model_score:.4f}: {checkpoints[-1]}")  # fmt: skip
    config = str(CONFIGS / "aggregate" / f"omniglot_{args.ways}w1s.yaml")
    members = ["--model.init_args.checkpoints", "[" + ",".join(checkpoints) + "]", "--model.init_args.members", "null"]
    members += ["--model.init_args.train_members", "false"]
    start = time.perf_counter()
    fit = make_cli(["fit", "--config", config, *common, *members, *budget(args.aggregate_minutes), *validation])
    best = fit.trainer.checkpoint_callback.best_model_path
    print(f"aggregate: {fit.trainer.global_step} steps in {(time.perf_counter() - start) / 60:.1f} min: {best}")
    recorder = EpisodeRecorder()
    test = make_cli(["--config", config, *common, *members, "--data.test_episodes", str(args.test_episodes)], run=False)
    test.trainer.callbacks.append(recorder)
    test.trainer.test(test.model, datamodule=test.datamodule, ckpt_path=best)
    agg, each, weights = torch.cat(recorder.aggregate), torch.cat(recorder.members), torch.cat(recorder.weights)
    logged = {k: v.item() for k, v in test.trainer.callback_metrics.items() if k.startswith("test/")}
    print(f"\nlogged by the test: {logged}\n")
    names = [type(m).__name__ for m in test.model.members]
    print(f"| {args.ways}-way 1-shot, {len(agg)} test episodes | test acc % (95% CI) | mean weight |")
    print("|---|---|---|")
    for i, name in enumerate(names):
        print(f"| {name} (member {i}) | {ci(each[:, i])} | {weights[:, i].mean():.3f} |")
    print(f"| Aggregate ({test.model.weighting} weighting) | {ci(agg)} | |")
    best_i = int(each.mean(0).argmax())
    mean, half, p = paired(agg, each[:, best_i])
    wins, losses = int((agg > each[:, best_i]).sum()), int((agg < each[:, best_i]).sum())
    print(f"\nAggregate minus the best member ({names[best_i]}), paired over the same episodes: "
          f"{100 * mean:+.2f} ± {100 * half:.2f} points (95% CI), p = {p:.3g}; "
          f"better on {wins} episodes, worse on {losses}, equal on {len(agg) - wins - losses}")  # fmt: skip


if __name__ == "__main__":
    main()
