"""EpisodicDataModule: the base of every bundle."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch

# The episode settings are typed PositiveInt so that LightningCLI rejects a bad value while it parses,
# naming the key; a ValueError from __init__ would reach the user only under jsonargparse's
# "Does not validate against any of the Union subtypes", with a traceback.
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, get_worker_info

from .episodes import (
    SPLITS,
    ClassEpisodeSampler,
    ClassImages,
    EpisodeBatch,
    EpisodePlan,
    EpisodeStream,
    TaskSource,
    planned,
)

# EpisodeStream shards its batches across DataLoader workers itself, so its __len__ is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class EmptySplitError(ValueError):
    """A split has no classes. Raised when a stage uses the split; :meth:`prepare_data` skips such splits.

    Only the splits a stage uses are required (``fit``: train and val; ``validate``: val;
    ``test`` and ``predict``: test), so a data set without, say, test classes can still be fitted.
    """


def stage_uses(split: str) -> str:
    """Which stages use ``split``, for error messages: "fit, validate" for 'val'."""
    return ", ".join(stage for stage, splits in _STAGE_SPLITS.items() if split in splits)


class EpisodeLoader(DataLoader):
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
        self._epoch = epoch
        self._consumed = consumed
        self._handed_out = 0
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        stream: EpisodeStream = self.dataset  # type: ignore[assignment]
        if self._resume_at is not None:
            epoch, start = self._resume_at
            self._resume_at = None
            if start >= len(stream):
                # Saved after the epoch's last batch: the next iteration is the next epoch's.
                epoch, start = epoch + 1, 0
        else:
            epoch = self._epoch() if self._epoch is not None else stream.epoch
            start = 0
        stream.epoch, stream.start = epoch, start
        self._handed_out = start
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
                    batch = EpisodeBatch(*(part.pin_memory() for part in batch))
                self._handed_out += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        """The position in the training stream: ``{"epoch": e, "batches_consumed": n}``.

        Under DDP every rank runs the same number of training batches in lockstep, so the
        position that rank 0 saves holds for every rank; each rank still draws its own episodes.
        """
        consumed = self._consumed() if self._consumed is not None else None
        stream: EpisodeStream = self.dataset  # type: ignore[assignment]
        return {"epoch": stream.epoch, "batches_consumed": self._handed_out if consumed is None else consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the next iteration after the first ``batches_consumed`` batches of epoch ``epoch``."""
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))


def _send_plans(worker_id: int) -> None:
    """DataLoader worker init of an :class:`EpisodeLoader`: its copy of the stream yields plans."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, EpisodeStream):
        info.dataset.plans = True


class EpisodicDataModule(pl.LightningDataModule):
    """Base LightningDataModule that yields batches of N-way K-shot episodes (:class:`EpisodeBatch`).

    A bundle implements :meth:`load_split` (class-indexed uint8 images) or, for data that is not
    class-indexed, :meth:`make_source`. Everything else (validation of the episode settings,
    seeding, DDP sharding, DataLoaders, the uint8-to-float step on the device) lives here.

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
        # int(): the CLI passes jsonargparse's PositiveInt, an int subclass; keep plain ints.
        ways, shots, queries, tasks_per_batch = int(ways), int(shots), int(queries), int(tasks_per_batch)
        train_episodes, val_episodes, test_episodes = int(train_episodes), int(val_episodes), int(test_episodes)
        train_ways, train_shots, train_queries = (
            None if v is None else int(v) for v in (train_ways, train_shots, train_queries)
        )
        num_workers = int(num_workers)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.tasks_per_batch = tasks_per_batch
        self.episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.train_ways, self.train_shots, self.train_queries = train_ways, train_shots, train_queries
        self.seed, self.num_workers = seed, num_workers
        self.streams: dict[str, EpisodeStream] = {}
        self._train_loader: EpisodeLoader | None = None
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

    def _build_streams(self, stage: str) -> None:
        rank, world = self._rank_and_world()
        for split in _STAGE_SPLITS[stage]:
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

    def _loader(self, split: str) -> EpisodeLoader:
        if split not in self.streams:
            self._build_streams({"train": "fit", "val": "validate", "test": "test"}[split])
        if split != "train":
            return EpisodeLoader(self.streams[split], self.num_workers)
        loader = EpisodeLoader(self.streams[split], self.num_workers, self._current_epoch, self._batches_trained)
        if self._train_resume_at is not None:
            loader.load_state_dict(self._train_resume_at)
            self._train_resume_at = None
        self._train_loader = loader
        return loader

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

    def train_dataloader(self) -> EpisodeLoader:
        return self._loader("train")

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
            return EpisodeBatch(support_x, batch.support_y, query_x, batch.query_y)
        return batch

    def transform_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map a uint8 image batch to model input; override for normalisation."""
        return images.float().div_(255)

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        """Augment float training images ``[tasks, examples, C, H, W]`` on the device; identity by default.

        Called after :meth:`transform_images`, for training batches only, so validation and test
        episodes stay the same for a given seed. Bundles override it, for example with
        :func:`datamodules.augment.random_crop_flip` behind an ``augment`` flag.
        """
        return images


__all__ = ["EpisodicDataModule", "EpisodeLoader", "SPLITS"]
