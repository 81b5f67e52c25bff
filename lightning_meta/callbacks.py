"""Diagnostics as Lightning callbacks: episode images, ``episodes/s``, ``hp_metric`` and adaptation curves.

The CLI adds :func:`default_callbacks` to every run; from Python, pass them to the Trainer::

    trainer = Trainer(callbacks=[*default_callbacks()], inference_mode=False)

A Trainer without them logs none of these (the module still logs its losses and accuracies).
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

from datamodules.episodes import EpisodeBatch, as_episode_batch

from .base import EpisodeOutput


def episode_grid(batch: EpisodeBatch, task: int = 0, padding: int = 2) -> Tensor | None:
    """One episode as a ``[3, H', W']`` image grid in [0, 1]: a row per class, its support items, a gap, its queries.

    Returns None for episodes that are not images (``[N*K, C, H, W]`` with 1 or 3 channels) with
    integer labels. Images outside [0, 1] (normalised inputs) are rescaled by the episode's range.
    """
    support_x, support_y, query_x, query_y = (part[task].detach() for part in batch)
    if support_x.dim() != 4 or support_x.shape[1] not in (1, 3) or support_y.is_floating_point():
        return None
    support_x, query_x = support_x.float(), query_x.float()
    low, high = torch.minimum(support_x.min(), query_x.min()), torch.maximum(support_x.max(), query_x.max())
    if low < 0 or high > 1:
        support_x, query_x = ((x - low) / (high - low).clamp_min(1e-12) for x in (support_x, query_x))
    ways = int(torch.cat([support_y, query_y]).max()) + 1
    rows = [(support_x[support_y == c], query_x[query_y == c]) for c in range(ways)]
    shots, queries = max(len(s) for s, _ in rows), max(len(q) for _, q in rows)
    columns = shots + 1 + queries  # the blank column between support and queries
    cells = support_x.new_full((ways, columns, *support_x.shape[1:]), 0.5)
    for c, (s, q) in enumerate(rows):
        cells[c, : len(s)], cells[c, shots + 1 : shots + 1 + len(q)] = s, q
    return make_grid(cells.flatten(0, 1), nrow=columns, padding=padding, pad_value=0.5)


class EpisodeImages(pl.Callback):
    """Show the first episode of each validation and test epoch in TensorBoard as ``{stage}/episode``.

    The grid (:func:`episode_grid`) has a row per class: the support items, a blank column, then the
    queries. Logged on global rank 0, outside the sanity check, to TensorBoard loggers only, and
    only for image episodes.
    """

    def _log(self, trainer: pl.Trainer, batch: Any, batch_idx: int, stage: str) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        grid = episode_grid(as_episode_batch(batch)) if loggers else None
        if grid is not None:
            for logger in loggers:
                logger.experiment.add_image(f"{stage}/episode", grid, trainer.global_step)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._log(trainer, batch, batch_idx, "val")

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._log(trainer, batch, batch_idx, "test")


class EpisodesPerSecond(pl.Callback):
    """``episodes/s`` in the progress bar: this process's training episodes over the wall time between steps.

    An exponential moving average over about ten steps; the time spent in validation is left out.

    Args:
        smoothing: weight of the newest step in the moving average.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self._last: float | None = None
        self.rate: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last, self.rate = None, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # the gap since the last epoch's final step holds validation

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # validation inside an epoch (val_check_interval) is not training time

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        tasks = as_episode_batch(batch).num_tasks
        if self._last is not None and now > self._last:
            rate = tasks / (now - self._last)
            self.rate = rate if self.rate is None else (1 - self.smoothing) * self.rate + self.smoothing * rate
            pl_module.log("episodes/s", self.rate, prog_bar=True, logger=False, batch_size=tasks)
        self._last = now


class HpMetric(pl.Callback):
    """``hp_metric``, the metric of TensorBoard's HPARAMS tab.

    During fit it is the best ``val/acc`` so far (lowest ``val/loss`` for regression data); after
    ``validate`` that run's value; after ``test`` the ``test/acc`` (``test/loss``). The best value
    survives a resume (it is saved in the checkpoint).
    """

    def __init__(self) -> None:
        self.best: float | None = None

    @staticmethod
    def _found(trainer: pl.Trainer, stage: str) -> tuple[float, bool] | None:
        for name, higher_is_better in ((f"{stage}/acc", True), (f"{stage}/loss", False)):
            value = trainer.callback_metrics.get(name)
            if value is not None:
                return float(value), higher_is_better
        return None

    def _write(self, trainer: pl.Trainer, value: float) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"hp_metric": value}, step=trainer.global_step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a resumed fit keeps the best of its checkpoint
            self.best = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = None if trainer.sanity_checking else self._found(trainer, "val")
        if found is None:
            return
        value, higher_is_better = found
        if trainer.state.fn != "fit":
            best = value
        elif self.best is None:
            best = self.best = value
        else:
            best = self.best = max(self.best, value) if higher_is_better else min(self.best, value)
        self._write(trainer, best)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = self._found(trainer, "test")
        if found is not None:
            self._write(trainer, found[0])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class AdaptationCurveLogger(pl.Callback):
    """Log the query loss along the inner loop as ``{stage}_adapt/loss_step_<k>`` (epoch means).

    The curve is the :class:`~lightning_meta.base.EpisodeOutput` ``adaptation`` that gradient-based
    algorithms (MAML, Reptile) return in validation and test when their ``adaptation_curve`` is on.
    Steps are zero-padded so TensorBoard lists them in order; the last point is the stage's loss.
    """

    def _log(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, stage: str) -> None:
        out = outputs.get("output") if isinstance(outputs, dict) else None
        curve = out.adaptation if isinstance(out, EpisodeOutput) else None
        if curve is None:
            return
        width = len(str(curve.steps[-1]))
        tasks = as_episode_batch(batch).num_tasks
        for i, step in enumerate(curve.steps):
            pl_module.log(f"{stage}_adapt/loss_step_{step:0{width}d}", curve.losses[:, i].mean(), batch_size=tasks,
                          sync_dist=True)  # fmt: skip

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._log(pl_module, outputs, batch, "val")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._log(pl_module, outputs, batch, "test")


def default_callbacks() -> list[pl.Callback]:
    """The diagnostics the CLI adds to every run: episode images, episodes/s, hp_metric, adaptation curves."""
    return [EpisodeImages(), EpisodesPerSecond(), HpMetric(), AdaptationCurveLogger()]
