"""Backbones: plain ``nn.Module``s from ``[N, C, H, W]`` (or ``[N, D]``) to ``[N, embedding_dim]``."""

from .conv4 import Conv4, TaskBatchNorm2d, to_channels_last, vmap_safe_batch_norm
from .mlp import MLP

__all__ = ["MLP", "Conv4", "TaskBatchNorm2d", "to_channels_last", "vmap_safe_batch_norm"]
