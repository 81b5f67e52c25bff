"""Reproduce the papers' Omniglot rows: train shipped configs to a plateau, across sessions, with a ledger.

    python benchmarks/reproduce.py configs/maml/omniglot_5w1s.yaml configs/maml/omniglot_20w1s.yaml \
        --hours 2.5 --data_root ../shared/data/omniglot --runs ~/lightning-meta-runs
    python benchmarks/reproduce.py --table

Each config trains in its own run folder ``<runs>/<algorithm>_<config name>`` (outside the work tree),
through the same CLI as ``lightning-meta fit``. Calling the command again resumes every unfinished
run exactly from its own checkpoint (``resume.ckpt``, saved at every validation and when the time
budget ends mid-epoch). Configs run one after another within ``--hours``; start two commands for
two runs at once (each takes ``--threads`` CPU threads).

A run is finished when its validation accuracy has plateaued: no new best ``val/acc`` (by more than
``--min_delta``) in the last ``--patience`` validations *and* their mean no higher (by more than
``--min_delta``) than the mean of the ``--patience`` validations before them, or when the config's
``max_epochs`` end. The second test keeps a slow, noisy climb (one-task steps, say) from being
called a plateau because one lucky validation set the best early; a run the older rule (the first
test alone) stopped is reopened when the rule now says it is still climbing. At
the end of every call the best checkpoint so far is tested on the config's fixed test episodes
(1000, the same for every run and machine for a given seed), so an unfinished row is an interim
figure, marked so.

The ledger (``ledger.json``, written atomically) holds the config, each session's wall time,
meta-batches, CPU/GPU, precision, threads and commit, the validation curve (meta-batch, wall
seconds, ``val/acc``, ``val/loss``) and the test results. ``--table`` turns the ledgers into the
markdown table of benchmarks/RESULTS.md with an SVG learning curve per row, and the time each run
took to reach ``--target`` validation accuracy. ``--commit`` copies every ledger (and the resume
checkpoint of unfinished Conv4 runs, a few MB) into ``benchmarks/reproduction/`` so a later session
on a fresh machine picks the runs up where they stopped (a run folder missing on this machine is
seeded from there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "reproduction"
FIGURES = REPO / "benchmarks" / "figures" / "reproduce"
DEFAULT_RUNS = Path(os.environ.get("LIGHTNING_META_RUNS", Path.home() / "lightning-meta-runs"))
# Committed resume checkpoints are for small networks only (the brief: never large weights).
MAX_COMMITTED_CKPT_BYTES = 8 * 2**20

# Published test accuracy (%) and its 95% interval where the paper gives one, per config.
# Finn et al. 2017, Table 1 (MAML, first-order MAML); Li et al. 2017, Table 1 (Meta-SGD); Vinyals et al.
# 2016, Table 1 (Matching Networks); Munkhdalai and Yu 2017, Table 1 (Meta Networks); Raghu et al. 2020,
# Table 2 (ANIL); Antoniou et al. 2019, Table 1 (MAML++); Nichol et al. 2018, Table 1 (Reptile, transductive);
# Snell et al. 2017, Table 1 (ProtoNet).
PUBLISHED: dict[str, tuple[float, float | None, str]] = {
    "maml/omniglot_5w1s": (98.7, 0.4, "Finn et al. 2017"),
    "maml/omniglot_20w1s": (95.8, 0.3, "Finn et al. 2017"),
    "maml/fomaml_omniglot_5w1s": (98.3, 0.5, "Finn et al. 2017"),
    "maml/metasgd_omniglot_5w1s": (99.53, 0.26, "Li et al. 2017"),
    "maml/metasgd_omniglot_20w1s": (95.93, 0.38, "Li et al. 2017"),
    "matchingnet/omniglot_5w1s": (98.1, None, "Vinyals et al. 2016"),
    "matchingnet/omniglot_20w1s": (93.8, None, "Vinyals et al. 2016"),
    "metanetwork/omniglot_5w1s": (98.95, None, "Munkhdalai and Yu 2017"),
    "metanetwork/omniglot_20w1s": (97.00, None, "Munkhdalai and Yu 2017"),
    "anil/omniglot_20w1s": (96.2, 0.5, "Raghu et al. 2020"),
    "mamlpp/omniglot_5w1s": (99.47, None, "Antoniou et al. 2019"),
    "mamlpp/omniglot_20w1s": (97.65, 0.33, "Antoniou et al. 2019"),
    "reptile/omniglot_5w1s": (97.68, 0.04, "Nichol et al. 2018"),
    "reptile/omniglot_20w1s": (89.43, 0.14, "Nichol et al. 2018"),
    "protonet/omniglot_5w1s": (98.8, None, "Snell et al. 2017"),
    "protonet/omniglot_20w1s": (96.0, None, "Snell et al. 2017"),
}


# ---------------------------------------------------------------------------------------------- files
def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def config_key(config: Path) -> str:
    """``maml/omniglot_5w1s`` for ``configs/maml/omniglot_5w1s.yaml``."""
    return f"{config.parent.name}/{config.stem}"


def run_name(config: Path) -> str:
    return config_key(config).replace("/", "_")


def machine() -> dict[str, Any]:
    """What this session runs on: CPU model and its bf16 instructions, GPU, torch and the commit."""
    import torch

    flags = set()
    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = {f for f in ("amx_bf16", "avx512_bf16") if f in text}
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)  # fmt: skip
    return {
        "cpu": model,
        "cpu_bf16": sorted(flags) or ["none"],
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
    }


# ---------------------------------------------------------------------------------------------- training
class BudgetReached(Exception):
    """Raised at a training batch's start once the session's time budget is spent (after saving)."""


def ledger_callback(run_dir: Path, ledger: dict[str, Any], deadline: float, patience: int, min_delta: float,
                    meta_batches: int | None = None):  # fmt: skip
    """The callback that records the validation curve, saves ``resume.ckpt`` and stops the run."""
    import lightning.pytorch as pl

    class RunLedger(pl.Callback):
        def __init__(self) -> None:
            self.session = ledger["sessions"][-1]
            self.wall_before = sum(s["wall_s"] for s in ledger["sessions"][:-1])
            self.start = time.time()
            self.stop_at = None if meta_batches is None else self.session["meta_batches_start"] + meta_batches

        def _save(self, trainer: pl.Trainer) -> None:
            # Trainer.save_checkpoint writes the loops' and the datamodule's state: resuming from it is exact,
            # mid-epoch included (the training episode stream is stateful).
            tmp = run_dir / ".resume.ckpt.tmp"
            trainer.save_checkpoint(tmp, weights_only=False)  # the full state, for an exact resume
            os.replace(tmp, run_dir / "resume.ckpt")
            self.session["meta_batches_end"] = trainer.global_step
            self.session["wall_s"] = round(time.time() - self.start, 1)
            write_json(run_dir / "ledger.json", ledger)

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if time.time() >= deadline or (self.stop_at is not None and trainer.global_step >= self.stop_at):
                self._save(trainer)
                raise BudgetReached(f"budget of this call spent at meta-batch {trainer.global_step}")

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking or trainer.state.fn != "fit":
                return
            metrics = trainer.callback_metrics
            point = {
                "meta_batches": trainer.global_step,
                "wall_s": round(self.wall_before + time.time() - self.start, 1),
                **{k: round(float(metrics[k]), 5) for k in ("val/acc", "val/loss") if k in metrics},
            }
            curve = ledger["curve"]
            if curve and curve[-1]["meta_batches"] == point["meta_batches"]:
                return  # the validation that ended the previous session, repeated on resume
            curve.append(point)
            if plateaued(curve, patience, min_delta):
                ledger["status"] = "plateaued"
                trainer.should_stop = True
            self._save(trainer)

    return RunLedger()


def plateaued(curve: list[dict[str, Any]], patience: int, min_delta: float) -> bool:
    """No new best ``val/acc`` and no rise of the windowed mean (both by ``min_delta``) in ``patience`` validations."""
    accs = [p["val/acc"] for p in curve if "val/acc" in p]
    if len(accs) < 2 * patience:
        return False
    last, before = accs[-patience:], accs[-2 * patience : -patience]
    no_new_best = max(last) <= max(accs[:-patience]) + min_delta
    no_rise = sum(last) / patience <= sum(before) / patience + min_delta
    return no_new_best and no_rise


def unfinished(ledger: dict[str, Any]) -> bool:
    """Still to train: running, or stopped by an older plateau rule that the current one says was early."""
    if ledger["status"] == "plateaued":
        return not plateaued(ledger["curve"], ledger["patience"], ledger["min_delta"])
    return ledger["status"] == "running"


def seed_from_committed(run_dir: Path, name: str) -> None:
    """A run folder missing on this machine starts from the committed ledger and resume checkpoint."""
    ledger = COMMITTED / "ledgers" / f"{name}.json"
    if run_dir.exists() or not ledger.exists():
        return
    run_dir.mkdir(parents=True)
    shutil.copy(ledger, run_dir / "ledger.json")
    ckpt = COMMITTED / "checkpoints" / f"{name}.ckpt"
    if ckpt.exists():
        shutil.copy(ckpt, run_dir / "resume.ckpt")
    print(f"[reproduce] {name}: seeded {run_dir} from benchmarks/reproduction", flush=True)


def common_args(args: argparse.Namespace, run_dir: Path) -> list[str]:
    cli = ["--data.root", args.data_root, "--trainer.enable_progress_bar", "false", *shlex.split(args.cli_args)]
    cli += ["--data.cache_dir", args.cache_dir] if args.cache_dir else []
    return cli + (["--trainer.precision", args.precision] if args.precision else [])


def train(config: Path, args: argparse.Namespace, deadline: float) -> None:
    name = run_name(config)
    run_dir = Path(args.runs).expanduser() / name
    seed_from_committed(run_dir, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = run_dir / "ledger.json"
    ledger: dict[str, Any] = json.loads(ledger_path.read_text()) if ledger_path.exists() else {
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "key": config_key(config), "status": "running", "sessions": [], "curve": [], "tests": [],
        "patience": args.patience, "min_delta": args.min_delta,
    }  # fmt: skip
    if ledger["status"] == "plateaued" and unfinished(ledger):
        ledger["status"] = "running"
        print(f"[reproduce] {name}: reopened, its validation mean was still rising when it stopped", flush=True)
    if ledger["status"] != "running":
        print(f"[reproduce] {name}: {ledger['status']}, nothing to train", flush=True)
        return
    resume = run_dir / "resume.ckpt"
    # run=False: the parser takes no subcommand; the fit is called below with the callback added.
    fit_args = ["--config", str(config), *common_args(args, run_dir)]
    # One TensorBoard run per reproduction, continued across sessions; checkpoints inside it.
    fit_args += ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "tb"]
    fit_args += ["--trainer.logger.init_args.version", "0", "--trainer.default_root_dir", str(run_dir)]
    session = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
               **machine(), "wall_s": 0.0}  # fmt: skip
    cli = cli_for(fit_args, run=False)
    session["precision"] = str(cli.trainer.precision)
    session["meta_batches_start"] = ledger["sessions"][-1].get("meta_batches_end", 0) if ledger["sessions"] else 0
    ledger["sessions"].append(session)
    callback = ledger_callback(run_dir, ledger, deadline, ledger["patience"], ledger["min_delta"], args.meta_batches)
    cli.trainer.callbacks.append(callback)
    print(f"[reproduce] {name}: {'resuming ' + str(resume) if resume.exists() else 'starting'}", flush=True)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(resume) if resume.exists() else None)
        if ledger["status"] == "running":
            ledger["status"] = "max_epochs"
        callback._save(cli.trainer)
    except BudgetReached as stop:
        # The CLI's InterruptCheckpoint saved the same state as resume.ckpt; one resume file per run.
        for stale in (run_dir / "tb" / "version_0" / "checkpoints").glob("interrupted.ckpt"):
            stale.unlink()
        print(f"[reproduce] {name}: {stop}; run the same command again to resume", flush=True)
    write_json(ledger_path, ledger)
    test_best(config, args, run_dir, ledger)


def best_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "tb" / "version_0" / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def test_best(config: Path, args: argparse.Namespace, run_dir: Path, ledger: dict[str, Any]) -> None:
    """Test the best checkpoint on the config's fixed test episodes, unless that checkpoint was tested already."""
    best = best_checkpoint(run_dir)
    if best is None or any(t["checkpoint"] == best.name for t in ledger["tests"]):
        return
    start = time.perf_counter()
    test_args = ["test", "--config", str(config), *common_args(args, run_dir), "--trainer.logger", "false"]
    # Without a logger the CLI's config.yaml goes to default_root_dir: the run folder, not the caller's folder.
    test_args += ["--trainer.default_root_dir", str(run_dir)]
    cli = cli_for([*test_args, "--data.test_episodes", str(args.test_episodes), "--ckpt_path", str(best)])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    step = int(best.stem.split("step")[-1])
    ledger["tests"].append({"checkpoint": best.name, "meta_batches": step, "episodes": args.test_episodes,
                            "precision": str(cli.trainer.precision), "wall_s": round(time.perf_counter() - start, 1),
                            **{k: round(v, 5) for k, v in metrics.items()}})  # fmt: skip
    write_json(run_dir / "ledger.json", ledger)
    print(f"[reproduce] {run_name(config)}: test/acc {metrics.get('test/acc', float('nan')):.4f} "
          f"(best checkpoint at meta-batch {step})", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the table
def svg_curve(curve: list[dict[str, Any]], published: float | None, width: int = 240, height: int = 60) -> str:
    """A small SVG of ``val/acc`` against meta-batches, with the paper's figure as a dashed line."""
    points = [(p["meta_batches"], 100 * p["val/acc"]) for p in curve if "val/acc" in p]
    x_max = max([x for x, _ in points] + [1])
    y_min = min([y for _, y in points] + ([published] if published else []) + [100.0]) - 2
    y_min = max(0.0, min(y_min, 80.0))

    def xy(x: float, y: float) -> str:
        return f"{4 + (width - 8) * x / x_max:.1f},{height - 4 - (height - 8) * (y - y_min) / (100 - y_min):.1f}"

    line = " ".join(xy(x, y) for x, y in points)
    paper = ""
    if published:
        y = xy(0, published).split(",")[1]
        paper = f'<line x1="4" x2="{width - 4}" y1="{y}" y2="{y}" stroke="#888" stroke-dasharray="4 3"/>'
    label = f"val/acc {y_min:.0f}-100%, 0-{x_max} meta-batches"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>'
        f'{paper}<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>'
        f'<text x="6" y="12" font-size="9" fill="#555">{label}</text></svg>\n'
    )


