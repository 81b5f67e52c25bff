"""Where :class:`EpisodicModule` and its helpers lived; they are in :mod:`lightning_meta.bases.episodic` now."""

from .bases.episodic import (
    AdaptationCurve,
    EpisodeOutput,
    EpisodicModule,
    adaptation_curve_steps,
    at_least_float32,
    embed_episode,
    support_onehot,
)

__all__ = [
    "AdaptationCurve",
    "EpisodeOutput",
    "EpisodicModule",
    "adaptation_curve_steps",
    "at_least_float32",
    "embed_episode",
    "support_onehot",
]
