"""StreamDataModule: the seeded, resumable, DDP-sharded stream of batches under every datamodule.

Two children: :class:`~datamodules.base.EpisodicDataModule` (few-shot episodes) and
:class:`~datamodules.rl.base.TaskDistribution` (task parameters of meta-RL).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

# The stream settings are typed PositiveInt so that LightningCLI rejects a bad value while it parses,
# naming the key; a ValueError from __init__ would reach the user only under jsonargparse's
# "Does not validate against any of the Union subtypes", with a traceback.
from jsonargparse.typing import NonNegativeInt, PositiveInt

from .episodes import EpisodeStream, TaskSource
from .labelled import LabelledLoader
from .loader import EpisodeLoader

#: The splits each Trainer stage uses.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
_SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test"}


class StreamDataModule(pl.LightningDataModule):
    """Base LightningDataModule of seeded streams of batches: what episodes and meta-RL tasks share.

    A child implements :meth:`make_source` (what draws the batches of a split). This base owns the
    rest: one :class:`~datamodules.episodes.EpisodeStream` per split (``stream_class``), seeded so
    that validation and test batches are the same for a seed whatever the process count, and
    training batches differ per epoch and DDP rank; the DataLoaders; and the training position
    that checkpoints save, so a fit resumed mid-epoch sees exactly the batches an uninterrupted
    one would.

    Args:
        tasks_per_batch: tasks (episodes) per batch (the meta-batch size).
        train_episodes: training tasks per epoch, over all processes.
        val_episodes: validation tasks per epoch (the same ones every epoch).
        test_episodes: test tasks.
        seed: fixes the validation and test tasks, and with the epoch and rank the training ones.
        num_workers: DataLoader worker processes (sampling is vectorised; 0 is often fastest).
    """

    #: "classification" (integer labels), "regression" (float targets) or "reinforcement"; picks the checkpoint metric.
    task: str = "classification"
    #: The stream of each split: batch ``j`` of a split as a function of the seed (and epoch and rank).
    stream_class: type[EpisodeStream] = EpisodeStream
    #: Pin batches in page-locked memory when a GPU is available.
    pin_memory: bool = True

    def __init__(
        self,
        tasks_per_batch: PositiveInt = 1,
        train_episodes: PositiveInt = 100,
        val_episodes: PositiveInt = 100,
        test_episodes: PositiveInt = 1000,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        positive = {
            "tasks_per_batch": tasks_per_batch,
            "train_episodes": train_episodes,
            "val_episodes": val_episodes,
            "test_episodes": test_episodes,
        }
        for name, value in positive.items():
            check_positive(name, value)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"num_workers={num_workers!r} must be at least 0; set it to 0 (sampling in this process) or more"
            )
        # int(): the CLI passes jsonargparse's PositiveInt, an int subclass; keep plain ints.
        self.tasks_per_batch = int(tasks_per_batch)
        self.episodes = {"train": int(train_episodes), "val": int(val_episodes), "test": int(test_episodes)}
        self.seed, self.num_workers = seed, int(num_workers)
        self.streams: dict[str, EpisodeStream] = {}
        self._train_loader: EpisodeLoader | LabelledLoader | None = None
        self._train_resume_at: dict[str, int] | None = None

    # ----------------------------------------------------------------- the hook of children
    def make_source(self, split: str) -> TaskSource:
        """Return what draws the batches of ``split`` ('train', 'val' or 'test'): ``sample(num_tasks, generator)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_source()")

    # ----------------------------------------------------------------- streams and loaders
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str) -> None:
        """Build the streams of the splits that ``stage`` needs."""
        # The Trainer calls setup before it restores a checkpoint, so a position loaded by an
        # earlier run (say trainer.validate(ckpt_path=...)) never leaks into this one.
        self._train_resume_at = None
        self._build_streams(stage)

    def _streamed_splits(self, stage: str) -> tuple[str, ...]:
        """The splits of ``stage`` that are served as streams."""
        return STAGE_SPLITS[stage]

    def _build_streams(self, stage: str) -> None:
        rank, world = self._rank_and_world()
        for split in self._streamed_splits(stage):
            stream = self.streams.get(split)
            if stream is not None and (stream.rank, stream.world_size) == (rank, world):
                continue
            self.streams[split] = self.stream_class(
                self.make_source(split), split, self.episodes[split], self.tasks_per_batch, self.seed, rank, world
            )

    def stream(self, split: str) -> EpisodeStream:
        """The stream of ``split`` on this process, built if it is not yet."""
        if split not in self.streams:
            self._build_streams(_SPLIT_STAGE[split])
        return self.streams[split]

    def _loader(self, split: str) -> EpisodeLoader:
        stream = self.stream(split)
        if split != "train":
            return EpisodeLoader(stream, self.num_workers, pin_memory=self.pin_memory)
        loader = EpisodeLoader(stream, self.num_workers, self._current_epoch, self._batches_trained, self.pin_memory)
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

        ``{"train": {"epoch": e, "batches_consumed": n}}`` (see
        :meth:`~datamodules.position.ResumablePosition.state_dict`), or ``{}`` before a training
        DataLoader exists.
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
        return self._loader("train")

    def val_dataloader(self) -> EpisodeLoader:
        return self._loader("val")

    def test_dataloader(self) -> EpisodeLoader:
        return self._loader("test")


def check_positive(name: str, value: Any, unset: str = "") -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is None or a whole number of at least 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}={value!r} must be at least 1; set {name} to a whole number of 1 or more{unset}")


__all__ = ["STAGE_SPLITS", "NonNegativeInt", "PositiveInt", "StreamDataModule", "check_positive"]
