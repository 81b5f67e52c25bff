"""MAMLRL lives with the meta-RL kit (:mod:`lightning_meta.rl.maml_rl`); this path keeps configs and checkpoints."""

from ..rl.maml_rl import MAMLRL

__all__ = ["MAMLRL"]
