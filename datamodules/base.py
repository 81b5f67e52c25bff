"""EpisodicDataModule: the base of every bundle."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch

# The episode settings are typed PositiveInt so that LightningCLI rejects a bad value while it parses,
# naming the key; a ValueError from __init__ would reach the user only under jsonargparse's
# "Does not validate against any of the Union subtypes", with a traceback.
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from .episodes import (
    SPLITS,
    ClassEpisodeSampler,
    ClassImages,
    EpisodeBatch,
    EpisodePlan,
    EpisodeStream,
    TaskSource,
    episode_seed,
    planned,
)

# EpisodeStream shards its batches across DataLoader workers itself, so its __len__ is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
#: What the training DataLoader serves (``EpisodicDataModule(train_batches=...)``).
TRAIN_BATCHES = ("episodes", "labelled")


class EmptySplitError(ValueError):
    """A split has no classes. Raised when a stage uses the split; :meth:`prepare_data` skips such splits.

    Only the splits a stage uses are required (``fit``: train and val; ``validate``: val;
    ``test`` and ``predict``: test), so a data set without, say, test classes can still be fitted.
    """


def stage_uses(split: str) -> str:
    """Which stages use ``split``, for error messages: "fit, validate" for 'val'."""
    return ", ".join(stage for stage, splits in _STAGE_SPLITS.items() if split in splits)


class _ResumablePosition:
    """Where a training DataLoader is in its epochs, saved in checkpoints and restored on resume.

    ``epoch`` returns the trainer's current epoch (read when an iteration starts); ``consumed`` how
    many batches of it the training loop has finished (None outside a fit: then the batches this
    loader handed out count). Subclasses call :meth:`_next_position` when an iteration starts and
    count the batches they hand out in ``_handed_out``.
    """

    def _track_position(self, epoch: Callable[[], int] | None, consumed: Callable[[], int | None] | None) -> None:
        self._epoch = epoch
        self._consumed = consumed
        self._handed_out = 0
        self._resume_at: tuple[int, int] | None = None

    def _loaded_epoch(self) -> int:
        """The epoch of the current (or last) iteration."""
        raise NotImplementedError

    def _next_position(self, length: int) -> tuple[int, int]:
        """``(epoch, first batch)`` of the iteration that starts now; ``length`` is the batches of an epoch."""
        if self._resume_at is not None:
            epoch, start = self._resume_at
            self._resume_at = None
            if start >= length:
                # Saved after the epoch's last batch: the next iteration is the next epoch's.
                epoch, start = epoch + 1, 0
        else:
            epoch = self._epoch() if self._epoch is not None else self._loaded_epoch()
            start = 0
        self._handed_out = start
        return epoch, start

    def state_dict(self) -> dict[str, int]:
        """The position in the training batches: ``{"epoch": e, "batches_consumed": n}``.

        Under DDP every rank runs the same number of training batches in lockstep, so the
        position that rank 0 saves holds for every rank; each rank still draws its own batches.
        """
        consumed = self._consumed() if self._consumed is not None else None
        return {"epoch": self._loaded_epoch(), "batches_consumed": self._handed_out if consumed is None else consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the next iteration after the first ``batches_consumed`` batches of epoch ``epoch``."""
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))


