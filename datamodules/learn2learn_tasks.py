"""Episodes from learn2learn's ``TaskDataset`` objects (the ``learn2learn`` extra).

learn2learn is imported only when a :class:`Learn2LearnTasks` is built, so the rest of the
package works without it.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Sequence
from typing import Any

import torch

from .base import EpisodicDataModule
from .episodes import SPLITS, EpisodeBatch, collate_episodes

INSTALL = 'pip install "lightning-meta[learn2learn]"'
#: learn2learn's name for each of our splits (BenchmarkTasksets fields).
_L2L_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def import_learn2learn() -> Any:
    """Import learn2learn, or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module("learn2learn")
    except ImportError as err:
        raise ImportError(
            f"Learn2LearnTasks needs the learn2learn package, which is not installed ({err}); "
            f"install it with: {INSTALL}"
        ) from err


class TaskDatasetSource:
    """A :class:`~datamodules.episodes.TaskSource` over one learn2learn ``TaskDataset``.

    Each task the ``TaskDataset`` samples holds ``ways * (shots + queries)`` examples; the first
    ``shots`` of each class (in the order learn2learn drew them, which is random) become the
    support set and the rest the queries. Labels are remapped to ``0..ways-1`` in the order of
    the labels learn2learn gave, so :class:`RemapLabels` is optional.

    learn2learn draws with Python's global ``random`` module (and a dataset transform may use
    torch's global generator). :meth:`sample` seeds both from the episode's ``generator`` and
    restores them afterwards, so an episode is a fixed function of its seed.
    """

    def __init__(self, tasks: Any, ways: int, shots: int, queries: int, split: str) -> None:
        self.tasks, self.split = tasks, split
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                torch.manual_seed(seed)
                drawn = [self.tasks.sample() for _ in range(num_tasks)]
        finally:
            random.setstate(state)
        return collate_episodes([self.episode(task) for task in drawn])

    def episode(self, task: Sequence[Any]) -> EpisodeBatch:
        """Split one learn2learn task ``(data, labels)`` into a one-task :class:`EpisodeBatch`."""
        data, labels = torch.as_tensor(task[0]), torch.as_tensor(task[1])
        n, k, q = self.ways, self.shots, self.queries
        classes, remapped, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if labels.dim() != 1 or len(classes) != n or bool((counts != k + q).any()):
            raise ValueError(
                f"the '{self.split}' TaskDataset gave a task with {len(classes)} classes of "
                f"{counts.tolist()} examples, but ways={n}, shots + queries = {k} + {q} = {k + q}; "
                f"build it with NWays(dataset, {n}) and KShots(dataset, {k + q})"
            )
        order = torch.argsort(remapped, stable=True)  # class by class, learn2learn's order within a class
        grouped = data.index_select(0, order).reshape(n, k + q, *data.shape[1:])  # much faster than data[order]
        support = grouped[:, :k].reshape(1, n * k, *data.shape[1:])
        query = grouped[:, k:].reshape(1, n * q, *data.shape[1:])
        return EpisodeBatch(
            support,
            torch.arange(n).repeat_interleave(k).unsqueeze(0),
            query,
            torch.arange(n).repeat_interleave(q).unsqueeze(0),
        )


