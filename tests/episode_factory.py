"""Random episodes in the EpisodeBatch layout for the module tests."""

from collections.abc import Callable

import torch

from datamodules import EpisodeBatch


def make_episodes(
    tasks: int,
    ways: int,
    shots: int,
    queries: int,
    shape: tuple[int, ...],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    draw: Callable[..., torch.Tensor] = torch.randn,
) -> EpisodeBatch:
    """Float32 inputs cast to ``dtype`` (float32 and float64 copies hold the same values); labels in class order."""
    g = torch.Generator().manual_seed(seed)
    return EpisodeBatch(
        draw(tasks, ways * shots, *shape, generator=g).to(dtype),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1),
        draw(tasks, ways * queries, *shape, generator=g).to(dtype),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1),
        ways,
    )