class EpisodeLoader(_ResumablePosition, DataLoader):
    """A DataLoader over an :class:`EpisodeStream` that tells the stream the epoch and resumes mid-epoch.

    The epoch is read when iteration starts, so each epoch draws new training episodes while a
    resumed run redraws the same ones. Workers are not kept alive between epochs, because a
    persistent worker would keep a stale copy of the epoch.

    The loader is stateful in Lightning's sense: :meth:`state_dict` records the stream's epoch and
    how many of its batches the training loop has consumed, and :meth:`load_state_dict` makes the
    next iteration start right after them. The Trainer saves this state in every checkpoint and,
    when a fit restarts mid-epoch, loads it just before it creates the iterator, so the resumed
    run sees exactly the batches that an uninterrupted run would. ``len()`` stays the length of
    the whole epoch, because Lightning counts the resumed epoch's batches from its start.

    Fast paths: without workers the loader iterates the stream itself, skipping the DataLoader's
    per-batch machinery. With workers and a :class:`~datamodules.episodes.PlannedSource` (such as
    :class:`ClassEpisodeSampler`), the workers draw the batches' plans, small index arrays sent
    several batches to a message, and the loader gathers the images in the main process as
    batches leave it: the image cache is already in this process's memory, and shipping
    gathered pixels from a worker through shared memory (a segment, a file descriptor and page
    faults per tensor) costs far more than the gather. Batches the loader builds itself are
    pinned when ``pin_memory`` is set, as the DataLoader would pin them.

    Args:
        stream: the episodes to load.
        num_workers: DataLoader worker processes; the stream deals its batches to them.
        epoch: returns the current epoch (the trainer's); read when an iteration starts.
        consumed: returns how many batches of the current epoch the training loop has finished,
            or None outside a fit; by default, and when it returns None, the number of batches
            this loader has handed out in the current iteration.
    """

    def __init__(
        self,
        stream: EpisodeStream,
        num_workers: int,
        epoch: Callable[[], int] | None = None,
        consumed: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=_send_plans if num_workers > 0 and planned(stream.source) is not None else None,
        )
        self._track_position(epoch, consumed)

    def _loaded_epoch(self) -> int:
        stream: EpisodeStream = self.dataset  # type: ignore[assignment]
        return stream.epoch

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        stream: EpisodeStream = self.dataset  # type: ignore[assignment]
        stream.epoch, stream.start = self._next_position(len(stream))
        return self._count(iter(stream) if self.num_workers == 0 else super().__iter__())

    def _count(self, items: Iterator[Any]) -> Iterator[Any]:
        # Counted in the main process as batches leave the loader, so batches that workers have
        # prefetched but nobody has taken yet do not count.
        stream: EpisodeStream = self.dataset  # type: ignore[assignment]
        source = planned(stream.source)
        for item in items:
            gathered = isinstance(item, EpisodePlan)
            if gathered:
                assert source is not None
                batches: Iterable[Any] = map(source.gather, torch.from_numpy(item.index).split(item.sizes))
            else:
                batches = (item,)
            for batch in batches:
                # Pin what the DataLoader did not build: with workers, its pinning thread saw only plans.
                if self.pin_memory and (gathered or self.num_workers == 0):
                    batch = batch.pin_memory()
                self._handed_out += 1
                yield batch


