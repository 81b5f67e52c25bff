"""EpisodicModule: what every few-shot algorithm shares."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchvision.utils import make_grid

from datamodules.episodes import EpisodeBatch, as_episode_batch

from .backbones import to_channels_last
from .metrics import ConfidenceInterval95, episode_accuracy

_given_hyperparameters: Any
try:  # set while LightningCLI instantiates a module; its hparams are then plain config dicts
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older or newer Lightning
    _given_hyperparameters = None


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half and bfloat16 (losses and distances under autocast) but keep float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def embed_episode(backbone: nn.Module, batch: EpisodeBatch, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Embed support and query in one backbone pass: ``[B, N*K, D]`` and ``[B, N*Q, D]``, at least float32.

    One pass means batch-norm statistics see both sets, as in Snell et al.'s and Vinyals et al.'s code.
    """
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    z = at_least_float32(backbone(to_channels_last(x) if channels_last else x))
    shots_total = batch.support_x.shape[1]
    return z[:, :shots_total], z[:, shots_total:]


def support_onehot(support_y: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, N*K, N]`` one-hot support labels; ``N`` is the episode's number of ways."""
    return F.one_hot(support_y, int(support_y.max()) + 1).to(dtype)


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


def adaptation_curve_steps(total: int) -> list[int]:
    """Inner steps where the adaptation curve is measured: all up to 10, else 0, the powers of 2 and ``total``."""
    if total <= 10:
        return list(range(total + 1))
    return [0, *(2**i for i in range(total.bit_length()) if 2**i < total), total]


class InnerStepLosses:
    """Query losses of one task along its inner loop (the adaptation curve).

    Filled by :meth:`EpisodicModule.on_inner_step` inside :meth:`EpisodicModule.inner_step_losses`.

    Args:
        loss_after: the task's query loss for a set of (adapted) parameters; called under ``no_grad``.
    """

    def __init__(self, loss_after: Callable[[Any], Tensor]) -> None:
        self.loss_after = loss_after
        self.measured: list[int] = []
        self.losses: list[Tensor] = []
        self.total: int | None = None

    def record(self, step: int, total: int, params: Any) -> None:
        """Measure the query loss after ``step`` of ``total`` inner steps, if it is a point of the curve."""
        self.total = total
        if step < total and step in adaptation_curve_steps(total):
            with torch.no_grad():
                self.measured.append(step)
                self.losses.append(self.loss_after(params).detach())

    @property
    def steps(self) -> list[int]:
        """The inner steps of the curve's points, ending with the last step (empty if the loop never ran)."""
        return [] if self.total is None else [*self.measured, self.total]

    def finish(self, final_loss: Tensor) -> Tensor:
        """The curve as a tensor, ending with ``final_loss``, the loss after all steps (no extra forward pass)."""
        return torch.stack([*self.losses, final_loss.detach()])


