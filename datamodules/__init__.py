"""Episodic LightningDataModules and dataset bundles for few-shot learning."""

from .base import EpisodeLoader, EpisodicDataModule
from .cub import CUB
from .episodes import ClassEpisodeSampler, ClassImages, EpisodeBatch, EpisodeStream, as_episode_batch
from .imagefolder import EpisodicImageFolder
from .learn2learn_tasks import Learn2LearnTasks
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .sinusoid import Sinusoid
from .tieredimagenet import TieredImageNet

__all__ = [
    "CUB",
    "ClassEpisodeSampler",
    "ClassImages",
    "EpisodeBatch",
    "EpisodeLoader",
    "EpisodeStream",
    "EpisodicImageFolder",
    "EpisodicDataModule",
    "Learn2LearnTasks",
    "MiniImageNet",
    "Omniglot",
    "Sinusoid",
    "TieredImageNet",
    "as_episode_batch",
]
