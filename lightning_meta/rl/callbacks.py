"""TensorBoard pictures of meta-RL rollouts."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ..callbacks import EpisodeImages


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
