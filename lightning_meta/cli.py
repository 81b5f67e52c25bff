"""The ``lightning-meta`` command: a LightningCLI over every module and datamodule in the packages."""

from __future__ import annotations

import difflib
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
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

import datamodules  # noqa: F401  (registers the bundles for short names in YAML)
from datamodules import StreamDataModule
from datamodules.files import atomic_file

from . import threads
from .backbones.inputs import check_backbone_fits_data
from .callbacks import InterruptCheckpoint, default_callbacks, out_of_memory_message
from .checkpoints import (  # noqa: F401  (find_best_checkpoint: its old home)
    TRUST_VARIABLE,
    EpisodicCheckpoint,
    allowed_globals,
    check_class,
    claim_run_folders,
    find_best_checkpoint,
    find_checkpoint,
    read_checkpoint,
    trusting,
    use_safe_checkpoint_io,
)
from .links import link_data_to_model, link_train_classes
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


def check_checkpoint_class(ckpt_path: str, configured: str) -> None:
    """Raise ValueError naming both classes unless the checkpoint's class is the configured one or a subclass."""
    module_name, _, class_name = configured.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return  # jsonargparse reports a class it cannot import
    if isinstance(model_class, type):
        check_class(read_checkpoint(ckpt_path), model_class, f"--ckpt_path {ckpt_path}")


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


_UNKNOWN_CLASS = (
    r"Problem with given class_path '([^']+)':\s*\n\s*(?:module|No module)",
    r"Expected a path but (\S+) either not accessible",
    r"Expected a dot import path string: (\S+)",
)


def _importable(path: str) -> bool:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        return False
    try:
        return hasattr(importlib.import_module(module_name), name)
    except Exception:  # a missing or broken module: not importable
        return False


def known_classes(key: str) -> dict[str, str]:
    """Short name -> import path of the classes lightning-meta offers for ``key`` ("model", "data", else a network)."""
    import datamodules.rl
    import lightning_meta
    import lightning_meta.backbones

    if key in ("optimizer", "lr_scheduler"):
        module = torch.optim if key == "optimizer" else torch.optim.lr_scheduler
        lr = torch.optim.lr_scheduler
        kinds: Any = torch.optim.Optimizer if key == "optimizer" else (lr.LRScheduler, lr.ReduceLROnPlateau)
        names = [n for n in dir(module) if n[:1].isupper() and n not in ("Optimizer", "LRScheduler")]
        return {n: f"{module.__name__}.{n}" for n in names if isinstance(getattr(module, n), type)
                and issubclass(getattr(module, n), kinds)}  # fmt: skip
    base: type
    if key == "data":
        packages, base = [datamodules, datamodules.rl], LightningDataModule
    elif key == "model":
        packages, base = [lightning_meta], LightningModule
    else:
        packages, base = [lightning_meta.backbones], torch.nn.Module
    bases = {*lightning_meta.BASE_CLASSES, "EpisodicDataModule", "StreamDataModule", "TaskDistribution"}
    found: dict[str, str] = {}
    for package in packages:
        for name in getattr(package, "__all__", []):
            value = getattr(package, name, None)
            if isinstance(value, type) and issubclass(value, base) and name not in bases:
                found.setdefault(name, f"{package.__name__}.{name}")
    return found


def summarize_unknown_class(message: str) -> str | None:
    """One line for a class name that cannot be imported: the option, the name, near names and where to look.

    jsonargparse reports ``--model NoSuchNet`` as ``Parser key "model":`` with the reason lines below;
    None when the message is about something else.
    """
    found = None
    for pattern in _UNKNOWN_CLASS:
        for match in re.finditer(pattern, message):
            if not _importable(match.group(1)) and (found is None or match.start() < found.start()):
                found = match
    if found is None:
        return None
    value = found.group(1)
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', message[: found.start()])]
    key = ".".join(dict.fromkeys(keys)) or "model"
    offered = known_classes(keys[-1] if keys else "model")
    short = value.rpartition(".")[2]
    near = difflib.get_close_matches(short, list(offered), n=3, cutoff=0.6)
    near += [n for n in offered if n.lower() == short.lower() and n not in near]
    hint = f"did you mean {' or '.join(offered[n] for n in near)}? " if near else ""
    hint += "known classes: " if hint else "the known classes are "
    module_name = value.rpartition(".")[0]
    if module_name and module_name not in {p.rpartition(".")[0] for p in offered.values()}:
        where = f"'{module_name}' has no such class or cannot be imported"
    else:
        where = "no class of that name is known here"
    listing = ", ".join(sorted(offered))
    return (
        f"--{key}={value}: unknown class ({where}); {hint}{listing}; or give the full "
        "import path of your own class (my_package.MyClass), importable from the current folder or sys.path"
    )


