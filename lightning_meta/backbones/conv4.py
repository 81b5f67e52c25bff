"""Conv4, the four-block convolutional backbone of the few-shot papers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .batchnorm import TaskBatchNorm2d, vmap_safe_batch_norm
from .inputs import check_image_size, check_images

__all__ = ["Conv4", "TaskBatchNorm2d", "to_channels_last", "vmap_safe_batch_norm"]


class Conv4(nn.Module):
    """The 4-block convolutional backbone of the few-shot papers (Vinyals et al. 2016, Snell et al. 2017).

    Each block is a 3x3 convolution with ``hidden`` filters, batch norm and ReLU, with 2x2
    max-pooling (``pooling="max"``; applied before the ReLU, which is equivalent and cheaper), or
    with the convolution at stride 2 and no pooling
    (``pooling="stride"``, the MAML paper's Omniglot network; the final map is averaged over space).

    Inputs may have extra leading dimensions (``[..., C, H, W]``, e.g. ``[tasks, shots, C, H, W]``);
    they are kept in the output ``[..., features]``.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for ImageNet-like data).
        hidden: filters per block (64 in the papers, 32 for MAML on mini-ImageNet).
        image_size: input side, to compute the embedding size (at least 16 with max-pooling).
        out_features: if set, a linear head to this many outputs (MAML's classifier); else the
            flattened embedding is returned (ProtoNet, Matching Networks).
        pooling: "max" or "stride", see above.
        track_running_stats: keep batch-norm running statistics for evaluation (ProtoNet). With
            False every batch is normalised with its own statistics (:class:`TaskBatchNorm2d`), as
            MAML does; use False for MAML and Reptile.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        out_features: int | None = None,
        pooling: Literal["max", "stride"] = "max",
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in ("max", "stride"):
            raise ValueError(f"pooling={pooling!r} must be 'max' or 'stride'")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            stride = 2 if pooling == "stride" else 1
            layers += [
                nn.Conv2d(channels, hidden, 3, stride=stride, padding=1),
                nn.BatchNorm2d(hidden) if track_running_stats else TaskBatchNorm2d(hidden),
            ]
            if pooling == "max":
                # Pooling before the ReLU gives the same outputs and gradients (both are monotone, and
                # max-pooling picks the first maximum either way) with the ReLU on a quarter of the values.
                layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
                size //= 2
            else:
                layers.append(nn.ReLU(inplace=True))
                size = (size + 1) // 2
            channels = hidden
        self.in_channels = in_channels
        # Four floor-halving max-pools need 16 px; stride-2 convolutions with padding never reach zero.
        self.min_image_size = 16 if pooling == "max" else 1
        check_image_size("Conv4", image_size, self.min_image_size, "four downsampling blocks")
        self.features = nn.Sequential(*layers)
        self.pooling = pooling
        self.embedding_dim = hidden if pooling == "stride" else hidden * size * size
        self.image_size = image_size
        #: Whether only ``image_size`` images fit: a head after a flattened max-pooled map needs its size.
        self.fixed_image_size = pooling == "max" and bool(out_features)
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None

    def forward(self, x: Tensor) -> Tensor:
        check_images("Conv4", x, self.in_channels, self.min_image_size)
        lead = x.shape[:-3]
        h = self.features(x.reshape(-1, *x.shape[-3:]))
        h = h.mean(dim=(2, 3)) if self.pooling == "stride" else h.flatten(1)
        if self.head is not None:
            h = self.head(h)
        return h.reshape(*lead, h.shape[-1])


def to_channels_last(x: Tensor) -> Tensor:
    """Return ``[..., C, H, W]`` images in channels-last memory format (faster convs under bf16 on CPU and GPU)."""
    if x.dim() < 4:
        return x
    flat = x.reshape(-1, *x.shape[-3:]).contiguous(memory_format=torch.channels_last)
    return flat.view(*x.shape[:-3], *x.shape[-3:]) if x.dim() > 4 else flat
