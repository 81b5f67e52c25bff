"""RL2 lives with the meta-RL kit (:mod:`lightning_meta.rl.rl2`); this path keeps configs and checkpoints."""

from ..rl.rl2 import RL2

__all__ = ["RL2"]