def check_config_files(argv: list[str]) -> None:
    """Raise ValueError naming the file and line of a ``--config`` that is not a YAML mapping of settings.

    jsonargparse reports a tab in the indentation without the file's name, and an empty file as
    ``Unexpected config:`` and nothing more.
    """
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    given += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in given:
        path = Path(name).expanduser()
        if not path.is_file():
            continue  # jsonargparse reports a missing file, and a --config may be YAML text itself
        try:
            text = path.read_text()
            loaded = yaml.safe_load(text)
        except UnicodeDecodeError as err:
            raise ValueError(f"--config {name} is not a text file ({err}); pass a YAML config") from err
        except yaml.YAMLError as err:
            tabbed = next((n for n, line in enumerate(text.splitlines(), 1)
                           if "\t" in line[: len(line) - len(line.lstrip(" \t"))] and line.strip()), None)  # fmt: skip
            if tabbed is not None:
                raise ValueError(
                    f"--config {name}, line {tabbed}: a tab in the indentation; YAML indents with spaces only, "
                    "so replace the tab by spaces"
                ) from err
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"--config {name}{where}: not valid YAML ({problem}); fix the file") from err
        if loaded is None:
            raise ValueError(
                f"--config {name} is empty; give it the settings of a run (model:, data:, trainer:, as in "
                "configs/<algorithm>/*.yaml), or leave --config out"
            )
        if not isinstance(loaded, dict):
            raise ValueError(
                f"--config {name} holds a {type(loaded).__name__}, not settings; a config is a mapping of keys "
                "(model:, data:, trainer:), as in configs/<algorithm>/*.yaml"
            )


#: The Trainer precisions lightning-meta runs: float32 weights, optionally with autocast.
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")


def check_precision(precision: Any) -> None:
    """Refuse, before anything is built, a ``trainer.precision`` whose weights are not float32.

    Batches reach the model as float32 (the datamodules turn uint8 images into floats on the
    device), so float64 or bfloat16 weights ("64", "bf16-true", "16-true") failed inside the first
    convolution with a dtype mismatch.
    """
    if str(precision) in PRECISIONS:
        return
    raise ValueError(
        f"--trainer.precision={precision}: lightning-meta keeps float32 weights and feeds float32 batches, so it "
        f"runs {', '.join(PRECISIONS[::2])} (or their short forms 32, bf16, 16); use bf16-mixed for bfloat16 "
        "speed with float32 weights, or 32-true for full precision"
    )


class MetaArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors start with one line that names the key and the fix.

    Instead of the full usage (hundreds of lines for a LightningCLI), an error prints the summary
    from :func:`summarize_parse_error`, jsonargparse's own message below it, and where to get help.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        summary = summarize_unknown_class(message) or summarize_parse_error(message)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        if summary is not None:
            sys.stderr.write(f"lightning-meta: error: {summary}\n")
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.write(f"tip: for the accepted options run: {prog} --help\n")
        self.exit(2)


#: Data settings that make episodes of another kind: a fit may not resume with them changed.
EPISODE_SETTINGS = ("ways", "shots", "queries", "image_size", "train_ways", "train_shots", "train_queries")
#: The option that lets a fit resume with changed episode settings anyway.
ALLOW_EPISODE_CHANGES = "--allow_episode_changes true"


def check_resumed_episodes(checkpoint: dict[str, Any], data: Any, ckpt_path: str) -> None:
    """Raise ValueError when ``data`` has other episode settings than the data ``checkpoint`` was trained on.

    A resumed fit continues the run's data position and its checkpoints' ranking by ``val/acc``;
    with other ways, shots, queries or image size both would mix two experiments in one run.
    """
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    hparams = getattr(data, "hparams", None) or {}
    for key in EPISODE_SETTINGS:
        if key in saved and key in hparams and saved[key] != hparams[key]:
            raise ValueError(
                f"--data.{key}={hparams[key]} but {ckpt_path} was trained with {key}={saved[key]}; resuming a fit "
                f"with other episodes would mix two experiments in one run; keep --data.{key} {saved[key]}, or start "
                f"a new fit from its weights (e.g. fine-tune in Python after lightning_meta.load_checkpoint), or pass "
                f"{ALLOW_EPISODE_CHANGES} if you really mean to continue this run with other episodes"
            )


