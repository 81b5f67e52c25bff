"""Baseline and Baseline++ (Chen et al. 2019): pre-train a classifier, fit a new head per episode.

Their base, :class:`~lightning_meta.bases.pretrained.PretrainedModule`, and RFS
(:mod:`lightning_meta.algorithms.rfs`) are importable from here too, as before.
"""

from __future__ import annotations

from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from ..bases.pretrained import Head, PretrainedModule


class CosineClassifier(nn.Module):
    """``scale * cos(z, w_c)`` for every class ``c``: the classifier of Baseline++ (Chen et al. 2019, section 3.2)."""

    def __init__(self, in_features: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_features, num_classes, bias=False).weight.detach().clone())
        self.scale = scale

    def forward(self, z: Tensor) -> Tensor:
        return self.scale * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T


class Baseline(PretrainedModule):
    """Baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification", section 3.1).

    Pre-trains the backbone with a linear classifier over all training classes; at evaluation a new
    linear head (zero-initialised) is fitted on each episode's support embeddings with Adam (see
    :meth:`PretrainedModule.fit_episode_head`) and classifies the queries. The arguments are
    those of :class:`PretrainedModule`.
    """

    def make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(cast(int, self.backbone.embedding_dim), num_classes)

    def init_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        tasks, _, dim = support.shape
        return [support.new_zeros(tasks, ways, dim), support.new_zeros(tasks, ways)]

    def episode_head_logits(self, head: Head, z: Tensor) -> Tensor:
        weight, bias = head
        return z @ weight.transpose(1, 2) + bias.unsqueeze(1)


class BaselinePlusPlus(Baseline):
    """Baseline++ (Chen et al. 2019, section 3.2): a cosine-similarity classifier with a scale.

    Logits are ``scale`` times the cosine similarity between the embedding and each class's weight
    vector, in pre-training (over all training classes) and in each episode's head. The episode
    head starts from the normalised class means of the support embeddings (weight imprinting,
    deterministic; Chen et al. start from random weights) and is fitted as Baseline's.

    Args:
        scale: the scale of the cosine similarities; None follows Chen et al.'s code: 2 for up to
            200 classes, 10 for more (so 10 for the 4112 Omniglot training classes, 2 in a 5-way episode).
        **kwargs: the arguments of :class:`PretrainedModule`.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if scale is not None and not scale > 0:
            raise ValueError(f"scale={scale!r} must be positive, or None for Chen et al.'s 2 or 10")
        self.scale = scale
        super().__init__(backbone, **kwargs)

    def scale_for(self, num_classes: int) -> float:
        """The cosine scale for ``num_classes`` classes."""
        if self.scale is not None:
            return self.scale
        return 2.0 if num_classes <= 200 else 10.0

    def make_classifier(self, num_classes: int) -> nn.Module:
        return CosineClassifier(cast(int, self.backbone.embedding_dim), num_classes, self.scale_for(num_classes))

    def init_episode_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        onehot = F.one_hot(support_y, ways).to(support.dtype)
        return [onehot.transpose(1, 2) @ F.normalize(support, dim=-1)]

    def episode_head_logits(self, head: Head, z: Tensor) -> Tensor:
        (weight,) = head
        scale = self.scale_for(weight.shape[1])
        return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(1, 2)


def __getattr__(name: str) -> Any:
    # RFS moved to its own file, which imports Baseline from here: imported on first use, not at the top.
    if name == "RFS":
        from .rfs import RFS

        return RFS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Baseline", "BaselinePlusPlus", "CosineClassifier", "PretrainedModule"]
