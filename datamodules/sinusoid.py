"""Sinusoid regression tasks of the MAML paper (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import EpisodicDataModule, PositiveInt
from .episodes import EpisodeBatch


class SinusoidTasks:
    """Draws tasks ``y = A sin(x - phi)`` with ``A``, ``phi`` and ``x`` uniform in their ranges."""

    def __init__(
        self,
        shots: int,
        queries: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample(self, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator) * (high - low) + low

        amplitude = uniform(*self.amplitude, num_tasks, 1, 1)
        phase = uniform(*self.phase, num_tasks, 1, 1)
        x = uniform(*self.x_range, num_tasks, self.shots + self.queries, 1)
        y = amplitude * torch.sin(x - phase)
        k = self.shots
        return EpisodeBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


class Sinusoid(EpisodicDataModule):
    """Few-shot sinusoid regression (Finn et al. 2017): amplitude 0.1-5.0, phase 0-pi, x in [-5, 5].

    Generated on the fly, no files: the embedded default that runs anywhere. Each episode is one
    sine; ``support_x``/``query_x`` are ``[B, K, 1]`` inputs and ``support_y``/``query_y`` the
    ``[B, K, 1]`` targets.

    The episode arguments are those of :class:`EpisodicDataModule`, with other defaults for the
    four below; ``ways`` is always 1 (one function per task).

    Args:
        shots: support points per task (K; the paper uses 5, 10 and 20).
        queries: query points per task for the outer loss and the evaluation.
        tasks_per_batch: tasks per meta-batch (25 in the paper).
        train_episodes: training tasks per epoch.
        amplitude_min, amplitude_max, phase_min, phase_max, x_min, x_max: the task distribution.
        **kwargs: the other episode settings of :class:`EpisodicDataModule` (``val_episodes``,
            ``test_episodes``, ``train_shots``, ``train_queries``, ``seed``, ``num_workers``).
    """

    task = "regression"

    def __init__(
        self,
        shots: PositiveInt = 10,
        queries: PositiveInt = 10,
        tasks_per_batch: PositiveInt = 25,
        train_episodes: PositiveInt = 2500,
        amplitude_min: float = 0.1,
        amplitude_max: float = 5.0,
        phase_min: float = 0.0,
        phase_max: float = math.pi,
        x_min: float = -5.0,
        x_max: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            ways=1,
            train_ways=None,
            shots=shots,
            queries=queries,
            tasks_per_batch=tasks_per_batch,
            train_episodes=train_episodes,
            **kwargs,
        )
        for name, low, high in (("amplitude", amplitude_min, amplitude_max), ("phase", phase_min, phase_max),
                                ("x", x_min, x_max)):  # fmt: skip
            if not low <= high:
                raise ValueError(f"{name}_min={low} must not exceed {name}_max={high}")
        self.task_distribution = {
            "amplitude": (amplitude_min, amplitude_max),
            "phase": (phase_min, phase_max),
            "x_range": (x_min, x_max),
        }

    def make_source(self, split: str) -> SinusoidTasks:
        _, shots, queries = self.episode_shape(split)
        return SinusoidTasks(shots, queries, **self.task_distribution)
