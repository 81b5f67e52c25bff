"""The meta-learning algorithms, one file each, every one an :class:`~lightning_meta.base.EpisodicModule`."""

from .maml import MAML
from .matchingnet import MatchingNet
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = ["MAML", "MatchingNet", "ProtoNet", "Reptile"]
