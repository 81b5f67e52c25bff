"""Labelled training batches for supervised pre-training: the dataset, its DDP sampler and its resumable loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .episodes import ClassImages
from .position import ResumablePosition


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


class LabelledLoader(ResumablePosition, DataLoader):
    """The DataLoader of labelled training batches (full batches only); resumes mid-epoch like an EpisodeLoader.

    Args:
        dataset: the labelled training images.
        sampler: this process's share of them.
        batch_size: images per batch on each process.
        num_workers: DataLoader worker processes.
        epoch, consumed: as for :class:`~datamodules.loader.EpisodeLoader`.
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


__all__ = ["LabelledBatch", "LabelledImages", "LabelledLoader", "LabelledSampler"]
