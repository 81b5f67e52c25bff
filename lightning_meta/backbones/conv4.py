"""Conv4, the four-block convolutional backbone of the few-shot papers, and per-task batch norm."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EXACT_UNDER_VMAP: ContextVar[bool] = ContextVar("_EXACT_UNDER_VMAP", default=False)


@contextmanager
def vmap_safe_batch_norm() -> Iterator[None]:
    """Within this context :class:`TaskBatchNorm2d` computes with ``torch.var_mean`` (see there)."""
    token = _EXACT_UNDER_VMAP.set(True)
    try:
        yield
    finally:
        _EXACT_UNDER_VMAP.reset(token)


class TaskBatchNorm2d(nn.Module):
    """Batch norm that always normalises with the statistics of the batch it is given (no running stats).

    This is MAML's transductive batch norm: each task is normalised by its own support or query
    batch. It uses the fused ``F.batch_norm``, except inside :func:`vmap_safe_batch_norm` (which
    the algorithms enter around ``torch.func.vmap``): there ``F.batch_norm`` gives wrong
    second-order gradients (torch 2.14), so the statistics come from ``torch.var_mean``, in float32
    under autocast.

    Args:
        num_features: channels.
        eps: added to the variance, as in ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not _EXACT_UNDER_VMAP.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(x32, dim=(0, 2, 3), keepdim=True, correction=0)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


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
        image_size: input side, to compute the embedding size.
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
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for four downsampling blocks")
        self.features = nn.Sequential(*layers)
        self.pooling = pooling
        self.embedding_dim = hidden if pooling == "stride" else hidden * size * size
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None

    def forward(self, x: Tensor) -> Tensor:
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
