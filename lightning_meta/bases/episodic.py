"""EpisodicModule: what every few-shot algorithm shares."""

from __future__ import annotations

import warnings
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from datamodules.episodes import EpisodeBatch, as_episode_batch, episode_ways

from ..checkpoints import check_class, record_class
from ..functional import adaptation_curve_steps  # noqa: F401  (re-exported)
from ..memory_format import channels_last_callbacks
from ..metrics import ConfidenceInterval95, episode_accuracy
from ..outputs import AdaptationCurve, EpisodeOutput  # noqa: F401  (AdaptationCurve re-exported)


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half and bfloat16 (losses and distances under autocast) but keep float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def embed_episode(backbone: nn.Module, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
    """Embed support and query in one backbone pass: ``[B, N*K, D]`` and ``[B, N*Q, D]``, at least float32.

    The backbone sees ``[B*N*(K+Q), C, H, W]`` (the backbone contract: the task dimension is
    flattened here and restored after). One pass means batch-norm statistics see both sets, as in
    Snell et al.'s and Vinyals et al.'s code.
    """
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    tasks, items = x.shape[:2]
    z = at_least_float32(backbone(x.flatten(0, 1)))
    z = z.reshape(tasks, items, *z.shape[1:])
    shots_total = batch.support_x.shape[1]
    return z[:, :shots_total], z[:, shots_total:]


def support_onehot(batch: EpisodeBatch, dtype: torch.dtype) -> Tensor:
    """``[B, N*K, N]`` one-hot support labels; ``N`` is the episodes' number of ways (:func:`episode_ways`)."""
    return F.one_hot(batch.support_y, episode_ways(batch)).to(dtype)


class EpisodicModule(pl.LightningModule):
    """Base LightningModule for few-shot algorithms trained on :class:`~datamodules.EpisodeBatch` batches.

    Episodes in; loss, accuracy and confidence interval out. It unpacks episodes (an
    ``EpisodeBatch`` or a plain 4-tuple), computes the per-episode loss and accuracy, logs
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` and
    ``test/acc_ci95`` (95% confidence interval over test episodes), predicts class probabilities
    (:meth:`predict_step`), and builds the optimizer that the CLI injects. An algorithm implements
    one method, :meth:`episode_logits`, or :meth:`episode_loss` when it needs more control.

    Classification episodes (integer ``query_y``) use cross-entropy and accuracy; regression
    episodes (float ``query_y``) use the mean squared error.

    Diagnostics (episode images, ``episodes/s``, ``hp_metric``, adaptation curves) are callbacks in
    :mod:`lightning_meta.callbacks`; the CLI adds them by default. Validation and test steps return
    ``{"loss": ..., "output": EpisodeOutput}`` for them.

    Checkpoints record the class that wrote them (``checkpoint["lightning_meta"]["class_path"]``);
    loading one of an unrelated algorithm raises a clear error.

    Args:
        backbone: the network (an ``nn.Module``, e.g. :class:`~lightning_meta.backbones.Conv4`).
        optimizer: outer-loop optimizer factory (Adam, lr 1e-3 by default).
        lr_scheduler: optional scheduler factory, stepped once per epoch; ``ReduceLROnPlateau`` watches
            ``val/loss``.
    """

    #: True for algorithms that take gradients at validation and test time (MAML, Reptile).
    needs_grad_in_eval: bool = False
    #: True asks the Trainer for channels-last weights (:class:`~lightning_meta.memory_format.ChannelsLast`).
    wants_channels_last: bool = False

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # Outside the CLI the arguments are live objects (modules, optimizer factories), which the
        # checkpoint's state dict or nothing holds and which are no data: saved once to see them,
        # then again without them. The CLI hands their plain config dicts instead, which are kept
        # (a checkpoint rebuilds its backbone from them).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
            self.save_hyperparameters()
        live = [name for name, value in self.hparams.items() if isinstance(value, nn.Module) or callable(value)]
        if live:
            self.save_hyperparameters(ignore=live)
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

    def episode_loss(self, batch: EpisodeBatch) -> EpisodeOutput | tuple[Tensor, Tensor]:
        """Return the per-episode query loss ``[B]`` and the query predictions ``[B, N*Q, ...]``.

        Algorithms may return an :class:`EpisodeOutput` with more (an adaptation curve).
        """
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

    def episode_outputs(self, batch: Any) -> EpisodeOutput:
        """:meth:`episode_loss` of a batch (an ``EpisodeBatch`` or a 4-tuple), always as an :class:`EpisodeOutput`."""
        out = self.episode_loss(as_episode_batch(batch))
        return out if isinstance(out, EpisodeOutput) else EpisodeOutput(*out)

    # ------------------------------------------------------------------ Lightning plumbing
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        episodes = as_episode_batch(batch)
        out = self.episode_outputs(episodes)
        loss = out.loss.mean()
        tasks = episodes.num_tasks
        self.log("train/loss", loss, prog_bar=True, batch_size=tasks)
        if not episodes.query_y.is_floating_point():
            self.log("train/acc", episode_accuracy(out.predictions, episodes.query_y).mean(), prog_bar=True,
                     batch_size=tasks)  # fmt: skip
        return loss

    def _eval_step(self, batch: Any, stage: str) -> dict[str, Any]:
        self._check_grad_mode()
        episodes = as_episode_batch(batch)
        out = self.episode_outputs(episodes)
        values = {f"{stage}/loss": out.loss.detach()}
        if stage == "test":
            values["test/loss_ci95"] = out.loss.detach()
        if not episodes.query_y.is_floating_point():
            accuracy = episode_accuracy(out.predictions, episodes.query_y)
            values[f"{stage}/acc"] = accuracy
            if stage == "test":
                values["test/acc_ci95"] = accuracy
        for name, value in values.items():
            metric = cast(Metric, self.metrics[name.replace("/", "_")])
            metric.update(value)
            self.log(name, metric, prog_bar=stage == "val" or name == "test/acc", batch_size=episodes.num_tasks)
        return {"loss": out.loss.mean(), "output": out}

    def _fresh_metrics(self) -> None:
        # States left by a run under inference mode (trainer.validate) are inference tensors, which
        # the in-place updates of a later run outside it (fit's validation) may not touch.
        for metric in self.metrics.values():
            cast(Metric, metric).reset()

    def on_validation_epoch_start(self) -> None:
        self._fresh_metrics()

    def on_test_epoch_start(self) -> None:
        self._fresh_metrics()

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int = 0) -> Tensor:
        """Class probabilities ``[B, N*Q, N]`` of each episode's queries (regression: the predictions).

        The batch's ``query_y`` is not used (pass zeros). For one episode without a Trainer, see
        :func:`lightning_meta.inference.predict_episode`.
        """
        self._check_grad_mode()
        episodes = as_episode_batch(batch)
        logits = self.episode_logits(episodes)
        if episodes.support_y.is_floating_point():
            return logits
        return at_least_float32(logits).softmax(-1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_class(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by an unrelated algorithm (a ProtoNet checkpoint into MAML)."""
        check_class(checkpoint, type(self))

    def _check_grad_mode(self) -> None:
        if self.needs_grad_in_eval and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients during validation and test, which inference mode "
                "forbids; create the Trainer with inference_mode=False (the lightning-meta CLI does this)"
            )

    def configure_callbacks(self) -> Any:
        """Ask the Trainer for :class:`~lightning_meta.memory_format.ChannelsLast` when the module wants it."""
        return channels_last_callbacks(self, super().configure_callbacks())

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Lightning steps it with a logged metric, which the CLI gives no way to name: the validation
            # loss (its default mode is "min"), or the monitor of Lightning's own cli.ReduceLROnPlateau.
            config["monitor"] = getattr(scheduler, "monitor", None) or "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
