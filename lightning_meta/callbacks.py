"""Diagnostics and safety nets as Lightning callbacks.

Episode images, ``episodes/s``, ``hp_metric``, adaptation curves, and :class:`DivergenceGuard`,
which stops a run whose loss becomes non-finite or explodes. :class:`InterruptCheckpoint` saves a
checkpoint when a fit is interrupted (Ctrl-C) that resumes exactly.

The CLI adds :func:`default_callbacks` (and an :class:`InterruptCheckpoint`) to every run; from
Python, pass them to the Trainer::

    trainer = Trainer(callbacks=[*default_callbacks(), InterruptCheckpoint()], inference_mode=False)

A Trainer without them logs none of these (the module still logs its losses and accuracies).
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torchvision.utils import make_grid

from datamodules.episodes import EpisodeBatch, as_episode_batch, episode_ways
from datamodules.files import format_bytes

from .outputs import EpisodeOutput


def episode_grid(batch: EpisodeBatch, task: int = 0, padding: int = 2) -> Tensor | None:
    """One episode as a ``[3, H', W']`` image grid in [0, 1]: a row per class, its support items, a gap, its queries.

    Returns None for episodes that are not images (``[N*K, C, H, W]`` with 1 or 3 channels) with
    integer labels. Images outside [0, 1] (normalised inputs) are rescaled by the episode's range.
    """
    support_x, support_y, query_x, query_y = (part[task].detach() for part in batch.tensors)
    if support_x.dim() != 4 or support_x.shape[1] not in (1, 3) or support_y.is_floating_point():
        return None
    support_x, query_x = support_x.float(), query_x.float()
    low, high = torch.minimum(support_x.min(), query_x.min()), torch.maximum(support_x.max(), query_x.max())
    if low < 0 or high > 1:
        support_x, query_x = ((x - low) / (high - low).clamp_min(1e-12) for x in (support_x, query_x))
    ways = batch.ways or int(torch.cat([support_y, query_y]).max()) + 1
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
    ``episodes`` and ``seconds`` total the timed steps of the fit (the CLI's end-of-fit summary).

    Args:
        smoothing: weight of the newest step in the moving average.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self._last: float | None = None
        self.rate: float | None = None
        self.episodes, self.seconds = 0, 0.0  # totals over this fit's timed steps (the end-of-fit summary)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last, self.rate = None, None
        self.episodes, self.seconds = 0, 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # the gap since the last epoch's final step holds validation

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # validation inside an epoch (val_check_interval) is not training time

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not (isinstance(batch, EpisodeBatch) or (isinstance(batch, tuple | list) and len(batch) == 4)):
            return  # labelled pre-training batches (Baseline, RFS) hold images, not episodes
        now = time.perf_counter()
        tasks = as_episode_batch(batch).num_tasks
        if self._last is not None and now > self._last:
            rate = tasks / (now - self._last)
            self.episodes, self.seconds = self.episodes + tasks, self.seconds + now - self._last
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

    The curve is the :class:`~lightning_meta.outputs.EpisodeOutput` ``adaptation`` that gradient-based
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


class DivergenceError(RuntimeError):
    """Raised by :class:`DivergenceGuard` when the loss becomes non-finite or explodes."""


#: The ``inner_lr`` of the shipped config of each (module, data) pair, for :class:`DivergenceGuard`'s
#: message. Library code never reads the repository's ``configs/`` (a wheel install has none);
#: ``tests/test_configs_table.py`` checks this table against them.
SHIPPED_INNER_LR: dict[tuple[str, str], tuple[str, float]] = {
    ("ANIL", "CIFARFS"): ("configs/anil/cifarfs_5w1s.yaml", 0.01),
    ("ANIL", "FC100"): ("configs/anil/fc100_5w1s.yaml", 0.01),
    ("ANIL", "MiniImageNet"): ("configs/anil/miniimagenet_5w1s.yaml", 0.01),
    ("ANIL", "Omniglot"): ("configs/anil/omniglot_20w1s.yaml", 2.0),
    ("MAML", "CIFARFS"): ("configs/maml/cifarfs_5w1s.yaml", 0.01),
    ("MAML", "CUB"): ("configs/maml/cub_5w1s.yaml", 0.01),
    ("MAML", "FC100"): ("configs/maml/fc100_5w1s.yaml", 0.01),
    ("MAML", "Omniglot"): ("configs/maml/fomaml_omniglot_5w1s.yaml", 0.4),
    ("MAML", "EpisodicImageFolder"): ("configs/maml/imagefolder_5w1s.yaml", 0.01),
    ("MAML", "Learn2LearnTasks"): ("configs/maml/learn2learn_miniimagenet_5w1s.yaml", 0.01),
    ("MAML", "MiniImageNet"): ("configs/maml/miniimagenet_5w1s.yaml", 0.01),
    ("MAML", "Sinusoid"): ("configs/maml/sinusoid.yaml", 0.01),
    ("MAML", "TieredImageNet"): ("configs/maml/tieredimagenet_5w1s.yaml", 0.01),
    ("Reptile", "CIFARFS"): ("configs/reptile/cifarfs_5w1s.yaml", 0.001),
    ("Reptile", "CUB"): ("configs/reptile/cub_5w1s.yaml", 0.001),
    ("Reptile", "FC100"): ("configs/reptile/fc100_5w1s.yaml", 0.001),
    ("Reptile", "EpisodicImageFolder"): ("configs/reptile/imagefolder_5w1s.yaml", 0.001),
    ("Reptile", "Learn2LearnTasks"): ("configs/reptile/learn2learn_miniimagenet_5w1s.yaml", 0.001),
    ("Reptile", "MiniImageNet"): ("configs/reptile/miniimagenet_5w1s.yaml", 0.001),
    ("Reptile", "Omniglot"): ("configs/reptile/omniglot_20w1s.yaml", 0.0005),
    ("Reptile", "Sinusoid"): ("configs/reptile/sinusoid.yaml", 0.02),
    ("Reptile", "TieredImageNet"): ("configs/reptile/tieredimagenet_5w1s.yaml", 0.001),
}


def _config_value(pl_module: pl.LightningModule, datamodule: Any, key: str) -> tuple[str, Any] | None:
    """``(config path, value)`` of ``inner_lr`` in the shipped config for this algorithm and data, if there is one."""
    if key != "inner_lr" or datamodule is None:
        return None
    return SHIPPED_INNER_LR.get((type(pl_module).__name__, type(datamodule).__name__))


def constant_prediction_loss(batch: Any) -> float | None:
    """The loss of a constant prediction on a batch of episodes: what any sane first step stays near.

    ``log(ways)`` for classification (uniform class probabilities), the mean squared deviation of
    the query targets from their task's mean for regression, None for other batches. The
    regression value is read on the host (one sync), so it is meant for the first step only.
    """
    if not (isinstance(batch, EpisodeBatch) or (isinstance(batch, tuple | list) and len(batch) == 4)):
        return None
    episodes = as_episode_batch(batch)
    if not isinstance(episodes.query_y, torch.Tensor) or episodes.query_y.numel() == 0:
        return None
    if episodes.query_y.is_floating_point():
        targets = episodes.query_y.detach().float()
        targets = targets.reshape(targets.shape[0], targets.shape[1], -1)  # [tasks, items, outputs]
        return float((targets - targets.mean(1, keepdim=True)).pow(2).mean())
    ways = episode_ways(episodes)
    return math.log(ways) if ways > 1 else None


class DivergenceGuard(pl.Callback):
    """Stop a fit whose loss diverges, with an error that names the likely cause, instead of finishing green.

    The rule: the run stops with :class:`DivergenceError` when

    - a training loss (the ``training_step`` output) is NaN or infinite;
    - a training loss, a training epoch's mean loss or ``val/loss`` is more than ``factor`` times
      the reference: the loss of the first training step (the untrained model, which gradient
      descent should only improve on) or the lowest epoch mean of the same quantity so far;
    - the first training step's loss is already more than ``factor`` times the loss of a constant
      prediction on its batch (uniform class probabilities, ``log(ways)``; the mean target for
      regression), so a step size that blows up the very first inner loop stops at once; the
      reference is then the larger of the two, so an easy first batch (loss 0) sets no trap;
    - ``val/loss`` is more than ``factor`` times the first training step's reference, also at the
      first validation (when it has no validation reference yet).

    A factor of 1e4 is far outside the noise of episodic losses (a few x between batches) and far
    inside a divergence (MAML with ``inner_lr=0.4`` on sinusoids climbs by 1e8 within epochs). The
    message names the module's ``inner_lr`` when it has one (an inner loop that overshoots is the
    usual cause), else the outer learning rate. Checking a loss on the host costs a device sync,
    so on an accelerator the step losses are checked every ``check_every_n_steps`` steps (every
    step on the CPU); epoch means and validation losses are always checked. The references are
    saved in checkpoints, so a resumed run keeps them.

    Args:
        factor: how many times the reference a loss may reach.
        check_every_n_steps: on an accelerator, check the step loss at this interval.
    """

    def __init__(self, factor: float = 1e4, check_every_n_steps: int = 50) -> None:
        if not factor > 1:
            raise ValueError(f"factor={factor!r} must be > 1, e.g. 1e4")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps!r} must be a positive integer")
        self.factor, self.check_every_n_steps = factor, check_every_n_steps
        self.reference: dict[str, float] = {}
        self._sum: torch.Tensor | None = None
        self._count = 0

    def _cause(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        name = type(pl_module).__name__
        inner_lr = getattr(pl_module, "inner_lr", None)
        if isinstance(inner_lr, int | float) and not isinstance(inner_lr, bool):
            hint = f"{name}'s inner_lr={inner_lr:g} is likely too large for this data"
            found = _config_value(pl_module, getattr(trainer, "datamodule", None), "inner_lr")
            if found is not None and found[1] != inner_lr:
                hint += f"; {found[0]} uses {found[1]:g}"
            return hint + "; lower --model.init_args.inner_lr"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        what = f"the outer learning rate lr={lr:g}" if lr is not None else "the outer learning rate"
        return (
            f"{what} of {name} is likely too large for this data; lower --model.init_args.optimizer.init_args.lr "
            "or clip gradients with --trainer.gradient_clip_val 1.0"
        )

    def _check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        what: str,
        key: str,
        value: float,
        reference: float | None = None,
        of: str = "its reference",
    ) -> None:
        where = f"at step {trainer.global_step} (epoch {trainer.current_epoch})"
        if not math.isfinite(value):
            problem = f"{what} is {value} {where}: training diverged"
        else:
            reference = self.reference.get(key) if reference is None else reference
            if reference is None or value <= self.factor * max(reference, 1e-12):
                return
            problem = f"{what} is {value:.4g} {where}, over {self.factor:g} x {of} {reference:.4g}: training diverged"
        cause = self._cause(trainer, pl_module)
        raise DivergenceError(f"{problem}. {cause[:1].upper()}{cause[1:]}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._count = None, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        first = "train/loss" not in self.reference
        if not first and loss.device.type != "cpu" and trainer.global_step % self.check_every_n_steps:
            return
        value = float(loss)
        if first:
            constant = constant_prediction_loss(batch)
            if constant is not None:
                self._check(trainer, pl_module, "train/loss", "", value, constant,
                            "the loss of a constant prediction on this batch,")  # fmt: skip
                # A first loss of 0 (an easy batch) would make every later loss look like a divergence.
                value = max(value, constant)
            self.reference["train/loss"] = self.reference["train/first"] = value
            return
        self._check(trainer, pl_module, "train/loss", "train/loss", value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sum is None or not self._count:
            return
        mean = float(self._sum) / self._count
        self._check(trainer, pl_module, "the epoch's mean train/loss", "train/loss", mean)
        self.reference["train/loss"] = min(self.reference.get("train/loss", mean), mean)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or trainer.state.fn != "fit" or value is None:
            return
        loss = float(value)
        self._check(trainer, pl_module, "val/loss", "val/loss", loss)
        # The first validation has no reference of its own: the first training steps' loss is one.
        first = self.reference.get("train/first")
        self._check(trainer, pl_module, "val/loss", "", loss, first, "the first training steps' loss")
        self.reference["val/loss"] = min(self.reference.get("val/loss", loss), loss)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = dict(state_dict.get("reference", {}))


class InterruptCheckpoint(pl.Callback):
    """Save ``interrupted.ckpt`` when a fit stops on an exception (Ctrl-C, SIGTERM, a crash); resuming from it is exact.

    The file goes into the run's checkpoint folder, ``<log dir>/checkpoints`` (beside the CLI's
    ``last.ckpt``), unless ``dirpath`` is given, and is deleted when the fit ends normally or
    once a newer checkpoint of the same run exists (a resumed run has moved past it). Resume with
    ``lightning-meta fit ... --ckpt_path <run>/checkpoints/interrupted.ckpt``. SIGTERM (sent by
    SLURM, Kubernetes, ``timeout``) reaches it through Lightning's signal handling, which stops the
    loop at the next batch boundary; :attr:`signal` then records which signal stopped the fit, so
    the CLI exits with 128 + its number. Every checkpoint of the run records the run folder
    (:meth:`state_dict`), so a checkpoint saved outside it (Lightning's SLURM ``hpc_ckpt_*.ckpt``)
    still resumes in place.

    A batch whose step was interrupted is trained again on resume (Lightning resumes at the first
    unprocessed batch), but its forward pass may already have updated buffers such as batch-norm
    running statistics, which the resumed run would then count twice. So the module's buffers are
    snapshotted at each training batch start (a copy of a few small tensors; nothing when the
    module has none) and put back before saving, when the exception came before the batch was
    processed. Nothing is saved for a :class:`DivergenceError` (a diverged model is not worth
    resuming) or for an exception before the first training batch.

    It does what Lightning's ``OnExceptionCheckpoint`` does, but is not one: with an
    ``OnExceptionCheckpoint`` in the Trainer, ``fit`` without ``ckpt_path`` silently means
    ``ckpt_path="last"``, which would resume a rerun into a fixed log folder from its old files.

    Args:
        dirpath: the folder for the file; default the run's checkpoint folder.
        filename: the file name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        if not filename:
            raise ValueError("filename='' must name the file, e.g. 'interrupted'")
        self.dirpath, self.filename = dirpath or "", filename
        self._given_dirpath = dirpath
        self._snapshot: dict[str, torch.Tensor] = {}
        self._snapshot_at: int | None = None
        #: The signal that stopped the fit (SIGINT for Ctrl-C, SIGTERM), else None.
        self.signal: int | None = None
        self.log_dir: str | None = None
        self._stale: float | None = None  # mtime of an interrupted.ckpt left by an earlier part of this run

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._given_dirpath is None:
            self.dirpath = self._run_folder(trainer)
        self.log_dir = trainer.log_dir if trainer.loggers else None
        self.signal = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.ckpt_path)
        self._stale = path.stat().st_mtime if path.is_file() else None

    def _drop_if_superseded(self, trainer: pl.Trainer) -> None:
        # A resumed run has written a newer checkpoint beside the old interrupted.ckpt: a later
        # resume or a user must not pick the stale file.
        if self._stale is None or not trainer.is_global_zero:
            return
        path = Path(self.ckpt_path)
        newer = [p for p in path.parent.glob("*.ckpt") if p != path and p.stat().st_mtime > self._stale]
        if newer or not path.is_file():
            if path.is_file():
                path.unlink()
                rank_zero_info(f"removed {path}: {newer[0].name} of the same run is newer")
            self._stale = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drop_if_superseded(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drop_if_superseded(trainer)

    def state_dict(self) -> dict[str, Any]:
        # The run folder travels in every checkpoint, so a resume finds its run from any file.
        return {"log_dir": self.log_dir}

    @property
    def ckpt_path(self) -> str:
        """The file this callback writes on an exception."""
        return str(Path(self.dirpath, f"{self.filename}.ckpt"))

    @staticmethod
    def _run_folder(trainer: pl.Trainer) -> str:
        # Where ModelCheckpoint puts a run's checkpoints by default.
        log_dir = trainer.log_dir if trainer.loggers else None
        return str(Path(log_dir or trainer.default_root_dir, "checkpoints"))

    @staticmethod
    def _processed(trainer: pl.Trainer) -> int:
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)  # type: ignore[attr-defined]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for name, buffer in pl_module.named_buffers():
            saved = self._snapshot.get(name)
            if saved is None or saved.shape != buffer.shape or saved.dtype != buffer.dtype:
                self._snapshot[name] = buffer.detach().clone()
            else:
                saved.copy_(buffer)
        self._snapshot_at = self._processed(trainer)
        self._drop_if_superseded(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.signal = signal.SIGINT
        elif isinstance(exception, SIGTERMException):
            self.signal = signal.SIGTERM
        if isinstance(exception, DivergenceError) or trainer.state.fn != "fit" or self._snapshot_at is None:
            return
        if allocation_failure(exception) is not None:
            return  # resuming with the same settings would fail the same way: the CLI names the settings instead
        if self._processed(trainer) == self._snapshot_at:  # the interrupted batch's step never finished
            with torch.no_grad():
                for name, buffer in pl_module.named_buffers():
                    if name in self._snapshot:
                        buffer.copy_(self._snapshot[name])
        if self._given_dirpath is None:
            self.dirpath = self._run_folder(trainer)
        trainer.save_checkpoint(self.ckpt_path)
        rank_zero_info(
            f"{type(exception).__name__} at step {trainer.global_step}: saved {self.ckpt_path}; resume with "
            f"`lightning-meta fit <same arguments> --ckpt_path {self.ckpt_path}`"
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A fit that ended normally leaves no stale interrupted.ckpt behind.
        if self.dirpath and stage == "fit" and Path(self.ckpt_path).exists():
            trainer.strategy.remove_checkpoint(self.ckpt_path)


#: The datamodule settings that set how much memory one batch takes, in the order a user would lower them.
BATCH_SETTINGS = ("tasks_per_batch", "ways", "shots", "queries", "train_ways", "train_shots", "train_queries",
                  "image_size", "batch_size")  # fmt: skip


def allocation_failure(error: BaseException) -> BaseException | None:
    """The out-of-memory error in ``error``'s chain (CUDA, the CPU allocator, MemoryError), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, MemoryError | torch.OutOfMemoryError) or (
            isinstance(current, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                                   or "not enough memory" in text)
        ):  # fmt: skip
            return current
        current = current.__cause__ or current.__context__
    return None


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation failure: the memory asked for and the settings that set it; None for others.

    The settings are those :class:`OutOfMemoryReport` attached to the error during the run.
    """
    failure = allocation_failure(error)
    if failure is None:
        return None
    text = str(failure)
    asked = re.search(r"(?:tried|Tried) to allocate (\d+) bytes", text)
    size = format_bytes(int(asked.group(1))) if asked else None
    if size is None:
        found = re.search(r"Tried to allocate ([\d.]+ ?[KMGT]i?B)", text)
        size = found.group(1) if found else None
    settings = getattr(failure, "batch_settings", None) or getattr(error, "batch_settings", None)
    line = f"out of memory: an allocation of {size} failed" if size else "out of memory"
    line += f" ({type(failure).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else 'no message'})"
    if settings:
        line += (
            f". One batch holds {settings}; lower --data.tasks_per_batch first (or ways, shots, queries, image_size), "
            "or use a device with more memory. Resuming with the same settings would fail the same way"
        )
    return line


class OutOfMemoryReport(pl.Callback):
    """Names the settings that set the batch size when a run fails on an allocation (out of memory).

    An out-of-memory error comes from deep inside PyTorch and names none of the settings that made
    the batch too large. On such an error this attaches the datamodule's :data:`BATCH_SETTINGS`
    (``tasks_per_batch=3000, ways=5, ...``) to it as ``batch_settings``; the CLI prints them with
    the memory asked for (:func:`out_of_memory_message`).
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        failure = allocation_failure(exception)
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None)
        if failure is None or not hparams:
            return
        shown = [f"{k}={hparams[k]}" for k in BATCH_SETTINGS if hparams.get(k) is not None]
        if hparams.get("train_batches") != "labelled":
            shown = [s for s in shown if not s.startswith("batch_size=")]
        try:
            failure.batch_settings = ", ".join(shown)  # type: ignore[attr-defined]
        except AttributeError:  # an exception type without a __dict__
            pass


def default_callbacks() -> list[pl.Callback]:
    """The callbacks the CLI adds to every run: episode images, episodes/s, hp_metric, adaptation curves, divergence.

    And :class:`OutOfMemoryReport`, which names the batch settings of a run that runs out of memory.
    """
    return [
        EpisodeImages(),
        EpisodesPerSecond(),
        HpMetric(),
        AdaptationCurveLogger(),
        DivergenceGuard(),
        OutOfMemoryReport(),
    ]


# ----------------------------------------------------------------------------- meta-RL rollouts
def trajectory_picture(goals: Tensor, pre: Tensor, post: Tensor, size: int = 96, extent: float = 0.75) -> Tensor:
    """An RGB image ``[3, size, K * (size + 2)]``: per task, trajectories before (blue) and after (green) adaptation.

    Args:
        goals: ``[K, 2]`` goal positions (red squares).
        pre: ``[K, n, T, 2]`` positions along the trajectories before adaptation.
        post: the same after adaptation.
        size: pixels per panel side.
        extent: the panel shows ``[-extent, extent]^2``.
    """
    panels = []
    for k in range(goals.shape[0]):
        panel = torch.ones(3, size, size)
        for points, color in ((pre[k], (0.2, 0.3, 1.0)), (post[k], (0.1, 0.7, 0.2)), (goals[k][None], (1.0, 0.0, 0.0))):
            pixels = ((points.reshape(-1, 2).float().cpu() + extent) / (2 * extent) * (size - 1)).round().long()
            pixels = pixels.clamp(0, size - 1)
            rows, cols = size - 1 - pixels[:, 1], pixels[:, 0]
            radius = 2 if points.dim() == 2 and points.shape[0] == 1 else 0
            for dr in range(-radius, radius + 1):
                for dc in range(-radius, radius + 1):
                    r, c = (rows + dr).clamp(0, size - 1), (cols + dc).clamp(0, size - 1)
                    for channel, value in enumerate(color):
                        panel[channel, r, c] = value
        panels += [panel, torch.full((3, size, 2), 0.5)]
    return torch.cat(panels[:-1], 2)


class TrajectoryImages(EpisodeImages):
    """Log ``{stage}/trajectories``: 2D navigation rollouts before and after adaptation for a few fixed tasks.

    Uses the first evaluation batch's ``trajectory_snapshot`` of the module (tasks, pre- and
    post-adaptation observations); only for environments whose observation is a 2D position with
    a 2D goal, on global rank 0, to TensorBoard loggers, outside the sanity check.

    It is the meta-RL kind of :class:`~lightning_meta.callbacks.EpisodeImages`: returned by
    :meth:`MetaRLModule.configure_callbacks <lightning_meta.bases.meta_rl.MetaRLModule.configure_callbacks>`,
    it replaces the CLI's episode pictures (Lightning replaces a Trainer callback by a module's
    callback of its type), which a batch of task parameters has none of.

    Args:
        tasks: how many tasks to draw.
        trajectories: how many trajectories per task.
    """

    def __init__(self, tasks: int = 4, trajectories: int = 5) -> None:
        self.tasks, self.trajectories = tasks, trajectories

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        snapshot: dict[str, Any] | None = getattr(pl_module, "trajectory_snapshot", None)
        if snapshot is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        goals, pre, post = snapshot["tasks"], snapshot["pre"], snapshot["post"]
        if goals.shape[-1] != 2 or pre.shape[-1] != 2:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        k, n = self.tasks, self.trajectories
        picture = trajectory_picture(goals[:k], pre[:k, :n], post[:k, :n])
        for logger in loggers:
            logger.experiment.add_image(f"{stage}/trajectories", picture, trainer.global_step)

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass  # no episode to draw: the trajectories are drawn at the epoch's end

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")