def _send_plans(worker_id: int) -> None:
    """DataLoader worker init of an :class:`EpisodeLoader`: its copy of the stream yields plans."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, EpisodeStream):
        info.dataset.plans = True


class LabelledBatch(NamedTuple):
    """Labelled training images for supervised pre-training (``train_batches="labelled"``).

    Attributes:
        images: ``[N, C, H, W]`` (uint8 from the loader, float after the transfer to the device).
        labels: ``[N]`` int64 classes in ``0..num_train_classes-1``, numbered over the whole training split.
    """

    images: Tensor
    labels: Tensor


class LabelledImages(Dataset):
    """Every image of a :class:`ClassImages` cache labelled with its class; a batch is gathered with one index op."""

    def __init__(self, data: ClassImages) -> None:
        self.images = data.images
        self.labels = torch.arange(data.num_classes).repeat_interleave(data.counts)
        self.num_classes = data.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> LabelledBatch:
        return LabelledBatch(self.images[i], self.labels[i])

    def __getitems__(self, indices: list[int]) -> LabelledBatch:
        # The DataLoader fetches a whole batch through __getitems__; index_select copies one row per image.
        index = torch.as_tensor(indices, dtype=torch.long)
        return LabelledBatch(self.images.index_select(0, index), self.labels.index_select(0, index))


def _already_collated(batch: Any) -> Any:
    return batch  # LabelledImages.__getitems__ gathered the batch


class LabelledSampler(DistributedSampler):
    """This process's share of a new permutation of the training images every epoch.

    The permutation is a fixed function of the datamodule's ``seed`` and the epoch (Lightning's fit
    loop calls :meth:`set_epoch`), the same on every rank; rank ``r`` of ``w`` takes every ``w``-th
    image from ``r`` and the tail that does not divide evenly is dropped, so the shards are disjoint
    and equal. Being a ``DistributedSampler`` built with the trainer's rank and world size, Lightning
    leaves it in place under DDP rather than wrapping it. ``start`` skips that many of this
    process's images in the next iteration only (a resumed run skips the batches it trained on).
    """

    def __init__(self, dataset: LabelledImages, rank: int, world_size: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class LabelledLoader(_ResumablePosition, DataLoader):
    """The DataLoader of labelled training batches (full batches only); resumes mid-epoch like :class:`EpisodeLoader`.

    Args:
        dataset: the labelled training images.
        sampler: this process's share of them.
        batch_size: images per batch on each process.
        num_workers: DataLoader worker processes.
        epoch, consumed: as for :class:`EpisodeLoader`.
    """

    def __init__(
        self,
        dataset: LabelledImages,
        sampler: LabelledSampler,
        batch_size: int,
        num_workers: int,
        epoch: Callable[[], int] | None = None,
        consumed: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=_already_collated,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        self._track_position(epoch, consumed)

    def _loaded_epoch(self) -> int:
        return self.sampler.epoch  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: LabelledSampler = self.sampler  # type: ignore[assignment]
        epoch, start = self._next_position(len(self))
        sampler.set_epoch(epoch)
        sampler.start = start * int(self.batch_size or 1)
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch


class EpisodicDataModule(pl.LightningDataModule):
    """Base LightningDataModule that yields batches of N-way K-shot episodes (:class:`EpisodeBatch`).

    A bundle implements :meth:`load_split` (class-indexed uint8 images) or, for data that is not
    class-indexed, :meth:`make_source`. Everything else (validation of the episode settings,
    seeding, DDP sharding, DataLoaders, the uint8-to-float step on the device) lives here.

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

    #: "classification" (integer labels) or "regression" (float targets); picks the checkpoint metric.
    task: str = "classification"

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
        super().__init__()
        self.save_hyperparameters()
        positive = {
            "ways": ways,
            "shots": shots,
            "queries": queries,
            "tasks_per_batch": tasks_per_batch,
            "train_episodes": train_episodes,
            "val_episodes": val_episodes,
            "test_episodes": test_episodes,
            "train_ways": train_ways,
            "train_shots": train_shots,
            "train_queries": train_queries,
            "batch_size": batch_size,
        }
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                unset = f", or None to use {name[6:]}" if name.startswith("train_") and name[6:] in positive else ""
                raise ValueError(
                    f"{name}={value!r} must be at least 1; set {name} to a whole number of 1 or more{unset}"
                )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"num_workers={num_workers!r} must be at least 0; set it to 0 (sampling in this process) or more"
            )
        for name, value in (("ways", ways), ("train_ways", train_ways)):
            if self.task == "classification" and value == 1:
                raise ValueError(
                    f"{name}=1: a 1-way episode has a single class, so every prediction is right (loss 0, accuracy "
                    f"1.0) and nothing is learned; set {name} to 2 or more (5 or 20 in the papers)"
                )
        # int(): the CLI passes jsonargparse's PositiveInt, an int subclass; keep plain ints.
        ways, shots, queries, tasks_per_batch = int(ways), int(shots), int(queries), int(tasks_per_batch)
        train_episodes, val_episodes, test_episodes = int(train_episodes), int(val_episodes), int(test_episodes)
        train_ways, train_shots, train_queries = (
            None if v is None else int(v) for v in (train_ways, train_shots, train_queries)
        )
        num_workers = int(num_workers)
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
        self.train_batches, self.batch_size = train_batches, int(batch_size)
        self._labelled: LabelledImages | None = None
        self.ways, self.shots, self.queries = ways, shots, queries
        self.tasks_per_batch = tasks_per_batch
        self.episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.train_ways, self.train_shots, self.train_queries = train_ways, train_shots, train_queries
        self.seed, self.num_workers = seed, num_workers
        self.streams: dict[str, EpisodeStream] = {}
        self._train_loader: EpisodeLoader | LabelledLoader | None = None
        self._train_resume_at: dict[str, int] | None = None

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

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str) -> None:
        """Build the episode streams of the splits that ``stage`` needs."""
        # The Trainer calls setup before it restores a checkpoint, so a position loaded by an
        # earlier run (say trainer.validate(ckpt_path=...)) never leaks into this one.
        self._train_resume_at = None
        self._build_streams(stage)

    @property
    def num_train_classes(self) -> int:
        """The number of classes of the training split: the labels of ``train_batches="labelled"`` are below it."""
        if type(self).load_split is EpisodicDataModule.load_split:
            raise ValueError(
                f"{type(self).__name__} draws its episodes with make_source() and has no class-indexed training "
                "split, so no num_train_classes; pass the number of classes to the model instead"
            )
        return self.load_split("train").num_classes

    def _build_streams(self, stage: str) -> None:
        rank, world = self._rank_and_world()
        for split in _STAGE_SPLITS[stage]:
            if split == "train" and self.train_batches == "labelled":
                if self._labelled is None:
                    self._labelled = LabelledImages(self.load_split("train"))
                continue
            if split in self.streams and (self.streams[split].rank, self.streams[split].world_size) == (
                rank,
                world,
            ):
                continue
            self.streams[split] = EpisodeStream(
                self.make_source(split),
                split,
                self.episodes[split],
                self.tasks_per_batch,
                self.seed,
                rank,
                world,
            )

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

    def _loader(self, split: str) -> EpisodeLoader:
        if split not in self.streams:
            self._build_streams({"train": "fit", "val": "validate", "test": "test"}[split])
        if split != "train":
            return EpisodeLoader(self.streams[split], self.num_workers)
        loader = EpisodeLoader(self.streams[split], self.num_workers, self._current_epoch, self._batches_trained)
        self._resume(loader)
        return loader

    def _resume(self, loader: EpisodeLoader | LabelledLoader) -> None:
        """Make ``loader`` the training loader, starting where a loaded checkpoint stopped."""
        if self._train_resume_at is not None:
            loader.load_state_dict(self._train_resume_at)
            self._train_resume_at = None
        self._train_loader = loader

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position, which the Trainer saves in every checkpoint.

        ``{"train": {"epoch": e, "batches_consumed": n}}`` (see :meth:`EpisodeLoader.state_dict`),
        or ``{}`` before a training DataLoader exists.
        """
        return {} if self._train_loader is None else {"train": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next training DataLoader start where the saved stream stopped.

        The Trainer calls this on every resume, before it asks for the training DataLoader. A
        checkpoint saved mid-epoch continues that epoch after its consumed batches; one saved
        after an epoch's last batch starts the next epoch at its first batch. (The Trainer also
        restores the loader's own state when it restarts mid-epoch; both hold the same position.)
        """
        self._train_resume_at = state_dict.get("train")

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _batches_trained(self) -> int | None:
        # `processed` is where Lightning resumes: a batch whose step was interrupted (a checkpoint
        # taken on an exception or a preemption signal) is trained again, one whose step ended is not.
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[attr-defined]

    def train_dataloader(self) -> EpisodeLoader | LabelledLoader:
        return self._labelled_loader() if self.train_batches == "labelled" else self._loader("train")

    def val_dataloader(self) -> EpisodeLoader:
        return self._loader("val")

    def test_dataloader(self) -> EpisodeLoader:
        return self._loader("test")

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
