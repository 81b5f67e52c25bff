"""The meta-learning algorithms, one file each, each a subclass of one of the bases in :mod:`lightning_meta.bases`."""

from ..inner_optimizers import LSLR
from .aggregate import Aggregate
from .anil import ANIL
from .baseline import Baseline, BaselinePlusPlus
from .maml import MAML
from .mamlpp import MAMLPlusPlus
from .matchingnet import MatchingNet
from .metanetwork import MetaNetwork
from .metaoptnet import MetaOptNet
from .protonet import ProtoNet
from .r2d2 import R2D2
from .reptile import Reptile
from .rfs import RFS

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
