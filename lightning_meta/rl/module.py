"""Where :class:`MetaRLModule` lived; it is in :mod:`lightning_meta.bases.meta_rl` now."""

from ..bases.meta_rl import MetaRLModule, start_timer

__all__ = ["MetaRLModule", "start_timer"]
