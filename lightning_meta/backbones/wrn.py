"""Wide residual networks (Zagoruyko & Komodakis 2016); WRN-28-10 is the backbone of S2M2 (Mangla et al. 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from .batchnorm import batch_norm_2d
from .inputs import check_image_size, check_images


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, with a 1x1 conv shortcut when the width changes.

    As in the authors' code, a block that changes width applies its first BN-ReLU to the shortcut too.

    Args:
        in_channels: input channels.
        channels: output channels.
        stride: stride of the first convolution and of the shortcut.
        drop_rate: dropout between the convolutions.
        track_running_stats: ordinary batch norm (True) or per-task batch norm (False, for MAML).
    """

    def __init__(
        self, in_channels: int, channels: int, stride: int, drop_rate: float = 0.0, track_running_stats: bool = True
    ) -> None:
        super().__init__()
        self.bn1, self.act1 = batch_norm_2d(in_channels, track_running_stats), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.act2 = batch_norm_2d(channels, track_running_stats), nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.shortcut = (
            None if in_channels == channels and stride == 1 else nn.Conv2d(in_channels, channels, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.drop(self.act2(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) as a few-shot embedding.

    A 3x3 stem with 16 filters, then three groups of ``(depth - 4) / 6`` :class:`WideBasicBlock` s
    with ``16k``, ``32k`` and ``64k`` channels (strides 1, 2, 2), a final BN-ReLU and global
    average pooling, as in S2M2 (Mangla et al. 2020) at 84 px: the embedding has ``64k`` features.

    Inputs may have extra leading dimensions (``[..., C, H, W]``); they are kept in the output.

    Args:
        depth: total depth, ``6n + 4`` (28 for WRN-28-10).
        widen_factor: width multiplier ``k`` (10 for WRN-28-10).
        in_channels: image channels.
        image_size: input side; only checked, since the pooled embedding does not depend on it.
        drop_rate: dropout inside the blocks (0.3 in the WRN paper on CIFAR, 0 in S2M2).
        out_features: if set, a linear head to this many outputs (MAML's classifier), as in :class:`Conv4`.
        track_running_stats: batch norm with running statistics; False normalises every batch
            with its own statistics (:class:`TaskBatchNorm2d`), as MAML needs.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        in_channels: int = 3,
        image_size: int = 84,
        drop_rate: float = 0.0,
        out_features: int | None = None,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth} must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...)")
        if widen_factor < 1:
            raise ValueError(f"widen_factor={widen_factor} must be a positive integer")
        # Stride-2 convolutions with padding 1 leave at least one pixel from any input.
        self.in_channels, self.min_image_size = in_channels, 1
        check_image_size(type(self).__name__, image_size, self.min_image_size, "a convolution")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        for group, stride in enumerate((1, 2, 2)):
            for i in range(n):
                previous = widths[group] if i == 0 else widths[group + 1]
                layers.append(
                    WideBasicBlock(previous, widths[group + 1], stride if i == 0 else 1, drop_rate, track_running_stats)
                )
        layers += [batch_norm_2d(widths[-1], track_running_stats), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.embedding_dim = widths[-1]
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as in the authors' code
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        check_images(type(self).__name__, x, self.in_channels, self.min_image_size)
        lead = x.shape[:-3]
        h = self.features(x.reshape(-1, *x.shape[-3:])).mean(dim=(2, 3))
        if self.head is not None:
            h = self.head(h)
        return h.reshape(*lead, h.shape[-1])


class WRN28_10(WideResNet):
    """WRN-28-10 (36.5M parameters, 640-d embedding), S2M2's backbone (Mangla et al. 2020); see :class:`WideResNet`.

    Args:
        in_channels: image channels.
        image_size: input side (84 for mini-ImageNet, 80 in S2M2's code, 32 for CIFAR-FS).
        drop_rate: dropout inside the blocks.
        out_features: if set, a linear head to this many outputs.
        track_running_stats: False for per-task batch norm (MAML).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 84,
        drop_rate: float = 0.0,
        out_features: int | None = None,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(28, 10, in_channels, image_size, drop_rate, out_features, track_running_stats)