def config_schedule(config: Path) -> str:
    """The config's whole schedule in meta-batches (its header says how it matches the paper's)."""
    import yaml

    if not config.exists():
        return "?"
    conf = yaml.safe_load(config.read_text())
    data = conf["data"]["init_args"]
    per_epoch = data.get("train_episodes", 0) // max(1, data.get("tasks_per_batch", 1))
    return str(conf["trainer"]["max_epochs"] * per_epoch) if per_epoch else "?"


def minutes_to(curve: list[dict[str, Any]], target: float) -> str:
    hit = next((p for p in curve if p.get("val/acc", 0.0) >= target), None)
    return f"{hit['wall_s'] / 60:.0f} (at {hit['meta_batches']})" if hit else "not yet"


def table(ledgers: list[dict[str, Any]], figures: Path, target: float) -> str:
    rows = [
        "| config | status | meta-batches (config's schedule) | hours | best val/acc "
        f"| test/acc ± 95% CI (1000 episodes) | paper | gap | min to val/acc >= {100 * target:.0f}% | curve |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ledger in sorted(ledgers, key=lambda x: x["key"]):
        name = ledger["key"].replace("/", "_")
        published = PUBLISHED.get(ledger["key"])
        (figures / f"{name}.svg").write_text(svg_curve(ledger["curve"], published[0] if published else None))
        steps = max((s.get("meta_batches_end", 0) for s in ledger["sessions"]), default=0)
        schedule = config_schedule(REPO / ledger["config"])
        hours = sum(s["wall_s"] for s in ledger["sessions"]) / 3600
        best_val = max((p.get("val/acc", 0.0) for p in ledger["curve"]), default=0.0)
        test = ledger["tests"][-1] if ledger["tests"] else None
        if test:
            acc, ci = 100 * test["test/acc"], 100 * test.get("test/acc_ci95", 0.0)
            tested = f"{acc:.2f} ± {ci:.2f} (best at {test['meta_batches']})"
        else:
            acc, tested = None, "-"
        paper = (
            f"{published[0]:.2f}" + (f" ± {published[1]:.2f}" if published and published[1] else "")
            if published
            else "-"
        )
        gap = f"{acc - published[0]:+.2f}" if published and acc is not None else "-"
        status = {"running": "not plateaued yet (interim)", "plateaued": "plateaued", "max_epochs": "schedule done"}
        state = status.get(ledger["status"], ledger["status"])
        if ledger["status"] == "plateaued" and unfinished(ledger):
            state = "still rising (reopened, interim)"
        rows.append(
            f"| {ledger['key']} | {state} | {steps} ({schedule}) "
            f"| {hours:.1f} "
            f"| {100 * best_val:.2f} | {tested} | {paper} | {gap} | {minutes_to(ledger['curve'], target)} "
            f"| ![{name}](figures/reproduce/{name}.svg) |"
        )
    return "\n".join(rows) + "\n"


def commit_runs(runs: Path) -> None:
    """Copy ledgers, and the resume checkpoints of unfinished small runs, into benchmarks/reproduction/."""
    (COMMITTED / "ledgers").mkdir(parents=True, exist_ok=True)
    (COMMITTED / "checkpoints").mkdir(parents=True, exist_ok=True)
    for ledger_path in sorted(runs.glob("*/ledger.json")):
        name = ledger_path.parent.name
        shutil.copy(ledger_path, COMMITTED / "ledgers" / f"{name}.json")
        ckpt, kept = ledger_path.parent / "resume.ckpt", COMMITTED / "checkpoints" / f"{name}.ckpt"
        running = unfinished(json.loads(ledger_path.read_text()))
        if running and ckpt.exists() and ckpt.stat().st_size <= MAX_COMMITTED_CKPT_BYTES:
            shutil.copy(ckpt, kept)
        elif not running:
            kept.unlink(missing_ok=True)


def cli_for(args: list[str], run: bool = True):
    """``make_cli(args)`` with this script's own arguments hidden from LightningCLI's look at ``sys.argv``."""
    from lightning_meta.cli import make_cli

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return make_cli(args, run=run)
    finally:
        sys.argv = argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="shipped configs, trained one after another")
    parser.add_argument("--hours", type=float, default=1.0, help="time budget of this call, all configs together")
    parser.add_argument("--meta_batches", type=int, default=None, help="also stop each run after this many more")
    parser.add_argument("--runs", default=str(DEFAULT_RUNS), help="the run folders' parent (outside the work tree)")
    parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for this call")
    parser.add_argument(
        "--precision", default=None, help="trainer.precision; default: the CLI's choice for the machine"
    )
    parser.add_argument("--patience", type=int, default=20, help="validations without a new best before plateau")
    parser.add_argument("--min_delta", type=float, default=0.002, help="val/acc gain that counts as a new best")
    parser.add_argument("--test_episodes", type=int, default=1000)
    parser.add_argument("--cli_args", default="", help="more CLI arguments for every fit and test, one string")
    parser.add_argument("--table", action="store_true", help="write the markdown table and curves from the ledgers")
    parser.add_argument("--commit", action="store_true", help="copy ledgers and small resume checkpoints into the repo")
    parser.add_argument("--target", type=float, default=0.95, help="val/acc for the time-to-accuracy column")
    args = parser.parse_args(argv)
    runs = Path(args.runs).expanduser()
    if args.configs:
        import torch

        torch.set_num_threads(args.threads)
        deadline = time.time() + 3600 * args.hours
        for config in args.configs:
            if time.time() >= deadline:
                break
            train(config.resolve(), args, deadline)
    if args.commit:
        commit_runs(runs)
    if args.table:
        sources = sorted(runs.glob("*/ledger.json")) or sorted((COMMITTED / "ledgers").glob("*.json"))
        ledgers = [json.loads(p.read_text()) for p in sources]
        FIGURES.mkdir(parents=True, exist_ok=True)
        text = table(ledgers, FIGURES, args.target)
        COMMITTED.mkdir(parents=True, exist_ok=True)
        (COMMITTED / "TABLE.md").write_text(text)
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
