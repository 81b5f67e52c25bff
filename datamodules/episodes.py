"""Episodes: the batch type, the vectorised N-way K-shot sampler and the episode stream.

Every batch has a leading task dimension ``B``. Support items come first in class order
(``support_y = [0]*K + [1]*K + ...``), then the query items in class order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

SPLITS = ("train", "val", "test")

# Up to this size, ClassEpisodeSampler.gather copies support and query images with one call. glibc
# serves blocks over 32 MiB with fresh pages, whose page faults cost more than a second call saves.
_ONE_GATHER_BYTES = 1 << 24


class EpisodeBatch(NamedTuple):
    """A batch of few-shot episodes with a leading task dimension ``B``.

    The sampler that draws the episodes says how many classes they have (``ways``), so a module
    never reads it back from the labels (which would wait for the device). A batch built by hand
    may leave it out: :func:`episode_ways` then counts the labels once.

    Attributes:
        support_x: ``[B, N*K, C, H, W]`` images (uint8 from the sampler, float after transfer),
            or ``[B, N*K, D]`` features for regression tasks.
        support_y: ``[B, N*K]`` labels in ``0..N-1`` (or ``[B, N*K, D]`` regression targets).
        query_x: ``[B, N*Q, ...]`` like ``support_x``.
        query_y: ``[B, N*Q]`` like ``support_y``.
        ways: ``N``, the classes of every episode of the batch; None for regression tasks and for
            batches built without it.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int | None = None

    @property
    def num_tasks(self) -> int:
        """The number of episodes ``B`` in the batch."""
        return self.support_x.shape[0]

    @property
    def task(self) -> str:
        """The kind of task: ``"classification"`` (integer labels) or ``"regression"`` (float targets)."""
        return "regression" if self.support_y.is_floating_point() else "classification"

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support_x, support_y, query_x, query_y)``, without ``ways``: for code that maps over the tensors."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def pin_memory(self) -> EpisodeBatch:
        """The batch with its tensors in pinned memory (the DataLoader's pinning calls this)."""
        return self._replace(**{name: getattr(self, name).pin_memory() for name in _TENSORS})


_TENSORS = ("support_x", "support_y", "query_x", "query_y")


