"""HalfCheetah task families of Finn et al. 2017 (section 5.3) on gymnasium's maintained MuJoCo environments.

Needs the optional extra: ``pip install "lightning-meta[rl]"`` (``gymnasium[mujoco]``); gymnasium is
imported only when an environment is built, so the rest of the library imports without it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..stream import PositiveInt
from .base import TaskDistribution, TaskEnv


def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        raise ImportError(
            "HalfCheetahVel and HalfCheetahDir need gymnasium with MuJoCo; install the 'rl' extra: "
            'pip install "lightning-meta[rl]" (or pip install "gymnasium[mujoco]>=1.0")'
        ) from error
    return gymnasium


class _Copies:
    """``size`` HalfCheetah copies as a gymnasium vector environment of equal chunks.

    One chunk steps in this process (``SyncVectorEnv``), or one chunk per worker process
    (``AsyncVectorEnv``, ``spawn`` start method: safe beside torch's threads and CUDA); the last
    chunk is padded with copies whose results are dropped.
    """

    def __init__(self, size: int, workers: int, horizon: int) -> None:
        gymnasium = _gymnasium()
        from ._cheetah_chunk import CheetahChunk

        self.size, chunks = size, min(workers, size)
        self.per = -(-size // chunks)
        fns = [partial(CheetahChunk, self.per, w * self.per, horizon) for w in range(chunks)]
        vector = gymnasium.vector
        self.vector = vector.SyncVectorEnv(fns) if chunks == 1 else vector.AsyncVectorEnv(fns, context="spawn")
        self.chunks = chunks

    def _rows(self, obs: np.ndarray) -> np.ndarray:
        return obs.reshape(self.chunks * self.per, -1)[: self.size]

    def reset(self, seed: int) -> np.ndarray:
        return self._rows(self.vector.reset(options={"seed": seed})[0])

    def step(self, actions: np.ndarray) -> np.ndarray:
        padded = np.zeros((self.chunks * self.per, actions.shape[1]), dtype=np.float32)
        padded[: self.size] = actions
        return self._rows(self.vector.step(padded.reshape(self.chunks, self.per, -1))[0])

    def close(self) -> None:
        self.vector.close()


class HalfCheetahEnv(TaskEnv):
    """``HalfCheetah-v5`` copies, one per task and trajectory, with the reward of the task family.

    The reward is recomputed from the forward velocity (gymnasium's ``info["x_velocity"]``) and
    the action: ``-|v - target| - 0.05 |a|^2`` (velocity) or ``direction * v - 0.05 |a|^2``
    (direction), as in Finn et al. 2017. With ``workers=1`` the copies step in this process; with
    more, each of ``workers`` processes steps a chunk of them. Copy ``i`` is reset with seed
    ``seed + i`` either way, so the number of workers does not change a rollout.
    """

    obs_dim = 17
    action_dim = 6
    ctrl_cost = 0.05

    def __init__(
        self, family: str, horizon: int = 200, velocity: tuple[float, float] = (0.0, 2.0), workers: int = 1
    ) -> None:
        if family not in ("velocity", "direction"):
            raise ValueError(f"family={family!r} must be 'velocity' or 'direction'")
        if workers < 1:
            raise ValueError(f"env_workers={workers} must be at least 1 (1 steps the copies in this process)")
        self.family, self.horizon, self.velocity, self.workers = family, horizon, velocity, workers
        self._envs: dict[int, _Copies] = {}
        self._current: _Copies | None = None
        self.tasks: Tensor | None = None
        self._shape: tuple[int, int] = (0, 0)
        self.last_velocity: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Simulators and worker processes do not pickle (ddp_spawn, deepcopy); they are rebuilt on use.
        return {**self.__dict__, "_envs": {}, "_current": None}

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(num_tasks, 1, generator=generator)
        if self.family == "direction":
            return (u < 0.5).float() * 2 - 1
        low, high = self.velocity
        return low + u * (high - low)

    def _copies(self, size: int) -> _Copies:
        if size not in self._envs:
            self._envs[size] = _Copies(size, self.workers, self.horizon)
        return self._envs[size]

    def close(self) -> None:
        for copies in self._envs.values():
            copies.close()
        self._envs, self._current = {}, None

    def reset(self, tasks: Tensor, trajectories: int, generator: torch.Generator | None = None) -> Tensor:
        self._shape = (tasks.shape[0], trajectories)
        self.tasks = tasks.float()[:, None, 0].expand(-1, trajectories)
        self._current = self._copies(tasks.shape[0] * trajectories)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        rows = self._current.reset(seed)
        return self._tensor(rows[:, : self.obs_dim], tasks).reshape(*self._shape, self.obs_dim)

    def _tensor(self, array: np.ndarray, like: Tensor) -> Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.float32)).to(like.device)

    def reward(self, velocity: Tensor, actions: Tensor) -> Tensor:
        """The task's reward ``[B, n]`` for forward velocities ``[B, n]`` and (clipped) actions ``[B, n, 6]``."""
        assert self.tasks is not None
        cost = self.ctrl_cost * actions.square().sum(-1)
        if self.family == "velocity":
            return -(velocity - self.tasks).abs() - cost
        return self.tasks * velocity - cost

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._current is None or self.tasks is None:
            raise RuntimeError("HalfCheetahEnv.step before reset(tasks, trajectories)")
        clipped = actions.detach().float().clamp(-1, 1)
        rows = self._tensor(self._current.step(clipped.reshape(-1, self.action_dim).cpu().numpy()), actions)
        self.last_velocity = rows[:, self.obs_dim].reshape(self._shape)
        reward = self.reward(self.last_velocity, clipped)
        return rows[:, : self.obs_dim].reshape(*self._shape, self.obs_dim), reward, torch.zeros_like(reward)


class HalfCheetahVel(TaskDistribution):
    """HalfCheetah running at a target velocity uniform in ``[velocity_min, velocity_max]`` (Finn et al. 2017).

    Args:
        velocity_min, velocity_max: the target velocities ([0, 2] in the paper).
        horizon: steps per episode (200 in the paper).
        env_workers: processes stepping the simulator copies (1: this process); see
            ``benchmarks/rl_throughput.py`` for what a second one buys.
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        velocity_min: float = 0.0,
        velocity_max: float = 2.0,
        horizon: PositiveInt = 200,
        env_workers: PositiveInt = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not velocity_min <= velocity_max:
            raise ValueError(f"velocity_min={velocity_min} must not exceed velocity_max={velocity_max}")
        self.env = HalfCheetahEnv("velocity", int(horizon), (velocity_min, velocity_max), int(env_workers))


class HalfCheetahDir(TaskDistribution):
    """HalfCheetah running forward or backward, each with probability 1/2 (Finn et al. 2017).

    Args:
        horizon: steps per episode (200 in the paper).
        env_workers: processes stepping the simulator copies (1: this process); see
            ``benchmarks/rl_throughput.py`` for what a second one buys.
        **kwargs: the task settings of :class:`~datamodules.rl.base.TaskDistribution`
            (``tasks_per_batch``, ``train_episodes``, ``val_episodes``, ``test_episodes``, ``seed``).
    """

    def __init__(
        self,
        horizon: PositiveInt = 200,
        env_workers: PositiveInt = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.env = HalfCheetahEnv("direction", int(horizon), workers=int(env_workers))