class AtomicSaveConfigCallback(SaveConfigCallback):
    """Lightning's SaveConfigCallback, writing ``config.yaml`` atomically (temporary file, fsync, rename).

    A crash or a full disk while it writes leaves the previous ``config.yaml`` (or none), never half of
    one. Remote folders (``s3://``) and multi-file configs keep Lightning's writer.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir or self.multifile or not self.overwrite:
            super().setup(trainer, pl_module, stage)
            return
        log_dir = trainer.log_dir  # broadcast from rank 0: every rank calls it
        if log_dir is None or "://" in log_dir:
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            path = Path(log_dir, self.config_filename)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = self.parser.dump(self.config, skip_none=False)
            with atomic_file(path, "config", text=True) as f:
                f.write(text)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class MetaCLI(LightningCLI):
    """LightningCLI with the defaults few-shot training needs.

    - ``trainer.inference_mode=False``: MAML and Reptile adapt with gradients during evaluation.
    - The data sizes the model (:mod:`lightning_meta.links`): ``ways`` the heads, ``image_size`` and
      ``channels`` the backbones, ``num_train_classes`` the pre-training classifier; a model setting
      that disagrees stops the run at start. ``config.yaml`` is written atomically, and ``fit
      --ckpt_path`` refuses other episode settings than the checkpoint's (``--allow_episode_changes``).
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
        if config.get("model") is not None and config.get("data") is not None:
            link_data_to_model(config["model"], config["data"])  # the data states the shapes once
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("precision") is not None:
            check_precision(trainer.get("precision"))
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
        parser.add_argument(
            "--allow_episode_changes",
            type=bool,
            default=False,
            help="Let `fit --ckpt_path` resume with other episode settings (ways, shots, queries, image_size) than "
            "the checkpoint's; by default that is refused",
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand in (None, "fit"):
            link_train_classes(self.model, self.datamodule)
        backbone = getattr(self.model, "backbone", None)
        if isinstance(backbone, torch.nn.Module):
            check_backbone_fits_data(backbone, self.datamodule)  # an MLP on images, a head built for another size

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_safe_checkpoint_io(trainer)  # checkpoints read as data, written atomically
        claim_run_folders(trainer)  # two fits started at once get two version_* folders
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
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path and not self.config_init["fit"].get("allow_episode_changes") and Path(ckpt_path).is_file():
            check_resumed_episodes(read_checkpoint(ckpt_path), self.datamodule, str(ckpt_path))
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
    "--query DIR --output out.csv` classifies your own images (see `lightning-meta predict --help`). Set "
    "LIGHTNING_META_DEBUG=1 for full tracebacks."
)
#: `predict` with a config: Lightning's predict would have no predict_dataloader and nowhere to write.
PREDICT_WITH_CONFIG = (
    "`lightning-meta predict` classifies folders of your images: `lightning-meta predict --ckpt_path X --support DIR "
    "--query DIR --output out.csv` (see `lightning-meta predict --help`); it takes no --config, --model or --data. "
    "To score a checkpoint on a datamodule's episodes run `lightning-meta test --config <config> --ckpt_path X`"
)
PREDICT_HELP = "Classify folders of images: " + PREDICT_WITH_CONFIG.split(": ", 1)[1]
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


def _end_progress_line() -> None:
    """Close the progress bars an exception left open, so the error starts on a line of its own.

    Lightning's bars write to stdout without a newline until they finish; an error during, say, the
    sanity check was printed at the end of the bar's line.
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = True  # keep what it showed, and end its line
        bar.close()
    sys.stdout.flush()


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
    print(result.summary())


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
        _end_progress_line()
        ours = out_of_memory_message(error) or _raised_on_purpose(error)
        if ours is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"lightning-meta: error: {ours}", file=sys.stderr)
        print(f"lightning-meta: set {DEBUG_VARIABLE}=1 for the traceback", file=sys.stderr)
        raise SystemExit(2) from None


def make_cli(args: list[str] | None = None, run: bool = True) -> MetaCLI:
    """Build (and with ``run``, run) the :class:`MetaCLI`; returns it so tests can inspect the trainer."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "predict" and not _is_folder_predict(argv):
        raise ValueError(PREDICT_WITH_CONFIG)
    check_config_files(argv)
    trainer_defaults: dict[str, Any] = {
        "inference_mode": False,
        "callbacks": [EpisodicCheckpoint(), InterruptCheckpoint(), *default_callbacks()],
    }
    return MetaCLI(
        LightningModule,  # EpisodicModule subclasses, and the meta-RL modules (lightning_meta.rl.MetaRLModule)
        StreamDataModule,  # EpisodicDataModule bundles, and the meta-RL task distributions (datamodules.rl)
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults,
        save_config_callback=AtomicSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": HELP, "predict": {"description": PREDICT_HELP}},
        parser_class=MetaArgumentParser,
        args=args,
        run=run,
    )
