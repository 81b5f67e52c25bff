"""A chunk of ``HalfCheetah-v5`` copies presented as one gymnasium environment (imported only with gymnasium).

gymnasium's ``AsyncVectorEnv`` runs one process per environment it is given; handing it one chunk
per worker instead of one copy per worker lets ``workers`` processes step hundreds of copies.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np


class CheetahChunk(gymnasium.Env):
    """``count`` HalfCheetah copies stepped in a loop; observation rows are ``[obs (17), x_velocity]``.

    Copy ``j`` of the chunk is reset with seed ``options["seed"] + first + j``: the seeds a single
    ``SyncVectorEnv`` over all copies would use, so any number of workers gives the same rollouts.
    """

    def __init__(self, count: int, first: int, horizon: int) -> None:
        self.envs = [gymnasium.make("HalfCheetah-v5", max_episode_steps=horizon) for _ in range(count)]
        self.first = first
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (count, 18), np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (count, 6), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        base = int((options or {}).get("seed", 0))
        rows = [env.reset(seed=base + self.first + j)[0] for j, env in enumerate(self.envs)]
        return np.stack([np.append(row, 0.0) for row in rows]), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        rows = []
        for env, a in zip(self.envs, action, strict=True):
            obs, _, _, _, info = env.step(a)
            rows.append(np.append(obs, info["x_velocity"]))
        return np.stack(rows), 0.0, False, False, {}

    def close(self) -> None:
        for env in self.envs:
            env.close()
