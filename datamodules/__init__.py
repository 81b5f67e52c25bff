"""Episodic LightningDataModules and dataset bundles for few-shot learning."""

from .base import EmptySplitError, EpisodeLoader, EpisodicDataModule, LabelledBatch
from .cifar import CIFARFS, FC100
from .cub import CUB
from .download import DownloadError
from .episodes import ClassEpisodeSampler, ClassImages, EpisodeBatch, EpisodeStream, as_episode_batch, episode_ways
from .imagefolder import EpisodicImageFolder
from .learn2learn_tasks import Learn2LearnTasks
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .sinusoid import Sinusoid
from .stream import StreamDataModule
from .tieredimagenet import TieredImageNet

__all__ = [
    "CIFARFS",
    "CUB",
    "ClassEpisodeSampler",
    "ClassImages",
    "DownloadError",
    "EmptySplitError",
    "EpisodeBatch",
    "EpisodeLoader",
    "EpisodeStream",
    "EpisodicImageFolder",
    "EpisodicDataModule",
    "FC100",
    "LabelledBatch",
    "Learn2LearnTasks",
    "MiniImageNet",
    "Omniglot",
    "Sinusoid",
    "StreamDataModule",
    "TieredImageNet",
    "as_episode_batch",
    "episode_ways",
]
