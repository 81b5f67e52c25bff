"""Thread policies of the ``lightning-meta`` command, idle and with the cores busy (issue 29, point 4).

Each workload is a real ``lightning-meta fit`` subprocess, timed from start to exit (wall seconds
and CPU seconds of the process and its children):

- ``quickstart``: the README's Quick start, ``fit --config configs/maml/sinusoid.yaml``, with the
  progress bar and the logger off (``--steps`` shortens it; 0 runs the whole config);
- ``protonet`` and ``maml``: short fits of ProtoNet and MAML on the real Omniglot
  (``$LIGHTNING_META_DATA/omniglot``, its cache built once before timing).

Policies (environment of the subprocess): ``torch`` (torch's and OpenMP's defaults:
``LIGHTNING_META_THREAD_POLICY=torch``), ``passive`` (``OMP_WAIT_POLICY=PASSIVE``), ``one``
(``OMP_NUM_THREADS=1``) and ``shipped`` (no variable: what the command does by default).

Machine states: ``idle`` (the run alone) and ``busy`` (a second identical run started at the
same moment, so both cores are busy; the two are timed and their median kept). Each cell is the
median of ``--repeats`` runs; policies alternate within a repeat (paired). Prints a Markdown
table and the command that made it::

    python benchmarks/threads.py                   # the full table (about an hour on 2 cores)
    python benchmarks/threads.py --quick           # proves it runs: tiny fits, one repeat
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_META_DATA", REPO.parent / "shared" / "data"))
POLICIES = {
    "torch": {"LIGHTNING_META_THREAD_POLICY": "torch"},
    "passive": {"LIGHTNING_META_THREAD_POLICY": "torch", "OMP_WAIT_POLICY": "PASSIVE"},
    "one": {"LIGHTNING_META_THREAD_POLICY": "torch", "OMP_NUM_THREADS": "1"},
    "shipped": {},
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.precision", "32"]


def workloads(steps: int, cache: Path) -> dict[str, list[str]]:
    omniglot = ["--data.root", str(DATA / "omniglot"), "--data.cache_dir", str(cache), "--data.val_episodes", "10"]
    limit = ["--trainer.max_steps", str(steps)] if steps else []
    maml_steps = str(max(1, (steps or 100) // 5))  # 32 tasks a step
    return {
        "quickstart": ["fit", "--config", str(REPO / "configs/maml/sinusoid.yaml"), *limit],
        "protonet": ["fit", "--config", str(REPO / "configs/protonet/omniglot_5w1s.yaml"), *omniglot,
                     "--trainer.max_steps", str(steps or 100)],
        "maml": ["fit", "--config", str(REPO / "configs/maml/omniglot_5w1s.yaml"), *omniglot,
                 "--model.init_args.task_batching", "loop", "--trainer.max_steps", maml_steps],
    }  # fmt: skip


def environment(policy: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LIGHTNING_META_THREAD"))}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**base, **POLICIES[policy]}


def start(args: list[str], policy: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightning_meta", *args, *QUIET], cwd=cwd, env=environment(policy),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def wait(process: subprocess.Popen, began: float) -> tuple[float, float]:
    """Wall and CPU seconds of a process started at ``began`` (os.wait4 counts its own children too)."""
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"a run failed (status {process.returncode}): {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def timed(args: list[str], policy: str, busy: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        cwds = [Path(folder, "a"), Path(folder, "b")]
        for cwd in cwds:
            cwd.mkdir()
        began = time.perf_counter()
        runs = [start(args, policy, cwd) for cwd in cwds[: 2 if busy else 1]]
        results = [wait(run, began) for run in runs]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["quickstart", "protonet", "maml"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--states", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="max_steps of each fit (0: the whole Quick start)")
    parser.add_argument("--quick", action="store_true", help="tiny fits, one repeat: check that the script runs")
    options = parser.parse_args()
    if options.quick:
        options.repeats, options.steps = 1, options.steps or 5
    with tempfile.TemporaryDirectory() as cache:
        chosen = {k: v for k, v in workloads(options.steps, Path(cache)).items() if k in options.workloads}
        if any(k in chosen for k in ("protonet", "maml")):  # build the Omniglot cache outside the timings
            subprocess.run([sys.executable, "-m", "lightning_meta", *chosen.get("protonet", chosen.get("maml", [])),
                            *QUIET, "--trainer.max_steps", "1"], cwd=cache, env=environment("shipped"), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        cells: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for _ in range(options.repeats):
            for name, args in chosen.items():
                for state in options.states:
                    for policy in options.policies:
                        result = timed(args, policy, state == "busy")
                        cells.setdefault((name, state, policy), []).append(result)
                        print(f"{name:10} {state:4} {policy:8} {result[0]:7.1f} s wall {result[1]:7.1f} CPU-s",
                              file=sys.stderr, flush=True)  # fmt: skip
    print(f"\n`{' '.join(['python', 'benchmarks/threads.py', *sys.argv[1:]])}` on {os.cpu_count()} CPUs, "
          f"median of {options.repeats} (wall s, CPU-s in brackets):\n")  # fmt: skip
    print("| workload | state | " + " | ".join(options.policies) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in options.policies) + " |")
    for name in chosen:
        for state in options.states:
            row = []
            for policy in options.policies:
                runs = cells[(name, state, policy)]
                wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                row.append(f"{wall:.1f} ({cpu:.0f})")
            print(f"| {name} | {state} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
