"""Task distributions for meta-reinforcement learning: the environment interface and the datamodule.

A batch is a ``[B, P]`` tensor of task parameters (a goal, a mass, a target velocity); the
environment that the module rolls out in belongs to the datamodule (``datamodule.env``). Tasks are
seeded like episodes (:class:`~datamodules.episodes.EpisodeStream`): fixed validation and test
tasks for a seed, different training tasks per epoch and DDP rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..episodes import EpisodeStream, episode_seed
from ..stream import NonNegativeInt, PositiveInt, StreamDataModule


class TaskEnv:
    """A batch of environments, one task per row, several trajectories per task, stepped together.

    Subclasses set ``obs_dim``, ``action_dim`` (the number of actions when ``discrete``) and
    ``horizon``, and implement :meth:`sample_tasks`, :meth:`reset` and :meth:`step`. Observations,
    rewards and dones are float tensors on the device of the task parameters.
    """

    obs_dim: int
    action_dim: int
    horizon: int
    discrete: bool = False

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """``[num_tasks, P]`` task parameters drawn with ``generator``."""
        raise NotImplementedError

    def reset(self, tasks: Tensor, trajectories: int, generator: torch.Generator | None = None) -> Tensor:
        """Start ``trajectories`` episodes of each task: observations ``[B, n, obs_dim]``."""
        raise NotImplementedError

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Apply ``[B, n, A]`` actions (``[B, n]`` indices when discrete): ``(obs, reward [B, n], done [B, n])``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release simulators and worker processes (the datamodule's ``teardown`` calls it)."""


class _TaskSource:
    """Adapts :meth:`TaskEnv.sample_tasks` to the ``sample(num_tasks, generator)`` of episode sources."""

    def __init__(self, env: TaskEnv) -> None:
        self.env = env

    def sample(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        return self.env.sample_tasks(num_tasks, generator)


class TaskStream(EpisodeStream):
    """:class:`EpisodeStream` over task parameters: evaluation batches concatenate fixed tasks."""

    def batch(self, j: int) -> Tensor:  # type: ignore[override]
        if self.split == "train":
            return super().batch(j)  # type: ignore[return-value]
        return torch.cat([self.episode(i) for i in self._episodes_of(j)])  # type: ignore[misc]

    def rollout_seed(self, batch_idx: int) -> int:
        """The seed of the rollouts on this process's evaluation batch ``batch_idx``.

        A function of the seed, the split and the batch's index in the whole split, so an
        evaluation rolls out the same actions whatever the process count.
        """
        return episode_seed(self.seed, self.split, self._local_batches()[batch_idx], "rollout")


class TaskDistribution(StreamDataModule):
    """Base LightningDataModule of meta-RL task distributions: batches of ``[B, P]`` task parameters.

    Subclasses build their :class:`TaskEnv` in ``__init__`` as ``self.env``. Seeding, DDP sharding
    and mid-epoch resume are those of :class:`~datamodules.stream.StreamDataModule`, the sibling of
    the episodes' :class:`~datamodules.base.EpisodicDataModule`.

    Args:
        tasks_per_batch: tasks per meta-batch (20 in Finn et al. 2017).
        train_episodes: training tasks per epoch, over all processes.
        val_episodes: validation tasks (the same ones every epoch).
        test_episodes: test tasks.
        seed: fixes the validation and test tasks, and with the epoch and rank the training ones.
        num_workers: DataLoader workers (drawing tasks is cheap: 0).
    """

    task = "reinforcement"
    stream_class = TaskStream
    pin_memory = False  # task tensors are tiny: pinning them costs more than it saves
    env: TaskEnv

    def __init__(
        self,
        tasks_per_batch: PositiveInt = 20,
        train_episodes: PositiveInt = 400,
        val_episodes: PositiveInt = 40,
        test_episodes: PositiveInt = 100,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(tasks_per_batch, train_episodes, val_episodes, test_episodes, seed, num_workers)

    def make_source(self, split: str) -> _TaskSource:  # type: ignore[override]
        return _TaskSource(self.env)

    def rollout_generator(self, split: str, batch_idx: int, device: torch.device) -> torch.Generator:
        """A generator for the rollouts on evaluation batch ``batch_idx`` of ``split``: the same actions every run."""
        stream = self.stream(split)
        assert isinstance(stream, TaskStream)
        return torch.Generator(device=device).manual_seed(stream.rollout_seed(batch_idx))

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        self.env.close()


__all__ = ["TaskDistribution", "TaskEnv", "TaskStream"]
