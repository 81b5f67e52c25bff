"""MAML-TRPO on 2D navigation: ours (MAMLRL) against learn2learn's own ``examples/rl/maml_trpo.py``, same budget.

    python benchmarks/maml_rl_navigation.py --iterations 100 \
        --learn2learn_python /path/to/venv/bin/python --learn2learn_examples /path/to/learn2learn/examples/rl
    python benchmarks/maml_rl_navigation.py --iterations 2 --tasks 2 --trajectories 2   # smoke, ours only

Both: 2 x 100 Gaussian MLP policy (ours tanh as in Finn et al.; the example's ReLU), meta-batch
``--tasks`` goals, ``--trajectories`` episodes per task of at most 100 steps (the example's
Particles2D also ends an episode within 0.01 of the goal), one inner policy-gradient step with lr
0.1, linear feature baseline, GAE (the example's gamma 0.95, lambda 1.0), TRPO meta-update with
max KL 0.01. Ours runs under the Lightning Trainer in this process (torch's threads); the example
runs unchanged in a subprocess with ``--learn2learn_workers`` environment processes. Printed: the
post-adaptation return per meta-iteration (compare Finn et al. 2017, Figure 5) and the wall time
per meta-iteration of each, as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time

import lightning.pytorch as pl
import torch

from datamodules.rl import Navigation2D
from lightning_meta.algorithms.maml_rl import MAMLRL


class Curve(pl.Callback):
    """Post-adaptation return and wall time of each meta-iteration."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        post = float(trainer.callback_metrics["train/return_post"])
        self.rows.append((len(self.rows), post, time.perf_counter() - self._start))


def ours(iterations: int, tasks: int, trajectories: int, gamma: float) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    data = Navigation2D(
        tasks_per_batch=tasks, train_episodes=tasks * iterations, val_episodes=tasks, test_episodes=tasks
    )
    model = MAMLRL(trajectories=trajectories, inner_lr=0.1, outer="trpo", max_kl=0.01, gamma=gamma)
    curve = Curve()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, inference_mode=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=[curve],
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    return curve.rows


LEARN2LEARN_RUNNER = """
import sys, torch
# cherry-rl 0.1.4's LinearValue calls torch.lstsq, which torch 2 removed: the same least squares.
torch.lstsq = lambda b, A: (torch.linalg.lstsq(A, b).solution, None)
sys.path.insert(0, sys.argv[1])
import maml_trpo
maml_trpo.main(num_iterations=int(sys.argv[2]), meta_bsz=int(sys.argv[3]), adapt_bsz=int(sys.argv[4]),
               num_workers=int(sys.argv[5]), seed=42)
"""


def learn2learn_maml_trpo(
    python: str, examples: str, iterations: int, tasks: int, trajectories: int, workers: int
) -> list[tuple[int, float, float]]:
    """learn2learn's own ``examples/rl/maml_trpo.py``, unchanged, in a subprocess: its printed rewards, timed.

    ``examples`` is a learn2learn checkout's ``examples/rl`` folder; ``python`` an interpreter with
    learn2learn 0.2.0, ``gym==0.22.0`` and ``cherry-rl==0.1.4`` (the example's API; newer gym drops
    ``gym.wrappers.Monitor``, which cherry imports). The example prints ``adaptation_reward`` (the
    mean post-adaptation return) after sampling each meta-iteration; the time between two prints is
    one meta-iteration (the TRPO step of one, the sampling of the next).
    """
    command = [python, "-u", "-c", LEARN2LEARN_RUNNER, examples, str(iterations), str(tasks), str(trajectories),
               str(workers)]  # fmt: skip
    rows: list[tuple[int, float, float]] = []
    last = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True) as process:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith("adaptation_reward"):
                    now = time.perf_counter()
                    rows.append((len(rows), float(line.split()[1]), now - last))
                    last = now
        if process.returncode != 0 or len(rows) != iterations:
            errors.seek(0)
            raise RuntimeError(f"learn2learn's maml_trpo.py failed (exit {process.returncode}, {len(rows)} "
                               f"iterations); the end of its stderr:\n{errors.read()[-3000:]}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--trajectories", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=0.95, help="discount (the learn2learn example's 0.95)")
    parser.add_argument("--learn2learn_python", help="interpreter with learn2learn, gym==0.22.0, cherry-rl==0.1.4")
    parser.add_argument("--learn2learn_examples", help="a learn2learn checkout's examples/rl folder")
    parser.add_argument("--learn2learn_workers", type=int, default=2, help="the example's environment processes")
    parser.add_argument("--every", type=int, default=10, help="print every this many meta-iterations")
    args = parser.parse_args()
    runs = {"ours (MAMLRL, TRPO)": ours(args.iterations, args.tasks, args.trajectories, args.gamma)}
    if args.learn2learn_python and args.learn2learn_examples:
        runs["learn2learn examples/rl/maml_trpo.py"] = learn2learn_maml_trpo(
            args.learn2learn_python, args.learn2learn_examples, args.iterations, args.tasks, args.trajectories,
            args.learn2learn_workers,
        )  # fmt: skip
    names = list(runs)
    print("| meta-iteration | " + " | ".join(f"{n}: post-adaptation return" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for i in range(args.iterations):
        if i % args.every == 0 or i == args.iterations - 1:
            print(f"| {i} | " + " | ".join(f"{runs[n][i][1]:.2f}" for n in names) + " |")
    print("\n| implementation | wall s / meta-iteration (mean of 1..end) | ratio to ours |")
    print("|---|---|---|")
    mean = {n: statistics.mean(r[2] for r in runs[n][1:]) for n in names}
    for n in names:
        print(f"| {n} | {mean[n]:.2f} | {mean[n] / mean[names[0]]:.2f}x |")


if __name__ == "__main__":
    main()
