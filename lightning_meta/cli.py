"""The ``lightning-meta`` command: a LightningCLI over every module and datamodule in the packages."""

from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import datamodules  # noqa: F401  (registers the bundles for short names in YAML)
from datamodules import EpisodicDataModule

from . import EpisodicModule
from .callbacks import EpisodeImages, EpisodesPerSecond, InterruptCheckpoint, default_callbacks, out_of_memory_message
from .checkpoints import (  # noqa: F401  (find_best_checkpoint: its old home)
    TRUST_VARIABLE,
    EpisodicCheckpoint,
    allowed_globals,
    claim_run_folders,
    find_best_checkpoint,
    find_checkpoint,
    trusting,
    use_safe_checkpoint_io,
)
from .precision import default_precision


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
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("precision") is not None:
            return
        choice = default_precision(trainer.get("accelerator", "auto"))
        trainer["precision"] = choice.precision
        rank_zero_info(
            f"lightning-meta: precision {choice.precision} ({choice.reason}); set --trainer.precision to choose"
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--trust_checkpoint",
            type=bool,
            default=False,
            help=f"Load checkpoints that name Python code to run (your own older files); by default checkpoints "
            f"are loaded as data only and such a file is refused. Same as {TRUST_VARIABLE}=1",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_safe_checkpoint_io(trainer)  # checkpoints read as data, written atomically
        claim_run_folders(trainer)  # two fits started at once get two version_* folders
        if not isinstance(self.model, EpisodicModule):  # meta-RL modules: batches of task parameters, not episodes
            kept = [c for c in trainer.callbacks if not isinstance(c, EpisodeImages | EpisodesPerSecond)]  # type: ignore[attr-defined]
            trainer.callbacks = kept  # type: ignore[attr-defined]
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the configured model by the class and hyperparameters saved in
        # --ckpt_path: `test --config configs/maml/... --ckpt_path <a ProtoNet checkpoint>` would
        # silently test a ProtoNet. Refuse a checkpoint of a class unrelated to the configured one.
        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        model = settings.get("model") if settings is not None else None
        configured = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if settings is not None and settings.get("trust_checkpoint"):
            os.environ[TRUST_VARIABLE] = "1"  # for every load of this run (and its DDP processes)
        if ckpt_path and configured and Path(ckpt_path).is_file():
            check_checkpoint_class(str(ckpt_path), str(configured))
        with allowed_globals(ckpt_path, trust=trusting()):  # LightningCLI reads the hyperparameters weights_only
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

    def before_fit(self) -> None:
        self._resolve(("last",))

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
        ours = out_of_memory_message(error) or _raised_on_purpose(error)
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
