"""Prototypical Networks (Snell, Swersky and Zemel 2017)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch

from ..backbones import Conv4
from ..base import EpisodicModule, embed_episode, support_onehot


class ProtoNet(EpisodicModule):
    """Prototypical Networks: classify queries by distance to the mean embedding of each class.

    Logits are negative squared Euclidean distances to the prototypes (Snell et al. 2017, eq. 1-2),
    or with ``distance="cosine"`` the cosine similarities times ``cosine_scale``.

    Args:
        backbone: embedding network; default ``Conv4(in_channels=1)`` (Omniglot).
        distance: "euclidean" (squared, as in the paper) or "cosine".
        cosine_scale: multiplies cosine similarities, which lie in [-1, 1], before the softmax.
        channels_last: channels-last memory format for the backbone's weights and the image batches (see
            :attr:`EpisodicModule.channels_last`); faster for Conv4 on CPU, fp32 and bf16 (benchmarks/RESULTS.md).
        optimizer: outer optimizer factory (Adam, lr 1e-3 as in the paper).
        lr_scheduler: optional; the paper halves the learning rate every 2000 episodes.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        distance: Literal["euclidean", "cosine"] = "euclidean",
        cosine_scale: float = 10.0,
        channels_last: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance={distance!r} must be 'euclidean' or 'cosine'")
        super().__init__(backbone if backbone is not None else Conv4(), optimizer, lr_scheduler)
        self.distance, self.cosine_scale, self.channels_last = distance, cosine_scale, channels_last

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        support, query = embed_episode(self.backbone, batch, self.channels_last)
        onehot = support_onehot(batch, support.dtype)  # [B, NK, N]
        prototypes = onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)  # [B, N, D]
        if self.distance == "cosine":
            return self.cosine_scale * F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
        # -||q - p||^2 through one matmul rather than a [B, Q, N, D] difference tensor.
        return (
            2 * query @ prototypes.transpose(1, 2)
            - query.square().sum(-1, keepdim=True)
            - prototypes.square().sum(-1).unsqueeze(1)
        )
