"""Checkpoints: record them, resolve ``best``/``last``, check them, and load them as data.

- **Load safely.** Every checkpoint is read with ``torch.load(..., weights_only=True)``: tensors,
  numbers, strings, lists, dicts and the few plain types of :data:`SAFE_GLOBALS`. A file that names
  anything else (a pickled function or class, which unpickling would call) is refused with its
  name and the opt-in: ``--trust_checkpoint true`` on the command line, ``trust=True`` in Python,
  or ``LIGHTNING_META_TRUST_CHECKPOINTS=1`` in the environment, for a user's own older files.
- **Write atomically.** :class:`SafeCheckpointIO` is the Trainer's checkpoint writer and reader in
  the CLI: every ``best-*.ckpt``, ``last.ckpt`` and ``interrupted.ckpt`` is written to a temporary
  file and renamed (:func:`~datamodules.files.atomic_file`), so a full disk leaves the old file.
- **Record.** Every module writes the class that wrote it (:func:`record_class`);
  :class:`EpisodicCheckpoint` keeps the best checkpoint and ``last.ckpt``, the last step that
  finished; :func:`claim_run_folders` gives each run its own ``version_*`` folder.
- **Resolve.** :func:`find_checkpoint` turns ``--ckpt_path best``/``last`` into a file, skipping
  (and naming) empty or truncated ones; :func:`checkpoint_class` names the class of a checkpoint.
- **Check.** :func:`check_class` refuses a checkpoint of an unrelated class (a ProtoNet checkpoint
  into MAML), for the modules, the CLI's ``--ckpt_path`` and :func:`load_checkpoint`'s callers.
- **Load.** :func:`load_checkpoint` rebuilds any checkpoint as its own class, in eval mode: for
  prediction, an RFS teacher and an Aggregate's members.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from datamodules.files import atomic_file

#: The environment variable that, set to 1, lets every checkpoint load run the code it names.
TRUST_VARIABLE = "LIGHTNING_META_TRUST_CHECKPOINTS"
#: The command-line opt-in, for messages.
TRUST_OPTION = "--trust_checkpoint true"

#: Plain types a checkpoint may hold besides what ``weights_only`` accepts by itself: paths (a
#: datamodule's ``root`` given as a ``Path`` in Python ends up in its hyperparameters).
SAFE_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


def trusting() -> bool:
    """Whether the environment opts in to loading checkpoints that run code (:data:`TRUST_VARIABLE`)."""
    return os.environ.get(TRUST_VARIABLE, "") not in ("", "0", "false", "False")


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a legacy (non-zip) file: the error message names the first one
        return []


@contextmanager
def allowed_globals(path: str | Path | None = None, trust: bool = False) -> Iterator[None]:
    """Let ``weights_only`` loads accept :data:`SAFE_GLOBALS`, and with ``trust`` everything ``path`` names.

    For loaders that always pass ``weights_only=True`` themselves (LightningCLI reading the
    hyperparameters of ``--ckpt_path``): trusting a file then means allow-listing its globals.
    """
    allowed = list(SAFE_GLOBALS)
    if trust and path is not None and Path(path).is_file():
        for name in _unsafe_globals(Path(path)):
            module, _, attribute = name.rpartition(".")
            try:
                allowed.append(getattr(importlib.import_module(module), attribute))
            except (ImportError, AttributeError):
                pass  # torch.load names it in its own error
    with torch.serialization.safe_globals(allowed):
        yield


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a complete checkpoint (empty, truncated), or None when it looks whole.

    Cheap: it reads the zip directory at the end of the file, which a save that did not finish
    never wrote; it does not load the tensors.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"truncated or corrupt ({size} bytes, {err})"


def _siblings(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path and checkpoint_problem(p) is None)
    return f"that folder also holds {', '.join(others[:5])}" if others else "pass another checkpoint"


def read_checkpoint(path: str | Path, map_location: Any = "cpu", trust: bool | None = None) -> dict[str, Any]:
    """The checkpoint dict at ``path``, loaded as data (``weights_only``); errors name the file and the fix.

    Raises FileNotFoundError when it is missing, and ValueError when it is empty, truncated or
    corrupt, or when it names code to run (a pickled function or class outside
    :data:`SAFE_GLOBALS`), which is never loaded unless trusted.

    Args:
        path: the ``.ckpt`` file.
        map_location: ``torch.load``'s argument; the CPU by default.
        trust: load whatever the file holds, running the code it names (only for your own files);
            None: as the environment says (:data:`TRUST_VARIABLE`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        hint = "pass the path of a .ckpt file"
        if path.parent.is_dir():
            found = sorted(p.name for p in path.parent.glob("*.ckpt"))
            if found:
                hint = f"that folder holds {', '.join(found[:5])}"
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; {hint}")
    trust = trusting() if trust is None else trust
    if path.stat().st_size == 0:
        raise ValueError(
            f"checkpoint '{path}' is empty (0 bytes): its save did not finish (a full disk or a killed process); "
            f"{_siblings(path)}"
        )
    try:
        with allowed_globals():
            return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"checkpoint '{path}' is corrupt ({err}); {_siblings(path)}") from err
        named = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]
        raise ValueError(
            f"checkpoint '{path}' was not loaded: it names {', '.join(named) or 'a Python object'}, which loading "
            "would import and call, and lightning-meta loads checkpoints as data only (torch.load weights_only). "
            f"If you wrote this file yourself and trust it, pass {TRUST_OPTION} (Python: trust=True, or "
            f"{TRUST_VARIABLE}=1): that runs any code the file holds"
        ) from err
    except (EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"checkpoint '{path}' is truncated or corrupt ({err!r}); {_siblings(path)}") from err
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err):
            raise
        first = str(err).split(". ")[0]
        raise ValueError(
            f"checkpoint '{path}' is truncated or corrupt ({first}): its save did not finish, or the copy is "
            f"incomplete; {_siblings(path)}"
        ) from err


