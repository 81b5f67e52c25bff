"""What an algorithm returns for a batch of episodes: the contract between a method, its base and the callbacks.

A room of its own, below the bases and the callbacks, so that both can name it without importing
each other.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class AdaptationCurve(NamedTuple):
    """The query loss of each task along its inner loop, returned by gradient-based algorithms in evaluation.

    Attributes:
        steps: the inner steps measured (:func:`~lightning_meta.functional.adaptation_curve_steps`).
        losses: ``[B, len(steps)]`` query loss of each task after those steps (detached); the last
            column is the loss after all steps.
    """

    steps: list[int]
    losses: Tensor


class EpisodeOutput(NamedTuple):
    """What an algorithm returns for a batch of episodes (:meth:`EpisodicModule.episode_loss`).

    Attributes:
        loss: ``[B]`` per-episode query loss.
        predictions: ``[B, N*Q, N]`` query logits (``[B, N*Q, D]`` for regression).
        adaptation: the adaptation curve, for algorithms with an inner loop (logged by
            :class:`~lightning_meta.callbacks.AdaptationCurveLogger`).
    """

    loss: Tensor
    predictions: Tensor
    adaptation: AdaptationCurve | None = None


__all__ = ["AdaptationCurve", "EpisodeOutput"]
