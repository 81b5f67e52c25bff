"""lightning-meta: few-shot meta-learning algorithms as PyTorch Lightning modules.

Everything a user names in YAML by short name is exported here: the algorithms, the backbones,
the inner optimisers of gradient-based methods, and the inference helpers.
"""

from .threads import apply_cli_policy

apply_cli_policy()  # the lightning-meta command's OpenMP wait policy: must come before torch loads

from . import functional, inner_optimizers
from .algorithms import (
    ANIL,
    LSLR,
    MAML,
    R2D2,
    RFS,
    Aggregate,
    Baseline,
    BaselinePlusPlus,
    MAMLPlusPlus,
    MatchingNet,
    MetaNetwork,
    MetaOptNet,
    ProtoNet,
    Reptile,
)
from .backbones import (
    MLP,
    WRN28_10,
    Conv4,
    ResNet12,
    TaskBatchNorm2d,
    TimmBackbone,
    TorchvisionBackbone,
    WideResNet,
    task_batch_norm,
)
from .bases import AdaptationCurve, EpisodeOutput, EpisodicModule, GradientModule
from .checkpoints import load_checkpoint
from .functional import SGD, Adam, InnerOptimizer, MetaSGD, Momentum, forward_with, inner_loop, map_tasks, select_params
from .inference import predict_episode, predict_folders
from .memory_format import ChannelsLast
from .precision import default_precision
from .rl import MAMLRL, RL2  # meta-RL (not EpisodicModules)

#: Base classes: subclass them, do not train them directly.
BASE_CLASSES = ("EpisodicModule", "GradientModule")

__all__ = [
    "ANIL",
    "LSLR",
    "MAML",
    "MAMLRL",
    "MLP",
    "R2D2",
    "RFS",
    "RL2",
    "SGD",
    "WRN28_10",
    "AdaptationCurve",
    "Adam",
    "Aggregate",
    "Baseline",
    "BaselinePlusPlus",
    "ChannelsLast",
    "Conv4",
    "EpisodeOutput",
    "EpisodicModule",
    "GradientModule",
    "InnerOptimizer",
    "MAMLPlusPlus",
    "MatchingNet",
    "MetaNetwork",
    "MetaOptNet",
    "MetaSGD",
    "Momentum",
    "ProtoNet",
    "Reptile",
    "ResNet12",
    "TaskBatchNorm2d",
    "TimmBackbone",
    "TorchvisionBackbone",
    "WideResNet",
    "default_precision",
    "forward_with",
    "functional",
    "inner_optimizers",
    "inner_loop",
    "load_checkpoint",
    "map_tasks",
    "predict_episode",
    "predict_folders",
    "select_params",
    "task_batch_norm",
]
__version__ = "0.1.0"
