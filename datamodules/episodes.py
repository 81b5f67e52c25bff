"""Episodes: the batch type, the vectorised N-way K-shot sampler and the episode stream.

Every batch has a leading task dimension ``B``. Support items come first in class order
(``support_y = [0]*K + [1]*K + ...``), then the query items in class order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

SPLITS = ("train", "val", "test")


class EpisodeBatch(NamedTuple):
    """A batch of few-shot episodes with a leading task dimension ``B``.

    Attributes:
        support_x: ``[B, N*K, C, H, W]`` images (uint8 from the sampler, float after transfer),
            or ``[B, N*K, D]`` features for regression tasks.
        support_y: ``[B, N*K]`` labels in ``0..N-1`` (or ``[B, N*K, D]`` regression targets).
        query_x: ``[B, N*Q, ...]`` like ``support_x``.
        query_y: ``[B, N*Q]`` like ``support_y``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """The number of episodes ``B`` in the batch."""
        return self.support_x.shape[0]


def as_episode_batch(batch: EpisodeBatch | tuple | list) -> EpisodeBatch:
    """Accept an :class:`EpisodeBatch` or a plain 4-tuple ``(support_x, support_y, query_x, query_y)``."""
    if isinstance(batch, EpisodeBatch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 4:
        return EpisodeBatch(*batch)
    raise TypeError(
        f"expected an EpisodeBatch or a 4-tuple (support_x, support_y, query_x, query_y), got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def episode_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (same on every machine and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TaskSource(Protocol):
    """Anything that draws a batch of episodes from a torch generator."""

    def sample(self, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:  # pragma: no cover
        """Draw ``num_tasks`` episodes."""
        ...


@dataclass
class ClassImages:
    """A class-indexed image cache: all images of class ``c`` are ``images[offsets[c]:offsets[c+1]]``.

    Attributes:
        images: ``[M, C, H, W]`` uint8 tensor.
        offsets: ``[num_classes + 1]`` int64 tensor of class boundaries.
        names: one name per class, for error messages and inspection.
    """

    images: Tensor
    offsets: Tensor
    names: list[str]

    @classmethod
    def from_equal_classes(cls, images: Tensor, names: list[str]) -> ClassImages:
        """Build from a ``[num_classes, per_class, C, H, W]`` tensor."""
        num_classes, per_class = images.shape[:2]
        offsets = torch.arange(num_classes + 1, dtype=torch.long) * per_class
        return cls(images.reshape(num_classes * per_class, *images.shape[2:]), offsets, names)

    @property
    def num_classes(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class ClassEpisodeSampler:
    """Vectorised N-way K-shot sampler over a :class:`ClassImages` cache.

    For a batch of ``B`` tasks it draws ``N`` distinct classes per task and ``K + Q`` distinct
    images per class with a few tensor ops (``rand().argsort()``), then gathers the images with
    one index operation; no Python loop over classes or images.
    """

    def __init__(self, data: ClassImages, ways: int, shots: int, queries: int) -> None:
        self.data = data
        self.ways, self.shots, self.queries = ways, shots, queries
        counts = data.counts
        self._counts = counts
        self._max_count = int(counts.max())
        self._support_y = torch.arange(ways).repeat_interleave(shots)
        self._query_y = torch.arange(ways).repeat_interleave(queries)

    def sample(self, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        n, k, q = self.ways, self.shots, self.queries
        # The n largest of uniform keys: a uniformly random ordered subset, and topk is ~6x faster than argsort.
        classes = torch.rand(num_tasks, self.data.num_classes, generator=generator).topk(n, dim=1).indices
        keys = torch.rand(num_tasks, n, self._max_count, generator=generator)
        if self._max_count != int(self._counts.min()):
            # Classes with fewer images: push the keys of missing slots past every real one.
            missing = torch.arange(self._max_count) >= self._counts[classes].unsqueeze(-1)
            keys = keys.masked_fill(missing, 2.0)
        within = keys.argsort(dim=-1)[..., : k + q]
        index = self.data.offsets[classes].unsqueeze(-1) + within  # [B, N, K+Q]
        images = self.data.images
        # index_select is ~30x faster than advanced indexing for large images (one memcpy per row).
        support = images.index_select(0, index[..., :k].flatten()).view(num_tasks, n * k, *images.shape[1:])
        query = images.index_select(0, index[..., k:].flatten()).view(num_tasks, n * q, *images.shape[1:])
        return EpisodeBatch(
            support,
            self._support_y.expand(num_tasks, -1).clone(),
            query,
            self._query_y.expand(num_tasks, -1).clone(),
        )


def collate_episodes(batches: list[EpisodeBatch]) -> EpisodeBatch:
    """Concatenate episode batches along the task dimension."""
    return EpisodeBatch(*(torch.cat(parts) for parts in zip(*batches, strict=True)))


class EpisodeStream(IterableDataset):
    """The episodes of one split for one epoch on one process, batched by ``tasks_per_batch``.

    Training: each batch is drawn from a generator seeded by ``(seed, epoch, rank, batch)``, so
    every DDP rank sees different tasks and the stream does not depend on ``num_workers``.
    Validation and test: episode ``i`` is a fixed function of ``(seed, split, i)``; the batches
    are dealt round-robin to ranks (batch ``j`` to rank ``j % world_size``) and then to
    DataLoader workers, so each episode is evaluated exactly once whatever the process count.

    ``epoch`` and ``start`` say where the next iteration begins: it yields this process's batches
    ``start, start + 1, ...`` of that epoch (``start`` lets a run resumed mid-epoch skip the
    batches it already trained on). ``len()`` is always the length of a whole epoch.
    """

    def __init__(
        self,
        source: TaskSource,
        split: str,
        episodes: int,
        tasks_per_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.source, self.split = source, split
        self.episodes, self.tasks_per_batch = episodes, tasks_per_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start = 0

    def _local_batches(self) -> list[int]:
        if self.split == "train":
            # Every rank must run the same number of optimizer steps under DDP.
            return list(range(math.ceil(self.episodes / (self.tasks_per_batch * self.world_size))))
        total = math.ceil(self.episodes / self.tasks_per_batch)
        return list(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        return len(self._local_batches())

    def batch(self, j: int) -> EpisodeBatch:
        """Batch ``j`` of this process's share (train) or of the whole split (val/test)."""
        if self.split == "train":
            g = torch.Generator().manual_seed(episode_seed(self.seed, "train", self.epoch, self.rank, j))
            return self.source.sample(self.tasks_per_batch, g)
        first, last = j * self.tasks_per_batch, min((j + 1) * self.tasks_per_batch, self.episodes)
        return collate_episodes([self.episode(i) for i in range(first, last)])

    def episode(self, i: int) -> EpisodeBatch:
        """Evaluation episode ``i`` of this split (a batch of one task)."""
        g = torch.Generator().manual_seed(episode_seed(self.seed, self.split, i))
        return self.source.sample(1, g)

    def __iter__(self) -> Iterator[EpisodeBatch]:
        # Skip before dealing to workers, so that the remaining batches still arrive in order.
        batches = self._local_batches()[self.start :]
        info = get_worker_info()
        if info is not None:
            batches = batches[info.id :: info.num_workers]
        for j in batches:
            yield self.batch(j)