class EpisodicModule(pl.LightningModule):
    """Base LightningModule for few-shot algorithms trained on :class:`~datamodules.EpisodeBatch` batches.

    It unpacks episodes (an ``EpisodeBatch`` or a plain 4-tuple), computes the per-episode loss
    and accuracy, logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc`` and ``test/acc_ci95`` (95% confidence interval over test episodes), and builds
    the optimizer that the CLI injects. An algorithm implements one method,
    :meth:`episode_logits`, or :meth:`episode_loss` when it needs more control.

    Classification episodes (integer ``query_y``) use cross-entropy and accuracy; regression
    episodes (float ``query_y``) use the mean squared error.

    Diagnostics for TensorBoard: ``hp_metric`` (the HPARAMS tab's metric) is the best ``val/acc``
    of the run so far (lowest ``val/loss`` for regression) during fit and ``test/acc`` (``test/loss``)
    after test; ``val/episode`` and ``test/episode`` show the first episode of each evaluation
    epoch as images (:meth:`log_episode_images`); algorithms with an inner loop log their
    adaptation curve as ``val_adapt/loss_step_<k>`` (see :meth:`on_inner_step`); and the progress
    bar shows the training throughput of this process, ``episodes/s``.

    Args:
        backbone: the network (an ``nn.Module``, e.g. :class:`~lightning_meta.models.Conv4`).
        optimizer: outer-loop optimizer factory (Adam, lr 1e-3 by default).
        lr_scheduler: optional scheduler factory, stepped once per epoch.
    """

    #: True for algorithms that take gradients at validation and test time (MAML, Reptile).
    needs_grad_in_eval: bool = False
    #: Whether evaluation records the query loss along the inner loop; set by MAML's and Reptile's constructors.
    adaptation_curve: bool = False

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        under_cli = _given_hyperparameters is not None and _given_hyperparameters.get() is not None
        # Outside the CLI these arguments are live objects; the CLI hands plain config dicts instead.
        self.save_hyperparameters(ignore=[] if under_cli else ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.metrics = nn.ModuleDict(
            {
                "val_loss": MeanMetric(),
                "val_acc": MeanMetric(),
                "test_loss": MeanMetric(),
                "test_acc": MeanMetric(),
                "test_acc_ci95": ConfidenceInterval95(),
                "test_loss_ci95": ConfidenceInterval95(),
            }
        )
        self._best_val: float | None = None  # hp_metric during fit
        self._inner_recorder: InnerStepLosses | None = None
        self._in_eval_step = False
        self._curve: tuple[list[int], Tensor] | None = None
        self._curve_steps: list[int] = []
        self._last_step_time: float | None = None
        self._episodes_per_s: float | None = None

    @property
    def channels_last(self) -> bool:
        """Whether the backbone's weights and the image batches use the channels-last memory format.

        Setting it converts the backbone's 4-d weights. Both sides must be channels-last: a
        convolution picks its output format from its input and weight, and a 1-channel image batch
        (Omniglot) is contiguous in both formats, so converting only the batch changes nothing.
        """
        return getattr(self, "_channels_last", False)

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self._channels_last = bool(value)
        self.backbone.to(memory_format=torch.channels_last if value else torch.contiguous_format)

    # ------------------------------------------------------------------ the algorithm's part
    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        """Predict the query set of each episode: ``[B, N*Q, N]`` logits (or ``[B, N*Q, D]`` for regression)."""
        raise NotImplementedError(f"{type(self).__name__} must implement episode_logits() or episode_loss()")

    def episode_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Return the per-episode query loss ``[B]`` and the query predictions ``[B, N*Q, ...]``."""
        predictions = self.episode_logits(batch)
        return self.query_loss(predictions, batch.query_y), predictions

    @staticmethod
    def query_loss(predictions: Tensor, target: Tensor) -> Tensor:
        """Per-episode loss ``[B]``: cross-entropy for integer targets, mean squared error for float ones."""
        if target.is_floating_point():
            return (
                F.mse_loss(at_least_float32(predictions), at_least_float32(target), reduction="none").flatten(1).mean(1)
            )
        loss = F.cross_entropy(at_least_float32(predictions.flatten(0, 1)), target.flatten(), reduction="none")
        return loss.view(target.shape).mean(1)

    # ------------------------------------------------------------------ Lightning plumbing
    def _episode_step(self, batch: Any) -> tuple[Tensor, Tensor | None, int]:
        episodes = as_episode_batch(batch)
        loss, predictions = self.episode_loss(episodes)
        accuracy = None if episodes.query_y.is_floating_point() else episode_accuracy(predictions, episodes.query_y)
        return loss, accuracy, episodes.num_tasks

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, accuracy, tasks = self._episode_step(batch)
        loss = loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=tasks)
        if accuracy is not None:
            self.log("train/acc", accuracy.mean(), prog_bar=True, batch_size=tasks)
        self._log_throughput(tasks)
        return loss

    def _log_throughput(self, tasks: int) -> None:
        """``episodes/s`` in the progress bar: this process's episodes over the wall time between training steps."""
        now = time.perf_counter()
        if self._last_step_time is not None and now > self._last_step_time:
            rate = tasks / (now - self._last_step_time)
            # An exponential moving average over about ten steps steadies the number people read.
            previous = self._episodes_per_s
            self._episodes_per_s = rate if previous is None else 0.9 * previous + 0.1 * rate
            self.log("episodes/s", self._episodes_per_s, prog_bar=True, logger=False, batch_size=tasks)
        self._last_step_time = now

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None  # the gap since the last epoch's final step holds validation

    def on_validation_start(self) -> None:
        self._last_step_time = None  # validation inside an epoch (val_check_interval) is not training time

    def _eval_step(self, batch: Any, stage: str, batch_idx: int) -> Tensor:
        self._check_grad_mode()
        episodes = as_episode_batch(batch)
        if batch_idx == 0 and self._trainer is not None and not self.trainer.sanity_checking:
            self.log_episode_images(episodes, stage)
        self._curve, self._in_eval_step = None, True
        try:
            loss, accuracy, tasks = self._episode_step(episodes)
        finally:
            self._in_eval_step = False
        if self._curve is not None:
            steps, curve = self._curve
            width = len(str(steps[-1]))
            for i, step in enumerate(steps):  # zero-padded, so TensorBoard lists the steps in order
                self.log(f"{stage}_adapt/loss_step_{step:0{width}d}", curve[:, i].mean(), batch_size=tasks,
                         sync_dist=True)  # fmt: skip
        values = {f"{stage}/loss": loss.detach()}
        if stage == "test":
            values["test/loss_ci95"] = loss.detach()
        if accuracy is not None:
            values[f"{stage}/acc"] = accuracy
            if stage == "test":
                values["test/acc_ci95"] = accuracy
        for name, value in values.items():
            metric = cast(Metric, self.metrics[name.replace("/", "_")])
            metric.update(value)
            self.log(name, metric, prog_bar=stage == "val" or name == "test/acc", batch_size=tasks)
        return loss.mean()

    def _fresh_metrics(self) -> None:
        # States left by a run under inference mode (trainer.validate) are inference tensors, which
        # the in-place updates of a later run outside it (fit's validation) may not touch.
        for metric in self.metrics.values():
            cast(Metric, metric).reset()

    def on_validation_epoch_start(self) -> None:
        self._fresh_metrics()

    def on_test_epoch_start(self) -> None:
        self._fresh_metrics()

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", batch_idx)

    # ------------------------------------------------------------------ diagnostics
    def _final_metric(self, stage: str) -> tuple[float, bool] | None:
        """The epoch's ``{stage}/acc`` (higher is better) or, without accuracy, ``{stage}/loss``."""
        for name, higher_is_better in ((f"{stage}_acc", True), (f"{stage}_loss", False)):
            metric = cast(Metric, self.metrics[name])
            if metric.update_count > 0:
                return float(metric.compute()), higher_is_better
        return None

    def on_validation_epoch_end(self) -> None:
        """Log ``hp_metric``: the best validation accuracy (or loss) of this fit so far."""
        found = None if self._trainer is None or self.trainer.sanity_checking else self._final_metric("val")
        if found is None:
            return
        value, higher_is_better = found
        if self.trainer.state.fn != "fit":  # trainer.validate: this run's value
            best = value
        elif self._best_val is None:
            best = self._best_val = value
        else:
            best = self._best_val = max(self._best_val, value) if higher_is_better else min(self._best_val, value)
        self.log("hp_metric", best, sync_dist=True)  # the same on every rank; syncing only silences a warning

    def on_test_epoch_end(self) -> None:
        """Log ``hp_metric``: the test accuracy (or loss)."""
        found = self._final_metric("test")
        if found is not None:
            self.log("hp_metric", found[0], sync_dist=True)

    def on_fit_start(self) -> None:
        self._last_step_time, self._episodes_per_s = None, None
        if self.trainer.ckpt_path is None:  # a resumed fit keeps the best of its checkpoint
            self._best_val = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hp_metric_best_val"] = self._best_val

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._best_val = checkpoint.get("hp_metric_best_val")

    def log_episode_images(self, batch: EpisodeBatch, stage: str) -> None:
        """Show the first episode of each validation and test epoch in TensorBoard as ``{stage}/episode``.

        Called with the first evaluation batch (after transfer, before the algorithm sees it), on
        global rank 0, outside the sanity check. The grid (:func:`episode_grid`) has a row per class:
        the support items, a blank column, then the queries. Only TensorBoard loggers receive it, and
        only image episodes; override this method to change or disable it.
        """
        if not self.trainer.is_global_zero:
            return
        loggers = [logger for logger in self.loggers if isinstance(logger, TensorBoardLogger)]
        grid = episode_grid(batch) if loggers else None
        if grid is not None:
            for logger in loggers:
                logger.experiment.add_image(f"{stage}/episode", grid, self.global_step)

    def on_inner_step(self, step: int, total: int, params: Any) -> None:
        """Called by inner loops (MAML's ``adapt``, Reptile's ``fine_tune``) before each step and after the last.

        ``params`` are the task's parameters after ``step`` of ``total`` steps. During evaluation with
        ``adaptation_curve`` the query loss is measured at a few of these steps
        (:func:`adaptation_curve_steps`); otherwise this does nothing.
        """
        if self._inner_recorder is not None:
            self._inner_recorder.record(step, total, params)

    def recording_adaptation_curve(self) -> bool:
        """True inside a validation or test step of a module with ``adaptation_curve`` on."""
        return self.adaptation_curve and self._in_eval_step

    @contextmanager
    def inner_step_losses(self, loss_after: Callable[[Any], Tensor]) -> Iterator[InnerStepLosses]:
        """Record one task's adaptation curve while the block runs its inner loop (works under vmap).

        ``loss_after(params)`` is the task's query loss with those parameters. After the block,
        ``recorder.finish(final_loss)`` is the task's curve, for :meth:`record_adaptation_curve`.
        """
        recorder, previous = InnerStepLosses(loss_after), self._inner_recorder
        self._inner_recorder = recorder
        try:
            yield recorder
        finally:
            self._inner_recorder = previous
            self._curve_steps = recorder.steps

    def record_adaptation_curve(self, losses: Tensor) -> None:
        """Hand the base a meta-batch's curves, ``[B, points]`` (stacked ``finish`` results); it logs epoch means."""
        if self._curve_steps and losses.shape[-1] == len(self._curve_steps):
            self._curve = (list(self._curve_steps), losses.detach())

    def _check_grad_mode(self) -> None:
        if self.needs_grad_in_eval and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients during validation and test, which inference mode "
                "forbids; create the Trainer with inference_mode=False (the lightning-meta CLI does this)"
            )

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
