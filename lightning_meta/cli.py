"""The ``lightning-meta`` command: a LightningCLI over every module and datamodule in the packages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import datamodules  # noqa: F401  (registers the bundles for short names in YAML)
from datamodules import EpisodicDataModule

from . import EpisodicModule  # noqa: F401
from .callbacks import default_callbacks


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


def find_best_checkpoint(trainer: Trainer) -> str:
    """The best checkpoint of the newest earlier run under the trainer's log folder."""
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
    for run in runs:
        best = sorted((run / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            return str(best[-1])
    raise FileNotFoundError(
        f"--ckpt_path best: no 'best-*.ckpt' under {base}/version_*/checkpoints; run `lightning-meta fit` "
        "with the same config first, or pass the checkpoint's path"
    )


class MetaCLI(LightningCLI):
    """LightningCLI with the defaults few-shot training needs.

    - ``trainer.inference_mode=False``: MAML and Reptile adapt with gradients during evaluation.
    - A checkpoint callback on ``val/acc`` (see :class:`EpisodicCheckpoint`) and the diagnostics of
      :func:`~lightning_meta.callbacks.default_callbacks` (episode images, episodes/s, hp_metric,
      adaptation curves).
    - ``test``/``validate`` accept ``--ckpt_path best`` in a new process: the best checkpoint of
      the newest earlier run in the same log folder.
    """

    def _resolve_best(self) -> None:
        config = self.config_init[self.subcommand]
        callback = self.trainer.checkpoint_callback
        if config.get("ckpt_path") == "best" and not getattr(callback, "best_model_path", ""):
            config["ckpt_path"] = find_best_checkpoint(self.trainer)

    def before_test(self) -> None:
        self._resolve_best()

    def before_validate(self) -> None:
        self._resolve_best()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-meta`` and ``python -m lightning_meta``; ``args`` replaces ``sys.argv``."""
    make_cli(args)


def make_cli(args: list[str] | None = None, run: bool = True) -> MetaCLI:
    """Build (and with ``run``, run) the :class:`MetaCLI`; returns it so tests can inspect the trainer."""
    trainer_defaults: dict[str, Any] = {
        "inference_mode": False,
        "callbacks": [EpisodicCheckpoint(), *default_callbacks()],
    }
    return MetaCLI(
        EpisodicModule,
        EpisodicDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
