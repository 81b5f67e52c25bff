"""A fit's run folder from the command line's side: resume in place, the end-of-fit summary, exit statuses.

A run folder is ``<save_dir>/<name>/version_K`` (the logger's ``log_dir``), holding the events,
``config.yaml`` and ``checkpoints/``. Resuming from a checkpoint of a run continues in that run's
folder (:func:`resume_version`), so TensorBoard shows one run and ``best``/``last`` stay together.
Under SLURM a requeued job resumes the run that the pre-timeout signal stopped
(:func:`slurm_requeue_checkpoint`), through Lightning's own ``SLURMEnvironment``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import EpisodesPerSecond, InterruptCheckpoint

_VERSION = re.compile(r"version_(\d+)")


def recorded_run(ckpt_path: str | Path) -> Path | None:
    """The run folder that wrote ``ckpt_path``: ``<run>/checkpoints/<file>``, else the one the file records.

    :class:`~lightning_meta.callbacks.InterruptCheckpoint` records its run folder in every
    checkpoint, which finds the run of a file saved elsewhere (Lightning's ``hpc_ckpt_*.ckpt``).
    """
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and _VERSION.fullmatch(path.parent.parent.name):
        return path.parent.parent
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception:  # an unreadable file is reported by the load that follows, not here
        return None
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(InterruptCheckpoint.__qualname__) and isinstance(state, dict) and state.get("log_dir"):
            return Path(state["log_dir"])
    return None


def resume_version(logger: Any, run: Path) -> Any:
    """Set the version of a ``{class_path, init_args: {save_dir, name, version}}`` logger config to ``run``'s.

    Only when ``run`` is ``<save_dir>/<name>/version_K`` of that logger: a checkpoint copied
    elsewhere starts a new version as before. Returns the version set, or None.
    """
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    found = _VERSION.fullmatch(run.name)
    if init_args is None or found is None or "version" not in init_args or init_args.get("save_dir") is None:
        return None
    home = Path(init_args["save_dir"], init_args.get("name") or "")
    if home.resolve() != run.parent.resolve():
        return None
    init_args["version"] = int(found.group(1))
    return init_args["version"]


def slurm_requeue_checkpoint(default_root_dir: str | Path | None) -> Path | None:
    """The checkpoint a requeued SLURM job resumes from, or None when this is not a requeued job.

    Lightning's ``SLURMEnvironment`` saves ``hpc_ckpt_<n>.ckpt`` in the Trainer's
    ``default_root_dir`` on the pre-timeout signal (``--signal=SIGUSR1@90``) and requeues the job;
    the ``SIGTERM`` that follows stops the fit at a batch boundary and saves ``interrupted.ckpt``
    in the run folder. The requeued job (``SLURM_RESTART_COUNT`` set) resumes from the newer of
    the two, in the run's own folder.
    """
    if not SLURMEnvironment.detect() or not int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0):
        return None
    folder = Path(default_root_dir or ".")
    saved = [(int(m.group(1)), p) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.search(r"_(\d+)\.ckpt$", p.name))]
    if not saved:
        return None
    hpc = max(saved)[1]
    run = recorded_run(hpc)
    interrupted = run / "checkpoints" / "interrupted.ckpt" if run is not None else None
    if interrupted is not None and interrupted.is_file() and interrupted.stat().st_mtime > hpc.stat().st_mtime:
        return interrupted
    return hpc


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


#: Keys that differ on every resume, by design.
_RESUME_KEYS = ("ckpt_path", "config", "trainer.logger.init_args.version")


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: saved -> new`` for each setting of a resumed fit that differs from the run's ``config.yaml``."""
    old_flat, new_flat = _flat(saved), _flat(new)
    lines = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key in _RESUME_KEYS or key.startswith(tuple(k + "." for k in _RESUME_KEYS)):
            continue
        before, after = old_flat.get(key, "(unset)"), new_flat.get(key, "(unset)")
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


def exit_status(error: BaseException, trainer: pl.Trainer | None) -> int | None:
    """128 + the signal number when ``error`` ends a run stopped by SIGTERM or Ctrl-C, else None.

    Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit`` with status 0) and Ctrl-C
    into ``sys.exit(1)``; a scheduler or shell script would record either as an ordinary end.
    """
    if isinstance(error, SIGTERMException):
        return 128 + signal.SIGTERM
    if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
        return 128 + signal.SIGINT
    for callback in getattr(trainer, "callbacks", []) if trainer is not None else []:
        if isinstance(callback, InterruptCheckpoint) and callback.signal is not None:
            return 128 + int(callback.signal)
    return None


def _score(value: Any) -> str:
    return f"{float(value):.4g}" if value is not None else "?"


def fit_summary(trainer: pl.Trainer, seconds: float) -> str:
    """The lines a fit ends with: run folder, best and last checkpoints, wall time, episodes/s, next commands.

    The suggested ``test`` command names the run's ``config.yaml``, which holds every setting of the
    run, command-line overrides included.
    """
    # The logger's own log_dir: Trainer.log_dir broadcasts, a collective that rank 0 alone must not call.
    log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "")
    last = getattr(callback, "last_model_path", "")
    rate = next((c for c in trainer.callbacks if isinstance(c, EpisodesPerSecond)), None)  # type: ignore[attr-defined]
    speed = f", {rate.episodes / rate.seconds:.1f} episodes/s" if rate is not None and rate.seconds > 0 else ""
    lines = [f"lightning-meta: fit ended at step {trainer.global_step} after {seconds:.1f} s{speed}"]
    if log_dir is not None:
        lines.append(f"  run folder:      {log_dir}")
    if best:
        step = re.search(r"step(?:=)?(\d+)", Path(best).name)
        where = f" at step {step.group(1)}" if step else ""
        monitor, score = getattr(callback, "monitor", None), _score(getattr(callback, "best_model_score", None))
        lines.append(f"  best checkpoint: {best} ({monitor} {score}{where})")
    if last:
        lines.append(f"  last checkpoint: {last}")
    config = Path(log_dir, "config.yaml") if log_dir is not None else None
    if config is not None and config.is_file():
        which = "best" if best else "last"
        lines.append(f"  test it:         lightning-meta test --config {shlex.quote(str(config))} --ckpt_path {which}")
    if log_dir is not None:
        lines.append(f"  watch it:        tensorboard --logdir {shlex.quote(str(Path(log_dir).parent))}")
    return "\n".join(lines)


def newest_checkpoint(which: str, save_dir: str | Path = "lightning_logs") -> Path:
    """``best`` or ``last`` for ``lightning-meta predict`` on folders, which has no config to name a run.

    The newest ``best-*.ckpt`` (or ``last.ckpt``) under ``<save_dir>/<name>/version_*/checkpoints``,
    the runs that ``lightning-meta fit`` wrote from this folder. Raises FileNotFoundError naming the
    folder searched when there is none.
    """
    pattern = "best-*.ckpt" if which == "best" else "last.ckpt"
    found = [p for p in Path(save_dir).glob(f"*/version_*/checkpoints/{pattern}") if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path {which}: no {pattern} under {Path(save_dir).resolve()}/<name>/version_*/checkpoints; run "
            "`lightning-meta fit` from this folder first, or pass the checkpoint's path"
        )
    return max(found, key=lambda p: p.stat().st_mtime)