# ----------------------------------------------------------------------------- the class that wrote it
#: Where a checkpoint records the class that wrote it: ``checkpoint[CLASS_KEY]["class_path"]``.
CLASS_KEY = "lightning_meta"


def class_path_of(cls: type) -> str:
    """``module.QualifiedName`` of ``cls``, as checkpoints record it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def record_class(checkpoint: dict[str, Any], module: LightningModule) -> None:
    """Record in ``checkpoint`` the class of ``module`` (from its ``on_save_checkpoint``)."""
    checkpoint[CLASS_KEY] = {"class_path": class_path_of(type(module))}


def recorded_class_path(checkpoint: dict[str, Any]) -> str | None:
    """The class path a checkpoint records: ours, else the ``_class_path`` LightningCLI saves in the hyperparameters."""
    found = checkpoint.get(CLASS_KEY, {}).get("class_path")
    return found if found is not None else checkpoint.get("hyper_parameters", {}).get("_class_path")


def _import_class(class_path: str) -> type | None:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def checkpoint_class(checkpoint: dict[str, Any], path: str | Path = "the checkpoint") -> type[LightningModule]:
    """The LightningModule subclass that wrote ``checkpoint`` (see :func:`recorded_class_path`)."""
    class_path = recorded_class_path(checkpoint)
    if class_path is None:
        raise ValueError(
            f"{path} does not record which class wrote it (written before lightning-meta recorded it, or "
            "not by lightning-meta); load it with its class, e.g. lightning_meta.ProtoNet.load_from_checkpoint(path)"
        )
    cls = _import_class(class_path)
    if cls is None:
        raise ImportError(
            f"{path} was written by {class_path}, which cannot be imported; install or put on sys.path the package "
            "that defines it"
        )
    if not issubclass(cls, LightningModule):
        raise ValueError(f"{path} was written by {class_path}, which is not a LightningModule")
    return cls


def check_class(checkpoint: dict[str, Any], expected: type, what: str = "this checkpoint") -> None:
    """Raise ValueError naming both classes unless ``checkpoint`` was written by ``expected`` or a subclass of it.

    A checkpoint that records no class (written before classes were recorded) passes. ``what``
    names the checkpoint in the message (``"--ckpt_path X"``).
    """
    written_by = recorded_class_path(checkpoint)
    if written_by is None or any(class_path_of(c) == written_by for c in expected.__mro__):
        return
    writer = _import_class(written_by)
    if writer is not None and issubclass(writer, expected):
        return
    name = written_by.rpartition(".")[2]
    raise ValueError(
        f"{what} was written by {name} ({written_by}) but the model is {expected.__name__} "
        f"({class_path_of(expected)}); use the config of the algorithm that wrote it (e.g. configs/{name.lower()}/"
        "...), or load it as its own class with lightning_meta.load_checkpoint(path)"
    )


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", trust: bool | None = None, **overrides: Any
) -> LightningModule:
    """Load any lightning-meta checkpoint as its own class, in eval mode.

    The class comes from the checkpoint (see :func:`checkpoint_class`); the backbone, optimizer and
    scheduler are rebuilt from the ``class_path``/``init_args`` hyperparameters that the CLI saved.
    A checkpoint written outside the CLI does not hold its backbone: pass it as an override, e.g.
    ``load_checkpoint(path, backbone=Conv4())``.

    Args:
        path: the ``.ckpt`` file.
        map_location: where to put the weights (``torch.load``'s argument); the CPU by default.
        trust: load a file that names Python code to run (only your own files; see
            :func:`read_checkpoint`); None: as :data:`TRUST_VARIABLE` says.
        overrides: constructor arguments that replace the saved hyperparameters.
    """
    trust = trusting() if trust is None else trust
    cls = checkpoint_class(read_checkpoint(path, trust=trust), path)
    try:
        with allowed_globals():
            model = cls.load_from_checkpoint(
                str(Path(path).expanduser()), map_location=map_location, weights_only=not trust, **overrides
            )
    except TypeError as err:
        if "backbone" in str(err):
            raise ValueError(
                f"{path} was written outside the lightning-meta CLI, so its hyperparameters do not hold the "
                f"backbone; pass it: load_checkpoint(path, backbone=Conv4(...)) with the one it was trained with"
            ) from err
        raise
    return model.eval()


class SafeCheckpointIO(TorchCheckpointIO):
    """The Trainer's checkpoint reader and writer in the CLI: loads as data, writes atomically.

    Loading goes through :func:`read_checkpoint` (``weights_only``, the file named in every error;
    ``weights_only=False`` passed to ``Trainer.fit`` counts as trusting the file). Saving writes a
    temporary file beside the target, fsyncs and renames it: an interrupted or failed save (a full
    disk) leaves the previous file, never half of one, and its error names the file and the free
    space.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        if "://" in str(path):  # a remote file system (s3://...): Lightning's writer
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_file(path, "checkpoint") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        trust = True if weights_only is False else None
        return read_checkpoint(path, map_location=map_location, trust=trust)


def use_safe_checkpoint_io(trainer: Trainer) -> None:
    """Make :class:`SafeCheckpointIO` the trainer's checkpoint reader and writer, unless one was chosen."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's plugin
        strategy.checkpoint_io = SafeCheckpointIO()


class EpisodicCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by ``val/acc`` (or ``val/loss`` for regression data) and the last one.

    File names avoid the ``/`` of the metric names, which would otherwise make folders.
    ``last.ckpt`` always holds the last step that finished: it is written at every validation and
    epoch end and when training ends, not only when the monitored metric improves (Lightning 2.6
    writes it only beside a new best).
    """

    def __init__(self) -> None:
        super().__init__(
            monitor="val/acc",
            mode="max",
            filename="best-epoch{epoch:03d}-step{step}",
            auto_insert_metric_name=False,
            save_last=True,
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if getattr(getattr(trainer, "datamodule", None), "task", "classification") == "regression":
            self.monitor, self.mode, self.kth_value = "val/loss", "min", torch.tensor(torch.inf)
        monitor = getattr(pl_module, "checkpoint_monitor", None)  # meta-RL modules: ("val/return", "max")
        if monitor is not None:
            self.monitor, self.mode = monitor
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # An epoch resumed mid-way ends before any validation of this process ran: there is nothing
        # to rank yet, and Lightning's "could not find the monitored key" warning would be noise.
        if self.monitor not in monitor_candidates and not trainer.fit_loop.epoch_loop.val_loop._has_run:
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_if_behind(self, trainer: Trainer) -> None:
        # Skipped in fast_dev_run, outside fit, in the sanity check, and when this step was saved already.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # Lightning saves either at validation ends or at training epoch ends (when validation runs once
    # per epoch, before the epoch's end); last.ckpt follows the same choice, after the best.
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)


def claim_run_folders(trainer: Trainer) -> None:
    """Give this run a ``version_*`` folder no other run has, by creating it exclusively.

    A logger picks ``version_<n+1>`` by listing the folder, so two fits started at once with the
    same ``save_dir`` and ``name`` both pick the same one. Here the logger's choice is made by
    ``mkdir`` (which only one process can win) when it first asks for its version; a logger whose
    version is already set (a given ``version``, a resumed run) is left alone, and so are the
    processes of rank above 0, which write nothing there.
    """
    logger = trainer.logger
    choose: Callable[[], int] | None = getattr(logger, "_get_next_version", None)
    if logger is None or choose is None or getattr(logger, "_version", None) is not None:
        return
    root_dir = str(getattr(logger, "root_dir", ""))
    if not root_dir or "://" in root_dir:  # a remote file system: its logger decides
        return

    def claim() -> int:
        version = choose()
        if getattr(rank_zero_only, "rank", 0) != 0:
            return version
        root = Path(root_dir)
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (root / f"version_{version}").mkdir()
                return version
            except FileExistsError:  # another run took it between the listing and now
                version += 1

    setattr(logger, "_get_next_version", claim)  # noqa: B010  (an instance attribute shadows the method)


def _runs(trainer: Trainer) -> tuple[Path, list[Path]]:
    """The trainer's log folder and its ``version_*`` runs, newest first."""
    logger = trainer.logger
    if logger is not None:
        base = Path(logger.save_dir or trainer.default_root_dir, logger.name or "")
    else:
        base = Path(trainer.default_root_dir, "lightning_logs")
    runs = sorted(
        (p for p in base.glob("version_*") if re.fullmatch(r"version_\d+", p.name)),
        key=lambda p: int(p.name.split("_")[1]),
        reverse=True,
    )
    return base, runs


def find_checkpoint(trainer: Trainer, which: str = "best") -> str:
    """The ``best-*.ckpt`` (``which="best"``) or ``last.ckpt`` (``"last"``) of the newest earlier run with one.

    Runs are the ``version_*`` folders under the trainer's log folder. Empty or truncated files (a
    save that did not finish) are skipped, with a warning naming them. When no run has such a
    file, the FileNotFoundError says what the runs do hold: a run with checkpoints but no
    ``best-*`` never validated (``max_steps`` ended before the first epoch's end, or validation
    was off).
    """
    base, runs = _runs(trainer)
    pattern = "best-*.ckpt" if which == "best" else "last.ckpt"
    skipped: list[str] = []
    for run in runs:
        found = sorted((run / "checkpoints").glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in found:
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped:
                    rank_zero_warn(f"--ckpt_path {which}: skipped {'; '.join(skipped)}; using {path}")
                return str(path)
            skipped.append(f"{path} ({problem})")
    if skipped:
        raise FileNotFoundError(
            f"--ckpt_path {which}: every candidate under {base} is unreadable: {'; '.join(skipped)}; their saves did "
            "not finish (a full disk or a killed process): pass another checkpoint's path, or fit again"
        )
    held = next((run for run in runs if any((run / "checkpoints").glob("*.ckpt"))), None)
    if held is None:
        raise FileNotFoundError(
            f"--ckpt_path {which}: no checkpoint under {base}/version_*/checkpoints; run `lightning-meta fit` "
            "with the same config first, or pass the checkpoint's path"
        )
    files = ", ".join(sorted(p.name for p in (held / "checkpoints").glob("*.ckpt")))
    if which == "best":
        raise FileNotFoundError(
            f"--ckpt_path best: the newest run with checkpoints, {held}, has {files} but no 'best-*.ckpt': no "
            "validation ran during its fit (e.g. --trainer.max_steps ended before the first epoch's end, or "
            "limit_val_batches=0), so no best checkpoint was chosen; lower --data.train_episodes so an epoch ends "
            "within max_steps, or use --ckpt_path last, or pass a checkpoint's path"
        )
    raise FileNotFoundError(
        f"--ckpt_path last: the newest run with checkpoints, {held}, has {files} but no last.ckpt; pass a "
        "checkpoint's path"
    )


def find_best_checkpoint(trainer: Trainer) -> str:
    """The best checkpoint of the newest earlier run under the trainer's log folder (see :func:`find_checkpoint`)."""
    return find_checkpoint(trainer, "best")


__all__ = [
    "CLASS_KEY",
    "SAFE_GLOBALS",
    "TRUST_VARIABLE",
    "EpisodicCheckpoint",
    "SafeCheckpointIO",
    "allowed_globals",
    "check_class",
    "checkpoint_class",
    "checkpoint_problem",
    "claim_run_folders",
    "find_best_checkpoint",
    "find_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "record_class",
    "recorded_class_path",
    "trusting",
    "use_safe_checkpoint_io",
]
