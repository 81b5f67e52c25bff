"""The meta-learning algorithms, one file each, every one an :class:`~lightning_meta.base.EpisodicModule`."""

from ..inner_optimizers import LSLR
from .aggregate import Aggregate
from .anil import ANIL
from .baseline import RFS, Baseline, BaselinePlusPlus
from .maml import MAML
from .mamlpp import MAMLPlusPlus
from .matchingnet import MatchingNet
from .metanetwork import MetaNetwork
from .metaoptnet import MetaOptNet
from .protonet import ProtoNet
from .r2d2 import R2D2
from .reptile import Reptile

__all__ = [
    "ANIL",
    "LSLR",
    "MAML",
    "R2D2",
    "RFS",
    "Aggregate",
    "Baseline",
    "BaselinePlusPlus",
    "MAMLPlusPlus",
    "MatchingNet",
    "MetaNetwork",
    "MetaOptNet",
    "ProtoNet",
    "Reptile",
]
