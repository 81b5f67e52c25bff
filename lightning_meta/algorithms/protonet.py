"""Prototypical Networks (Snell, Swersky and Zemel 2017)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from datamodules.episodes import EpisodeBatch

from ..arguments import check_choice
from ..backbones import Conv4
from ..bases.episodic import EpisodicModule, embed_episode, support_onehot
from ..memory_format import channels_last_argument

Distance = Literal["euclidean", "cosine"]


class ProtoNet(EpisodicModule):
    """Prototypical Networks: classify queries by distance to the mean embedding of each class.

    Logits are negative squared Euclidean distances to the prototypes (Snell et al. 2017, eq. 1-2),
    or with ``distance="cosine"`` the cosine similarities times ``cosine_scale``.

    Args:
        backbone: embedding network; default ``Conv4(in_channels=1)`` (Omniglot).
        distance: "euclidean" (squared, as in the paper) or "cosine".
        cosine_scale: multiplies cosine similarities, which lie in [-1, 1], before the softmax.
        channels_last: deprecated; this module asks the Trainer for the
            :class:`~lightning_meta.memory_format.ChannelsLast` callback (False here turns that off).
        optimizer: outer optimizer factory (Adam, lr 1e-3 as in the paper).
        lr_scheduler: optional; the paper halves the learning rate every 2000 episodes.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        distance: Distance = "euclidean",
        cosine_scale: float = 10.0,
        channels_last: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_choice("ProtoNet", "distance", distance, Distance)
        super().__init__(backbone if backbone is not None else Conv4(), optimizer, lr_scheduler)
        self.distance, self.cosine_scale = distance, cosine_scale
        self.wants_channels_last = channels_last_argument("ProtoNet", channels_last, True)

    def episode_logits(self, batch: EpisodeBatch) -> Tensor:
        support, query = embed_episode(self.backbone, batch)
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
