"""The ``lightning-meta`` command: a LightningCLI over every module and datamodule in the packages."""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import datamodules  # noqa: F401  (registers the bundles for short names in YAML)
from datamodules import EpisodicDataModule

from . import EpisodicModule, threads
from .callbacks import EpisodeImages, EpisodesPerSecond, InterruptCheckpoint, default_callbacks
from .precision import default_precision
from .runs import (
    config_differences,
    exit_status,
    fit_summary,
    newest_checkpoint,
    recorded_run,
    resume_version,
    slurm_requeue_checkpoint,
)


class EpisodicCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by ``val/acc`` (or ``val/loss`` for regression data) and the last one.

    File names avoid the ``/`` of the metric names, which would otherwise make folders.
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

    Runs are the ``version_*`` folders under the trainer's log folder. When no run has such a file,
    the FileNotFoundError says what the runs do hold: a run with checkpoints but no ``best-*``
    never validated (``max_steps`` ended before the first epoch's end, or validation was off).
    """
    base, runs = _runs(trainer)
    pattern = "best-*.ckpt" if which == "best" else "last.ckpt"
    for run in runs:
        found = sorted((run / "checkpoints").glob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return str(found[-1])
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


def check_checkpoint_class(ckpt_path: str, configured: str) -> None:
    """Raise ValueError naming both classes unless the checkpoint's class is the configured one or a subclass."""
    from .inference import checkpoint_class, read_checkpoint

    checkpoint = read_checkpoint(ckpt_path)
    if "lightning_meta" not in checkpoint and "_class_path" not in checkpoint.get("hyper_parameters", {}):
        return  # an older checkpoint: the module's on_load_checkpoint decides
    if checkpoint.get("hyper_parameters", {}).get("_class_path") == configured:
        return  # written by the configured class (also a meta-RL module, which is no EpisodicModule)
    written_by = checkpoint_class(checkpoint, ckpt_path)
    module_name, _, class_name = configured.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return  # jsonargparse reports a class it cannot import
    if isinstance(model_class, type) and issubclass(written_by, model_class):
        return
    raise ValueError(
        f"--ckpt_path {ckpt_path} was written by {written_by.__name__} "
        f"({written_by.__module__}.{written_by.__qualname__}) but the model is {model_class.__name__} ({configured}); "
        f"use the config of the algorithm that wrote it (e.g. configs/{written_by.__name__.lower()}/...), or pass "
        "the checkpoint of a matching model"
    )


_RESTRICTIONS = {
    "v>0": "must be a whole number of 1 or more",
    "v>=0": "must be a whole number of 0 or more",
}


def summarize_parse_error(message: str) -> str | None:
    """One line naming the key, the value and what is allowed, from a nested jsonargparse error.

    jsonargparse reports a bad ``--data.ways 0`` as a union of subclass errors whose first line,
    ``Parser key "data": Does not validate against any of the Union subtypes``, names nothing
    useful; the nested lines hold the key (``ways``), the value and the rule. Returns None when the
    message has no such structure (it is then shown as jsonargparse wrote it).
    """
    keys: list[tuple[int, str]] = []
    reason: str | None = None
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip(" -"))
        text = line.strip(" -")
        found = re.match(r'Parser key "([^"]+)":\s*(.*)$', text)
        if found:
            keys = [(i, k) for i, k in keys if i < indent] + [(indent, found.group(1))]
            text = found.group(2)
            if not text:
                continue
        if reason is None or reason.startswith("Does not validate"):
            if text and not text.startswith(("Subtypes:", "Errors:", "Problem with given class_path", "Given value")):
                if not text.startswith("Expected a <class 'NoneType'>"):
                    reason = text
        unaccepted = re.match(r"Option '([^']+)' is not accepted", text)
        if unaccepted:
            keys = [*keys, (indent, unaccepted.group(1))]
            reason = "is not an option of this class; check the spelling (`--help` lists the options)"
            break
    if len(keys) < 2 or reason is None:
        return None
    key = ".".join(k for _, k in keys)
    values = re.findall(r"Given value: NestedArg\(key='[^']*', val='([^']*)'\)", message)
    value = values[-1] if values else None
    rule = next((text for pattern, text in _RESTRICTIONS.items() if f"restriction {pattern}" in reason), None)
    if rule is not None:
        reason = rule
    shown = f"--{key}" if value is None else f"--{key}={value}"
    return f"{shown}: {reason}"


class MetaArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors start with one line that names the key and the fix.

    Instead of the full usage (hundreds of lines for a LightningCLI), an error prints the summary
    from :func:`summarize_parse_error`, jsonargparse's own message below it, and where to get help.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        summary = summarize_parse_error(message)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        if summary is not None:
            sys.stderr.write(f"lightning-meta: error: {summary}\n")
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.write(f"tip: for the accepted options run: {prog} --help\n")
        self.exit(2)