def as_episode_batch(batch: EpisodeBatch | tuple | list) -> EpisodeBatch:
    """Accept an :class:`EpisodeBatch` or a plain tuple ``(support_x, support_y, query_x, query_y[, ways])``."""
    if isinstance(batch, EpisodeBatch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) in (4, 5):
        return EpisodeBatch(*batch)
    raise TypeError(
        f"expected an EpisodeBatch or a 4-tuple (support_x, support_y, query_x, query_y), got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def episode_ways(batch: EpisodeBatch) -> int:
    """The number of classes ``N`` of a classification batch's episodes.

    ``batch.ways`` as the sampler set it; for a batch built by hand without it, one more than the
    largest support label, which waits for the device once.
    """
    if batch.ways is not None:
        return batch.ways
    if batch.support_y.is_floating_point():
        raise ValueError("this batch holds regression targets (float support_y), which have no ways")
    return int(batch.support_y.max()) + 1 if batch.support_y.numel() else 0


def episode_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (same on every machine and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TaskSource(Protocol):
    """Anything that draws a batch of episodes from a torch generator."""

    def sample(self, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:  # pragma: no cover
        """Draw ``num_tasks`` episodes."""
        ...


class PlannedSource(TaskSource, Protocol):
    """A :class:`TaskSource` that draws episodes in two steps: ``sample(B, g) == gather(draw(B, g))``.

    ``draw`` returns a small int64 tensor that says which data each episode uses (its plan), with
    the task dimension first; ``gather`` turns plans, or several concatenated along the first
    dimension, into the batch. :class:`EpisodeStream` uses this to move plans rather than images
    between processes. :class:`ClassEpisodeSampler` is one.
    """

    def draw(self, num_tasks: int, generator: torch.Generator) -> Tensor:  # pragma: no cover
        """The plans of ``num_tasks`` episodes."""
        ...

    def gather(self, index: Tensor) -> EpisodeBatch:  # pragma: no cover
        """The episodes of the plans ``index``."""
        ...


def planned(source: TaskSource) -> PlannedSource | None:
    """``source`` if it is a :class:`PlannedSource` (it has ``draw`` and ``gather``), else None."""
    return cast(PlannedSource, source) if hasattr(source, "draw") and hasattr(source, "gather") else None


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
    images per class with a few tensor ops, then gathers the images with one index operation; no
    Python loop over classes or images. :meth:`sample` is :meth:`gather` of :meth:`draw`: the two
    steps are public so that a DataLoader worker can draw the (small) row indices and the main
    process, which holds the cache, can gather the (large) images.
    """

    def __init__(self, data: ClassImages, ways: int, shots: int, queries: int) -> None:
        self.data = data
        self.ways, self.shots, self.queries = ways, shots, queries
        counts = data.counts
        self._counts = counts
        self._max_count = int(counts.max())
        self._uneven = self._max_count != int(counts.min())
        self._slots = torch.arange(self._max_count)
        self._layouts: dict[int, tuple[Tensor, Tensor]] = {}

    def draw(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """Draw ``num_tasks`` episodes as int64 row indices into ``data.images``.

        Returns:
            ``[B, N, K+Q]``: entry ``[t, c, s]`` is the row of image ``s`` of class ``c`` (label
            ``c``) of task ``t``; slots ``s < K`` are the support images, the others the queries.
            Indices of several draws concatenated along the first dimension are a valid input of
            :meth:`gather`.
        """
        n, k, q = self.ways, self.shots, self.queries
        # The n largest of uniform keys: a uniformly random ordered subset, and topk is ~6x faster than argsort.
        classes = torch.rand(num_tasks, self.data.num_classes, generator=generator).topk(n, dim=1).indices
        keys = torch.rand(num_tasks, n, self._max_count, generator=generator)
        if self._uneven:
            # Classes with fewer images: push the keys of missing slots past every real one.
            keys = keys.masked_fill(self._slots >= self._counts.take(classes).unsqueeze(-1), 2.0)
        within = keys.argsort(dim=-1)[..., : k + q]
        return self.data.offsets.take(classes).unsqueeze(-1) + within

    def gather(self, index: Tensor) -> EpisodeBatch:
        """The episodes of ``index`` (``[B, N, K+Q]`` from :meth:`draw`) with their images and labels."""
        b = index.shape[0]
        n, k, q = self.ways, self.shots, self.queries
        order, labels = self._layout(b)
        flat, labels, s = index.take(order), labels.clone(), b * n * k
        images, shape = self.data.images, self.data.images.shape[1:]
        # index_select is ~30x faster than advanced indexing for large images (one memcpy per row).
        if flat.numel() * math.prod(shape) * images.element_size() <= _ONE_GATHER_BYTES:
            # All support rows then all query rows in one call; both halves are views.
            gathered = images.index_select(0, flat)
            support, query = gathered[:s], gathered[s:]
        else:
            support, query = images.index_select(0, flat[:s]), images.index_select(0, flat[s:])
        return EpisodeBatch(
            support.view(b, n * k, *shape),
            labels[:s].view(b, n * k),
            query.view(b, n * q, *shape),
            labels[s:].view(b, n * q),
            n,
        )

    def sample(self, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        return self.gather(self.draw(num_tasks, generator))

    def _layout(self, num_tasks: int) -> tuple[Tensor, Tensor]:
        """For ``B`` tasks: where the support then query rows sit in a flattened draw, and their labels."""
        if num_tasks not in self._layouts:
            n, k = self.ways, self.shots
            position = torch.arange(num_tasks * n * (self.shots + self.queries)).view(num_tasks, n, -1)
            order = torch.cat((position[..., :k].flatten(), position[..., k:].flatten()))
            labels = torch.arange(n).view(1, n, 1).expand_as(position)
            self._layouts[num_tasks] = order, torch.cat((labels[..., :k].flatten(), labels[..., k:].flatten()))
        return self._layouts[num_tasks]


def collate_episodes(batches: list[EpisodeBatch]) -> EpisodeBatch:
    """Concatenate episode batches (of the same ``ways``) along the task dimension."""
    support_x, support_y, query_x, query_y = (torch.cat(parts) for parts in zip(*(b.tensors for b in batches),
                                                                                 strict=True))  # fmt: skip
    return EpisodeBatch(support_x, support_y, query_x, query_y, batches[0].ways)


@dataclass(frozen=True)
class EpisodePlan:
    """Consecutive batches as their plans: what a DataLoader worker sends in one message.

    Not a tuple, so that the DataLoader passes it through untouched (its ``default_convert``
    would turn a numpy field into a tensor), and a numpy array, because the worker result queue
    pickles it inline while every tensor takes a shared-memory segment of its own.

    Attributes:
        index: the batches' plans (``PlannedSource.draw`` indices) concatenated along the first dimension.
        sizes: the number of tasks of each batch: ``torch.from_numpy(index).split(sizes)`` are their plans.
    """

    index: np.ndarray
    sizes: tuple[int, ...]


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

    With ``plans`` set, which :class:`~datamodules.base.EpisodeLoader` does in its DataLoader
    workers, and a :class:`PlannedSource`, iteration yields the plans of its batches, as
    :class:`EpisodePlan` messages of ``plan_episodes // tasks_per_batch`` (at least one)
    consecutive batches, for the main process to gather: the image cache is already in its memory
    (memory-mapped or shared with the forked workers), and moving the gathered pixels between
    processes through shared memory costs far more than gathering them there. The messages,
    rather than single batches, are dealt round-robin to the workers, so batches still arrive in
    order. Otherwise it yields the batches.
    """

    #: Yield :class:`EpisodePlan` messages instead of batches when the source is planned.
    plans: bool = False
    #: Episodes per :class:`EpisodePlan` message, rounded down to whole batches: each message
    #: between processes costs about as much as gathering a batch of Omniglot episodes.
    plan_episodes: int = 16

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

    def _train_generator(self, j: int) -> torch.Generator:
        return torch.Generator().manual_seed(episode_seed(self.seed, "train", self.epoch, self.rank, j))

    def _episode_generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(episode_seed(self.seed, self.split, i))

    def _episodes_of(self, j: int) -> range:
        return range(j * self.tasks_per_batch, min((j + 1) * self.tasks_per_batch, self.episodes))

    def batch(self, j: int) -> EpisodeBatch:
        """Batch ``j`` of this process's share (train) or of the whole split (val/test)."""
        source = planned(self.source)
        if source is not None:
            return source.gather(self.plan(j))
        if self.split == "train":
            return self.source.sample(self.tasks_per_batch, self._train_generator(j))
        return collate_episodes([self.episode(i) for i in self._episodes_of(j)])

    def plan(self, j: int) -> Tensor:
        """The plan of :meth:`batch` ``j``, for a :class:`PlannedSource`: ``batch(j) == source.gather(plan(j))``."""
        source = planned(self.source)
        if source is None:
            raise TypeError(f"{type(self.source).__name__} has no draw() and gather(), so its batches have no plans")
        if self.split == "train":
            return source.draw(self.tasks_per_batch, self._train_generator(j))
        return torch.cat([source.draw(1, self._episode_generator(i)) for i in self._episodes_of(j)])

    def episode(self, i: int) -> EpisodeBatch:
        """Evaluation episode ``i`` of this split (a batch of one task)."""
        return self.source.sample(1, self._episode_generator(i))

    def __iter__(self) -> Iterator[EpisodeBatch | EpisodePlan]:
        # Skip before dealing to workers, so that the remaining batches still arrive in order.
        batches = self._local_batches()[self.start :]
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if not (self.plans and planned(self.source) is not None):
            for j in batches[worker::workers]:
                yield self.batch(j)
            return
        size = max(1, self.plan_episodes // self.tasks_per_batch)
        for first in range(worker * size, len(batches), workers * size):
            plans = [self.plan(j) for j in batches[first : first + size]]
            yield EpisodePlan(torch.cat(plans).numpy(), tuple(len(plan) for plan in plans))
