"""EpisodicModule: what every few-shot algorithm shares."""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from datamodules.episodes import EpisodeBatch, as_episode_batch

from .metrics import ConfidenceInterval95, episode_accuracy
from .models import to_channels_last

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


class EpisodicModule(pl.LightningModule):
    """Base LightningModule for few-shot algorithms trained on :class:`~datamodules.EpisodeBatch` batches.

    It unpacks episodes (an ``EpisodeBatch`` or a plain 4-tuple), computes the per-episode loss
    and accuracy, logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc`` and ``test/acc_ci95`` (95% confidence interval over test episodes), and builds
    the optimizer that the CLI injects. An algorithm implements one method,
    :meth:`episode_logits`, or :meth:`episode_loss` when it needs more control.

    Classification episodes (integer ``query_y``) use cross-entropy and accuracy; regression
    episodes (float ``query_y``) use the mean squared error.

    Args:
        backbone: the network (an ``nn.Module``, e.g. :class:`~lightning_meta.models.Conv4`).
        optimizer: outer-loop optimizer factory (Adam, lr 1e-3 by default).
        lr_scheduler: optional scheduler factory, stepped once per epoch.
    """

    #: True for algorithms that take gradients at validation and test time (MAML, Reptile).
    needs_grad_in_eval: bool = False

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
        return loss

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        self._check_grad_mode()
        loss, accuracy, tasks = self._episode_step(batch)
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
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

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
