"""EpisodicDataModule: the base of every bundle of few-shot episodes.

Its stream machinery (seeding, DDP sharding, DataLoaders, mid-epoch resume) is that of
:class:`~datamodules.stream.StreamDataModule`; the loaders, the resumable position and the labelled
pre-training batches have files of their own, re-exported here.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

from .episodes import SPLITS, ClassEpisodeSampler, ClassImages, EpisodeBatch, TaskSource, episode_seed
from .labelled import LabelledBatch, LabelledImages, LabelledLoader, LabelledSampler
from .loader import EpisodeLoader
from .stream import STAGE_SPLITS, NonNegativeInt, PositiveInt, StreamDataModule, check_positive

# EpisodeStream shards its batches across DataLoader workers itself, so its __len__ is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")

#: What the training DataLoader serves (``EpisodicDataModule(train_batches=...)``).
TRAIN_BATCHES = ("episodes", "labelled")


class EmptySplitError(ValueError):
    """A split has no classes. Raised when a stage uses the split; :meth:`prepare_data` skips such splits.

    Only the splits a stage uses are required (``fit``: train and val; ``validate``: val;
    ``test`` and ``predict``: test), so a data set without, say, test classes can still be fitted.
    """


def stage_uses(split: str) -> str:
    """Which stages use ``split``, for error messages: "fit, validate" for 'val'."""
    return ", ".join(stage for stage, splits in STAGE_SPLITS.items() if split in splits)


class EpisodicDataModule(StreamDataModule):
    """Base LightningDataModule that yields batches of N-way K-shot episodes (:class:`EpisodeBatch`).

    A bundle implements :meth:`load_split` (class-indexed uint8 images) or, for data that is not
    class-indexed, :meth:`make_source`. Everything else lives here (validation of the episode
    settings, the uint8-to-float step on the device) or in :class:`~datamodules.stream.StreamDataModule`
    (seeding, DDP sharding, DataLoaders, mid-epoch resume).

    With ``train_batches="labelled"`` the training DataLoader serves the training split as plain
    labelled batches (:class:`LabelledBatch`: ``batch_size`` images per process, labels
    ``0..num_train_classes-1`` over all training classes, a new order every epoch, the bundle's
    training augmentation, disjoint shards under DDP) for supervised pre-training (Chen et al. 2019;
    Tian et al. 2020); validation and test stay the same fixed episodes. It needs a class-indexed
    bundle (one with :meth:`load_split`). The episode settings of training are then unused.

    Args:
        ways: classes per episode (N) for validation and test, and for training unless ``train_ways``.
        shots: labelled support examples per class (K).
        queries: query examples per class (Q).
        tasks_per_batch: episodes per batch (the meta-batch size).
        train_episodes: training episodes per epoch, over all processes.
        val_episodes: validation episodes per epoch (the same ones every epoch).
        test_episodes: test episodes.
        train_ways: ways for training episodes only (e.g. 60 as in Snell et al. 2017).
        train_shots: shots for training episodes only.
        train_queries: queries for training episodes only.
        seed: fixes the validation and test episodes, and with the epoch and rank the training ones.
        num_workers: DataLoader worker processes (sampling is vectorised; 0 is often fastest).
        train_batches: "episodes" (the default) or "labelled" (see above).
        batch_size: training images per batch and process with ``train_batches="labelled"``.
    """

    def __init__(
        self,
        ways: PositiveInt = 5,
        shots: PositiveInt = 1,
        queries: PositiveInt = 15,
        tasks_per_batch: PositiveInt = 1,
        train_episodes: PositiveInt = 100,
        val_episodes: PositiveInt = 100,
        test_episodes: PositiveInt = 1000,
        train_ways: PositiveInt | None = None,
        train_shots: PositiveInt | None = None,
        train_queries: PositiveInt | None = None,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
        train_batches: Literal["episodes", "labelled"] = "episodes",
        batch_size: PositiveInt = 64,
    ) -> None:
        episode = {"ways": ways, "shots": shots, "queries": queries}
        for name, value in episode.items():
            check_positive(name, value)
        super().__init__(tasks_per_batch, train_episodes, val_episodes, test_episodes, seed, num_workers)
        for name, value in {
            "train_ways": train_ways,
            "train_shots": train_shots,
            "train_queries": train_queries,
        }.items():
            check_positive(name, value, f", or None to use {name[6:]}")
        check_positive("batch_size", batch_size)
        for name, value in (("ways", ways), ("train_ways", train_ways)):
            if self.task == "classification" and value == 1:
                raise ValueError(
                    f"{name}=1: a 1-way episode has a single class, so every prediction is right (loss 0, accuracy "
                    f"1.0) and nothing is learned; set {name} to 2 or more (5 or 20 in the papers)"
                )
        if train_batches not in TRAIN_BATCHES:
            raise ValueError(
                f"train_batches={train_batches!r} must be one of {', '.join(map(repr, TRAIN_BATCHES))}: "
                "'episodes' for episodic training, 'labelled' for supervised pre-training"
            )
        if train_batches == "labelled" and type(self).load_split is EpisodicDataModule.load_split:
            raise ValueError(
                f"train_batches='labelled' serves the class-indexed images of load_split(), but "
                f"{type(self).__name__} draws its episodes with make_source() and has none; use "
                "train_batches='episodes' or a class-indexed bundle"
            )
        # int(): the CLI passes jsonargparse's PositiveInt, an int subclass; keep plain ints.
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.train_ways, self.train_shots, self.train_queries = (
            None if v is None else int(v) for v in (train_ways, train_shots, train_queries)
        )
        self.train_batches, self.batch_size = train_batches, int(batch_size)
        self._labelled: LabelledImages | None = None

    # ----------------------------------------------------------------- hooks for bundles
    def load_split(self, split: str) -> ClassImages:
        """Return the class-indexed uint8 images of ``split`` ('train', 'val' or 'test').

        Called from :meth:`setup` on every process; cache expensive work in :meth:`prepare_data`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load_split() or make_source()")

    def make_source(self, split: str) -> TaskSource:
        """Return what draws the episodes of ``split``; by default a sampler over :meth:`load_split`."""
        ways, shots, queries = self.episode_shape(split)
        data = self.load_split(split)
        self.check_split(split, data)
        return ClassEpisodeSampler(data, ways, shots, queries)

    # ----------------------------------------------------------------- shared machinery
    def episode_shape(self, split: str) -> tuple[int, int, int]:
        """``(ways, shots, queries)`` of the episodes of ``split``."""
        if split == "train":
            return (
                self.train_ways or self.ways,
                self.train_shots or self.shots,
                self.train_queries or self.queries,
            )
        return self.ways, self.shots, self.queries

    def _param(self, split: str, name: str) -> str:
        return f"train_{name}" if split == "train" and getattr(self, f"train_{name}") is not None else name

    def check_split(self, split: str, data: ClassImages) -> None:
        """Raise a clear ValueError when the episode settings do not fit the data of ``split``."""
        ways, shots, queries = self.episode_shape(split)
        name = type(self).__name__
        if ways > data.num_classes:
            raise ValueError(
                f"{self._param(split, 'ways')}={ways} but the '{split}' split of {name} has "
                f"{data.num_classes} classes; lower {self._param(split, 'ways')} or add classes"
            )
        counts = data.counts
        smallest = int(counts.argmin())
        if shots + queries > counts[smallest]:
            raise ValueError(
                f"{self._param(split, 'shots')} + {self._param(split, 'queries')} = {shots} + {queries} = "
                f"{shots + queries} but class '{data.names[smallest]}' of the '{split}' split of {name} "
                f"has only {int(counts[smallest])} examples; lower shots or queries"
            )

    @property
    def num_train_classes(self) -> int:
        """The number of classes of the training split: the labels of ``train_batches="labelled"`` are below it."""
        if type(self).load_split is EpisodicDataModule.load_split:
            raise ValueError(
                f"{type(self).__name__} draws its episodes with make_source() and has no class-indexed training "
                "split, so no num_train_classes; pass the number of classes to the model instead"
            )
        return self.load_split("train").num_classes

    def _streamed_splits(self, stage: str) -> tuple[str, ...]:
        labelled = self.train_batches == "labelled"
        return tuple(split for split in super()._streamed_splits(stage) if not (labelled and split == "train"))

    def _build_streams(self, stage: str) -> None:
        if self.train_batches == "labelled" and "train" in STAGE_SPLITS[stage] and self._labelled is None:
            self._labelled = LabelledImages(self.load_split("train"))
        super()._build_streams(stage)

    def _labelled_loader(self) -> LabelledLoader:
        if self._labelled is None:
            self._build_streams("fit")
        assert self._labelled is not None
        rank, world = self._rank_and_world()
        share = len(self._labelled) // world
        if share < self.batch_size:
            where = f", {share} per process over {world} processes" if world > 1 else ""
            raise ValueError(
                f"batch_size={self.batch_size} but the 'train' split of {type(self).__name__} has "
                f"{len(self._labelled)} images{where}; lower batch_size"
            )
        # Its own seed stream, so the labelled order is not tied to any episode's.
        sampler = LabelledSampler(self._labelled, rank, world, episode_seed(self.seed, "labelled"))
        loader = LabelledLoader(
            self._labelled, sampler, self.batch_size, self.num_workers, self._current_epoch, self._batches_trained
        )
        self._resume(loader)
        return loader

    def train_dataloader(self) -> EpisodeLoader | LabelledLoader:
        return self._labelled_loader() if self.train_batches == "labelled" else self._loader("train")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn uint8 images into floats on the device (4x less to copy), and augment training batches."""
        if isinstance(batch, EpisodeBatch) and batch.support_x.dtype == torch.uint8:
            support_x, query_x = self.transform_images(batch.support_x), self.transform_images(batch.query_x)
            if self.trainer is not None and self.trainer.training:
                support_x, query_x = self.augment_images(support_x), self.augment_images(query_x)
            return batch._replace(support_x=support_x, query_x=query_x)
        if isinstance(batch, LabelledBatch) and batch.images.dtype == torch.uint8:
            images = self.transform_images(batch.images)
            if self.trainer is not None and self.trainer.training:
                images = self.augment_images(images)
            return LabelledBatch(images, batch.labels)
        return batch

    def transform_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map a uint8 image batch to model input; override for normalisation."""
        return images.float().div_(255)

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        """Augment float training images ``[tasks, examples, C, H, W]`` or ``[N, C, H, W]``; identity by default.

        Called after :meth:`transform_images`, for training batches only, so validation and test
        episodes stay the same for a given seed. Bundles override it, for example with
        :func:`datamodules.augment.random_crop_flip` behind an ``augment`` flag.
        """
        return images


__all__ = [
    "EpisodicDataModule",
    "EpisodeLoader",
    "LabelledBatch",
    "LabelledImages",
    "LabelledLoader",
    "LabelledSampler",
    "SPLITS",
    "TRAIN_BATCHES",
]
