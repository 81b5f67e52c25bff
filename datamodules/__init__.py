"""Episodic LightningDataModules and dataset bundles for few-shot learning."""

from .base import EpisodeLoader, EpisodicDataModule
from .episodes import ClassEpisodeSampler, ClassImages, EpisodeBatch, EpisodeStream, as_episode_batch
from .learn2learn_tasks import Learn2LearnTasks
from .omniglot import Omniglot
from .sinusoid import Sinusoid

__all__ = [
    "ClassEpisodeSampler",
    "ClassImages",
    "EpisodeBatch",
    "EpisodeLoader",
    "EpisodeStream",
    "EpisodicDataModule",
    "Learn2LearnTasks",
    "Omniglot",
    "Sinusoid",
    "as_episode_batch",
]
