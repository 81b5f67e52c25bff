"""EpisodeLoader: the DataLoader of a seeded stream, resumable mid-epoch, with its fast paths."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, get_worker_info

from .episodes import EpisodePlan, EpisodeStream, planned
from .position import ResumablePosition


def pinned(batch: Any) -> Any:
    """``batch`` in pinned memory: a tensor, or a tuple or named tuple (an ``EpisodeBatch``) of tensors."""
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    parts = [part.pin_memory() if isinstance(part, Tensor) else part for part in batch]
    return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)


class EpisodeLoader(ResumablePosition, DataLoader):
    """A DataLoader over an :class:`EpisodeStream` that tells the stream the epoch and resumes mid-epoch.

    It loads the stream of every :class:`~datamodules.stream.StreamDataModule`: episodes, and the
    task parameters of meta-RL (:class:`~datamodules.rl.base.TaskStream`).

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
        pin_memory: pin batches in page-locked memory when a GPU is available.
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
        pin_memory: bool = True,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
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
                    batch = pinned(batch)
                self._handed_out += 1
                yield batch


def _send_plans(worker_id: int) -> None:
    """DataLoader worker init of an :class:`EpisodeLoader`: its copy of the stream yields plans."""
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, EpisodeStream):
        info.dataset.plans = True


__all__ = ["EpisodeLoader", "pinned"]