class MetaCLI(LightningCLI):
    """LightningCLI with the defaults few-shot training needs.

    - ``trainer.inference_mode=False``: MAML and Reptile adapt with gradients during evaluation.
    - A checkpoint callback on ``val/acc`` (see :class:`EpisodicCheckpoint`), an
      :class:`~lightning_meta.callbacks.InterruptCheckpoint` (``interrupted.ckpt`` on Ctrl-C) and
      the callbacks of :func:`~lightning_meta.callbacks.default_callbacks` (episode images,
      episodes/s, hp_metric, adaptation curves, divergence guard).
    - ``test``/``validate``/``predict`` accept ``--ckpt_path best`` and ``--ckpt_path last`` in a
      new process (the best or last checkpoint of the newest earlier run in the same log folder),
      and ``fit`` accepts ``--ckpt_path last`` to resume the newest run.
    - ``trainer.precision`` left unset (as the shipped configs leave it) becomes the fast precision
      for this machine (:func:`~lightning_meta.precision.default_precision`: bf16-mixed on a CPU
      with AMX or AVX-512 BF16 and on a bf16 GPU, else 32), logged at start; ``--trainer.precision``
      chooses.
    """

    def before_instantiate_classes(self) -> None:
        rank_zero_info(threads.describe())
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("precision") is not None:
            return
        choice = default_precision(trainer.get("accelerator", "auto"))
        trainer["precision"] = choice.precision
        rank_zero_info(
            f"lightning-meta: precision {choice.precision} ({choice.reason}); set --trainer.precision to choose"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not isinstance(self.model, EpisodicModule):  # meta-RL modules: batches of task parameters, not episodes
            kept = [c for c in trainer.callbacks if not isinstance(c, EpisodeImages | EpisodesPerSecond)]  # type: ignore[attr-defined]
            trainer.callbacks = kept  # type: ignore[attr-defined]
        return trainer

    def _resume_in_place(self) -> None:
        # A fit resumed from a checkpoint of a run folder continues in that folder (same logger
        # version); a requeued SLURM job resumes the run its pre-timeout signal stopped.
        settings = self.config.get("fit") if self.config.get("subcommand") == "fit" else None
        if settings is None:
            return
        if settings.get("ckpt_path") is None:
            requeued = slurm_requeue_checkpoint(settings.get("trainer", {}).get("default_root_dir"))
            if requeued is not None:
                settings["ckpt_path"] = str(requeued)
                rank_zero_info(f"lightning-meta: SLURM requeue: resuming from {requeued}")
        ckpt_path = settings.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        run = recorded_run(ckpt_path)
        logger = settings.get("trainer", {}).get("logger")
        if run is not None and resume_version(logger, run) is not None:
            self._resumed_run = run
            rank_zero_info(f"lightning-meta: resuming in {run} from {ckpt_path}")

    def _parse_ckpt_path(self) -> None:
        self._resume_in_place()
        # LightningCLI replaces the configured model by the class and hyperparameters saved in
        # --ckpt_path: `test --config configs/maml/... --ckpt_path <a ProtoNet checkpoint>` would
        # silently test a ProtoNet. Refuse a checkpoint of a class unrelated to the configured one.
        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        model = settings.get("model") if settings is not None else None
        configured = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if ckpt_path and configured and Path(ckpt_path).is_file():
            check_checkpoint_class(str(ckpt_path), str(configured))
        super()._parse_ckpt_path()

    def _resolve(self, names: tuple[str, ...]) -> None:
        config = self.config_init[self.subcommand]
        which = config.get("ckpt_path")
        if which not in names:
            return
        callback = self.trainer.checkpoint_callback
        known = getattr(callback, "best_model_path" if which == "best" else "last_model_path", "")
        if not known:
            config["ckpt_path"] = find_checkpoint(self.trainer, which)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as stop:  # a fit stopped by SIGTERM or Ctrl-C ends with 128 + the signal number
            status = exit_status(stop, getattr(self, "trainer", None))
            if status is None:
                raise
            raise SystemExit(status) from stop

    def before_fit(self) -> None:
        self._resolve(("last",))
        self._fit_start = time.perf_counter()
        run = getattr(self, "_resumed_run", None)
        saved = Path(run, "config.yaml") if run is not None else None
        if saved is not None and saved.is_file():
            new = yaml.safe_load(self._parser("fit").dump(self.config["fit"], skip_none=False))
            changed = config_differences(yaml.safe_load(saved.read_text()) or {}, new)
            if changed:
                rank_zero_info(
                    f"lightning-meta: warning: resuming {run} with settings that differ from its config.yaml "
                    f"(which this run now overwrites): {'; '.join(changed)}"
                )

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            rank_zero_info(fit_summary(self.trainer, time.perf_counter() - self._fit_start))

    def before_test(self) -> None:
        self._resolve(("best", "last"))

    def before_validate(self) -> None:
        self._resolve(("best", "last"))

    def before_predict(self) -> None:
        self._resolve(("best", "last"))


HELP = (
    "Few-shot meta-learning with PyTorch Lightning. `lightning-meta fit --config configs/<algorithm>/<data>.yaml` "
    "trains; `test`/`validate --ckpt_path best` evaluate; `lightning-meta predict --ckpt_path X --support DIR "
    "--query DIR --output out.csv` classifies your own images (see `lightning-meta predict --help`; with "
    "--config it is Lightning's predict over the datamodule). Set LIGHTNING_META_DEBUG=1 for full tracebacks."
)
PREDICT_HELP = (
    "Lightning's predict over a datamodule (class probabilities from predict_step). Without --config/--model, "
    "`lightning-meta predict --support DIR --query DIR` classifies folders of images instead."
)
DEBUG_VARIABLE = "LIGHTNING_META_DEBUG"
_OUR_PACKAGES = tuple(
    str(Path(p).resolve()) + os.sep for p in (Path(__file__).parent, Path(datamodules.__file__).parent)
)


def _raised_on_purpose(error: BaseException) -> BaseException | None:
    """The error this library raised on purpose behind ``error`` (itself or what it wraps), or None.

    On purpose means a ValueError, FileNotFoundError, ImportError, ... raised by code in the
    ``lightning_meta`` or ``datamodules`` packages (the traceback's last frame is there).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ValueError | LookupError | OSError | ImportError | TypeError | RuntimeError):
            frames = traceback.extract_tb(current.__traceback__)
            if frames and str(Path(frames[-1].filename).resolve()).startswith(_OUR_PACKAGES):
                return current
        current = current.__cause__ or current.__context__
    return None


def _is_folder_predict(argv: list[str]) -> bool:
    """``predict`` with ``--support``, or without a config or model (the Trainer path needs one of those)."""
    if not argv or argv[0] != "predict":
        return False
    options = [a.split("=", 1)[0] for a in argv[1:]]
    if "--support" in options:
        return True
    return not any(o in ("-c", "--config", "--model", "--data") or o.startswith("--model.") for o in options)


def predict_main(args: list[str]) -> None:
    """``lightning-meta predict --ckpt_path X --support DIR --query DIR --output out.csv``: see predict_folders."""
    from jsonargparse import auto_cli

    from .inference import predict_folders

    for i, word in enumerate(args):  # --ckpt_path best / last: the newest run's, as test and validate accept
        which = args[i + 1] if word == "--ckpt_path" and i + 1 < len(args) else word.partition("--ckpt_path=")[2]
        if which in ("best", "last"):
            found = str(newest_checkpoint(which))
            args = [*args[:i], "--ckpt_path", found, *args[i + (2 if word == "--ckpt_path" else 1) :]]
            print(f"lightning-meta predict: --ckpt_path {which} is {found}")
            break
    result = auto_cli(predict_folders, args=args, as_positional=False, prog="lightning-meta predict")
    counted = sum(t is not None and t in result.classes for t in result.true)
    line = f"wrote {len(result.queries)} predictions over {len(result.classes)} classes to {result.output}"
    if result.accuracy is not None:
        line += f"; accuracy {result.accuracy:.3f} on the {counted} queries in class folders"
    print(line)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-meta`` and ``python -m lightning_meta``; ``args`` replaces ``sys.argv``.

    Errors that lightning-meta raises on purpose (a wrong path, a bad setting) print one line,
    ``lightning-meta: error: <message>``, and exit with status 2; ``LIGHTNING_META_DEBUG=1``
    shows the traceback instead.
    """
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if _is_folder_predict(argv):
            predict_main(argv[1:])
        else:
            make_cli(args)
    except Exception as error:
        ours = _raised_on_purpose(error)
        if ours is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"lightning-meta: error: {ours}", file=sys.stderr)
        print(f"lightning-meta: set {DEBUG_VARIABLE}=1 for the traceback", file=sys.stderr)
        raise SystemExit(2) from None


def make_cli(args: list[str] | None = None, run: bool = True) -> MetaCLI:
    """Build (and with ``run``, run) the :class:`MetaCLI`; returns it so tests can inspect the trainer."""
    trainer_defaults: dict[str, Any] = {
        "inference_mode": False,
        "callbacks": [EpisodicCheckpoint(), InterruptCheckpoint(), *default_callbacks()],
    }
    return MetaCLI(
        LightningModule,  # EpisodicModule subclasses, and the meta-RL modules (lightning_meta.rl.MetaRLModule)
        EpisodicDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": HELP, "predict": {"description": PREDICT_HELP}},
        parser_class=MetaArgumentParser,
        args=args,
        run=run,
    )
