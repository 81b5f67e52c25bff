"""Where :class:`GradientModule` lived; it is in :mod:`lightning_meta.bases.gradient` now."""

from ..bases.gradient import BackboneHead, GradientModule

__all__ = ["BackboneHead", "GradientModule"]
