"""lightning-meta: few-shot meta-learning algorithms as PyTorch Lightning modules."""

from .algorithms import MAML, MatchingNet, ProtoNet, Reptile
from .backbones import MLP, Conv4
from .base import EpisodicModule
from .inference import load_checkpoint, predict_episode, predict_folders

__all__ = [
    "MAML",
    "MLP",
    "Conv4",
    "EpisodicModule",
    "MatchingNet",
    "ProtoNet",
    "Reptile",
    "load_checkpoint",
    "predict_episode",
    "predict_folders",
]
__version__ = "0.1.0"
