"""ResNet-12, the residual backbone of MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020), with DropBlock."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import batch_norm_2d
from .inputs import check_image_size, check_images


def drop_block(x: Tensor, drop_rate: float, block_size: int) -> Tensor:
    """DropBlock (Ghiasi et al. 2018): zero random ``block_size`` squares of each channel, rescale the rest.

    Block centres are drawn where a whole block fits, with the rate of the paper's eq. 1 so that a
    fraction ``drop_rate`` of the units is dropped; blocks larger than the map are clipped to it.
    """
    height, width = x.shape[-2:]
    size = min(block_size, height, width)
    gamma = drop_rate / size**2 * height * width / ((height - size + 1) * (width - size + 1))
    centres = torch.bernoulli(torch.full((*x.shape[:-2], height - size + 1, width - size + 1), gamma, device=x.device))
    blocks = F.max_pool2d(F.pad(centres, (size - 1,) * 4), size, stride=1)  # each centre covers size x size
    keep = 1 - blocks
    return x * (keep * (keep.numel() / keep.sum().clamp_min(1))).to(x.dtype)


class DropBlock(nn.Module):
    """DropBlock as a module; active only in training mode (see :func:`drop_block`).

    Args:
        drop_rate: fraction of units to drop.
        block_size: side of the dropped squares.
    """

    def __init__(self, drop_rate: float, block_size: int) -> None:
        super().__init__()
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        return drop_block(x, self.drop_rate, self.block_size)


class ResNet12Block(nn.Module):
    """Three 3x3 conv-BN-LeakyReLU(0.1) layers (no ReLU before the sum) with a 1x1 conv-BN shortcut, then 2x2 max-pool.

    Args:
        in_channels: input channels.
        channels: output channels.
        drop_rate: dropout rate after the pooling (DropBlock's rate with ``dropblock``).
        dropblock: DropBlock rather than dropout.
        dropblock_size: DropBlock's block side.
        track_running_stats: ordinary batch norm (True) or per-task batch norm (False, for MAML).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        drop_rate: float = 0.0,
        dropblock: bool = False,
        dropblock_size: int = 5,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                batch_norm_2d(channels, track_running_stats),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False), batch_norm_2d(channels, track_running_stats)
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop: nn.Module = nn.Identity()  # no random op at rate 0, so torch.func.vmap can batch the block
        if drop_rate > 0:
            self.drop = DropBlock(drop_rate, dropblock_size) if dropblock else nn.Dropout(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.pool(self.act(self.body(x) + self.shortcut(x))))


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020).

    Four :class:`ResNet12Block` s with 64-160-320-640 channels (12.42M parameters), each halving the
    image with a 2x2 max-pool. As in both papers' code, blocks 1-2 apply dropout and blocks 3-4
    DropBlock (Ghiasi et al. 2018, block side 5) after the pooling, both at ``drop_rate``; RFS
    ramps DropBlock's rate up over training, here it is fixed. The last map is averaged over space
    (``avg_pool=True``, RFS: 640-d) or flattened (MetaOptNet: 640 x 5 x 5 = 16000-d at 84 px).

    Inputs may have extra leading dimensions (``[..., C, H, W]``); they are kept in the output.

    Args:
        in_channels: image channels.
        channels: output channels of the four blocks.
        image_size: input side, for the flattened embedding size (at least 16: four max-pools).
        drop_rate: dropout (blocks 1-2) and DropBlock (blocks 3-4) rate; 0.1 in both papers.
        dropblock_size: DropBlock's block side (5 in both papers for mini-ImageNet, 2 for CIFAR-FS).
        avg_pool: average the last map over space (embedding ``channels[-1]``) or flatten it.
        dropout: dropout on the embedding (MetaOptNet's ``1 - keep_prob``).
        out_features: if set, a linear head to this many outputs (MAML's classifier), as in :class:`Conv4`.
        track_running_stats: batch norm with running statistics; False normalises every batch
            with its own statistics (:class:`TaskBatchNorm2d`), as MAML needs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, int, int, int] = (64, 160, 320, 640),
        image_size: int = 84,
        drop_rate: float = 0.1,
        dropblock_size: int = 5,
        avg_pool: bool = True,
        dropout: float = 0.0,
        out_features: int | None = None,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels={channels!r} must give the channels of 4 blocks")
        self.in_channels, self.min_image_size = in_channels, 16
        check_image_size("ResNet12", image_size, self.min_image_size, "four 2x2 max-pooling blocks")
        blocks, previous = [], in_channels
        for i, width in enumerate(channels):
            blocks.append(
                ResNet12Block(
                    previous, width, drop_rate, i >= 2, dropblock_size, track_running_stats=track_running_stats
                )
            )
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.avg_pool = avg_pool
        side = image_size // 16
        self.embedding_dim = channels[-1] if avg_pool else channels[-1] * side * side
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as in RFS
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        check_images("ResNet12", x, self.in_channels, self.min_image_size)
        lead = x.shape[:-3]
        h = self.blocks(x.reshape(-1, *x.shape[-3:]))
        h = self.dropout(h.mean(dim=(2, 3)) if self.avg_pool else h.flatten(1))
        if self.head is not None:
            h = self.head(h)
        return h.reshape(*lead, h.shape[-1])