class Learn2LearnTasks(EpisodicDataModule):
    """Episodes drawn by learn2learn ``TaskDataset`` objects (Arnold et al. 2020), one per split.

    Either name a benchmark of ``learn2learn.vision.benchmarks`` ("omniglot", "mini-imagenet",
    "tiered-imagenet", "fc100", "cifarfs"), built by ``get_tasksets`` with ``ways`` and
    ``shots + queries`` (and the ``train_*`` settings for training), or, from Python, pass your own
    TaskDatasets with :meth:`from_tasksets`. Each task is split into ``shots`` support and
    ``queries`` query examples per class with labels ``0..ways-1``, batched like every bundle.
    Images arrive as learn2learn's transforms make them (floats for its benchmarks), not uint8.

    Determinism: learn2learn samples with Python's ``random``. Every draw is seeded from the
    stream's episode seed (and the global ``random`` and torch states are restored afterwards),
    so with ``num_tasks=-1`` validation and test episode ``i`` is the same for a given ``seed``
    whatever the number of workers or processes, and training batches depend only on
    ``(seed, epoch, rank, batch)``. With ``num_tasks > 0`` learn2learn caches the description of
    each task id when first drawn, so an episode then depends on what the same process drew before,
    and runs with different worker or process counts can differ. Randomness inside dataset
    transforms is reproducible only if it uses ``random`` or torch's global generator.

    Args:
        benchmark: name of a learn2learn benchmark (see above); None with :meth:`from_tasksets`.
        root: where learn2learn keeps (and downloads) the benchmark's data.
        num_tasks: learn2learn's ``num_tasks``: -1 draws a fresh task every time.
        **kwargs: the episode settings of :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        benchmark: str | None = None,
        root: str = "~/data",
        num_tasks: int = -1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        l2l = import_learn2learn()
        if benchmark is not None and benchmark not in l2l.vision.benchmarks.list_tasksets():
            raise ValueError(
                f"benchmark={benchmark!r} is not a learn2learn benchmark; use one of "
                f"{sorted(l2l.vision.benchmarks.list_tasksets())}, or pass TaskDatasets with from_tasksets()"
            )
        if num_tasks == 0 or num_tasks < -1:
            raise ValueError(f"num_tasks={num_tasks} must be -1 (a new task every draw) or positive")
        self.benchmark, self.root, self.num_tasks = benchmark, root, num_tasks
        self.tasksets: dict[str, Any] | None = None

    @classmethod
    def from_tasksets(cls, train: Any, val: Any, test: Any, **kwargs: Any) -> Learn2LearnTasks:
        """Build from three learn2learn ``TaskDataset`` objects (train, validation, test).

        Each must sample ``ways * (shots + queries)`` examples per task (``train_ways`` and the
        other ``train_*`` settings for ``train``), e.g. with ``NWays``, ``KShots``, ``LoadData``.
        ``kwargs`` are the episode settings of :class:`Learn2LearnTasks` (``ways``, ``shots``, ...).
        """
        if "benchmark" in kwargs:
            raise ValueError("from_tasksets() takes TaskDatasets, not benchmark=; use Learn2LearnTasks(benchmark=...)")
        module = cls(benchmark=None, **kwargs)
        module.tasksets = {"train": train, "val": val, "test": test}
        return module

    def _benchmark_tasksets(self) -> dict[str, Any]:
        l2l = import_learn2learn()
        train_ways, train_shots, train_queries = self.episode_shape("train")
        tasksets = l2l.vision.benchmarks.get_tasksets(
            self.benchmark,
            train_ways=train_ways,
            train_samples=train_shots + train_queries,
            test_ways=self.ways,
            test_samples=self.shots + self.queries,
            num_tasks=self.num_tasks,
            root=self.root,
        )
        return {split: getattr(tasksets, _L2L_SPLITS[split]) for split in SPLITS}

    def prepare_data(self) -> None:
        """Let learn2learn download the benchmark, on one process."""
        if self.tasksets is None and self.benchmark is not None:
            self._benchmark_tasksets()

    def make_source(self, split: str) -> TaskDatasetSource:
        if self.tasksets is None:
            if self.benchmark is None:
                raise ValueError(
                    "Learn2LearnTasks needs benchmark= (a learn2learn benchmark name) or TaskDatasets "
                    "passed with Learn2LearnTasks.from_tasksets(train, val, test)"
                )
            self.tasksets = self._benchmark_tasksets()
        ways, shots, queries = self.episode_shape(split)
        return TaskDatasetSource(self.tasksets[split], ways, shots, queries, split)


__all__ = ["Learn2LearnTasks", "TaskDatasetSource", "import_learn2learn"]
