"""lightning-meta: few-shot meta-learning algorithms as PyTorch Lightning modules."""

from .base import EpisodicModule
from .maml import MAML
from .matchingnet import MatchingNet
from .models import MLP, Conv4
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = ["MAML", "MLP", "Conv4", "EpisodicModule", "MatchingNet", "ProtoNet", "Reptile"]
__version__ = "0.1.0"
