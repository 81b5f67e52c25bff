"""The shared part of the timm and torchvision wrappers: input checks, pretrained weights, freezing, task batch norm."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .batchnorm import task_batch_norm as to_task_batch_norm
from .inputs import check_images
from .weights import freeze_blocks, load_pretrained


class WrappedBackbone(nn.Module):
    """A library network as a backbone: ``[..., C, H, W]`` images to ``[..., embedding_dim]`` features.

    Subclasses build ``model`` (its classifier replaced by an identity), then call :meth:`prepare`.
    Batch norms whose parameters are frozen stay in eval mode whatever ``train()`` is given, so
    their running statistics stay fixed along with the weights (torchgeo's ``freeze_backbone``).

    Args:
        model: the network, returning ``[N, embedding_dim]``.
        embedding_dim: its output features.
        in_channels: image channels it takes.
        min_image_size: the smallest image side it takes (1 when any size works).
    """

    def __init__(self, model: nn.Module, embedding_dim: int, in_channels: int, min_image_size: int = 1) -> None:
        super().__init__()
        self.model = model
        self.embedding_dim = embedding_dim
        self.in_channels, self.min_image_size = in_channels, min_image_size
        self._frozen_norms: list[nn.Module] = []

    def prepare(
        self,
        name: str,
        pretrained: bool | str | os.PathLike[str],
        how_to_save: str,
        blocks: Sequence[nn.Module],
        freeze_option: bool | int,
        task_batch_norm: bool,
    ) -> None:
        """Load the local pretrained weights, convert to task batch norm if asked, then freeze (in that order)."""
        load_pretrained(self.model, pretrained, name, how_to_save)
        if task_batch_norm:
            # Conversion swaps modules inside the blocks, never the blocks themselves, so ``blocks`` stays valid.
            self.model = to_task_batch_norm(self.model)
        self._frozen_norms = freeze_blocks(self.model, blocks, freeze_option)
        self.train(self.training)

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        for norm in self._frozen_norms:
            norm.train(False)
        return self

    def forward(self, x: Tensor) -> Tensor:
        check_images(type(self).__name__, x, self.in_channels, self.min_image_size)
        lead = x.shape[:-3]
        h = self.model(x.reshape(-1, *x.shape[-3:]))
        return h.reshape(*lead, h.shape[-1])
