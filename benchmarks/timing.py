"""Shared helpers of the step-time benchmarks: random episodes and a wall-clock timer."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from datamodules import EpisodeBatch


def random_episodes(tasks: int, ways: int, shots: int, queries: int, shape: tuple[int, ...]) -> EpisodeBatch:
    """A fixed batch of ``tasks`` episodes of random images in [0, 1] (the same for every method)."""
    g = torch.Generator().manual_seed(0)
    return EpisodeBatch(
        torch.rand(tasks, ways * shots, *shape, generator=g),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.rand(tasks, ways * queries, *shape, generator=g),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous(),
        ways,
    )


def ms_per_step(step: Callable[[], None], steps: int, warmup: int = 1) -> float:
    """Median wall time of ``step`` in milliseconds over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
