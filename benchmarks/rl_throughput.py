"""Rollout throughput: environment steps per second, ours (batched torch) against learn2learn's environments.

    python benchmarks/rl_throughput.py                       # Navigation2D and HalfCheetahVel
    python benchmarks/rl_throughput.py --tasks 2 --trajectories 2 --horizon 10   # smoke run

Ours: ``datamodules.rl.Navigation2DEnv`` steps every task and trajectory of a meta-batch as one
tensor operation (random actions, no policy), and ``HalfCheetahEnv`` steps gymnasium's
``HalfCheetah-v5`` copies in this process (``env_workers=1``) or in chunks over worker processes
(``env_workers=2``: gymnasium's ``AsyncVectorEnv``, one chunk per process; start-up not timed).
learn2learn: ``learn2learn.gym``'s ``Particles2DEnv`` (the 2D navigation of its ``maml_trpo.py``
example), one environment stepped in a Python loop, as its examples' ``cherry`` runner does per
environment (needs ``gym``; ``cherry-rl`` is not used here).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from datamodules.rl import HalfCheetahVel, Navigation2D


def ours(env, tasks: int, trajectories: int, horizon: int) -> float:
    goals = env.sample_tasks(tasks, torch.Generator().manual_seed(0))
    env.reset(goals, trajectories, torch.Generator().manual_seed(0))
    actions = torch.randn(horizon, tasks, trajectories, env.action_dim)
    start = time.perf_counter()
    for t in range(horizon):
        env.step(actions[t])
    return tasks * trajectories * horizon / (time.perf_counter() - start)


def learn2learn_navigation(steps: int) -> float | None:
    try:
        from learn2learn.gym.envs.particles import Particles2DEnv
    except ImportError as error:
        print(f"learn2learn's Particles2DEnv unavailable ({error}); pip install learn2learn gym")
        return None
    env = Particles2DEnv()
    env.set_task(env.sample_tasks(1)[0])
    env.reset()
    actions = np.random.default_rng(0).normal(size=(steps, 2)).astype(np.float32)
    start = time.perf_counter()
    for t in range(steps):
        env.step(actions[t])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--trajectories", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="MuJoCo worker processes to try")
    parser.add_argument("--skip_mujoco", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = (args.tasks, args.trajectories, args.horizon)
    print(f"| environment | implementation | envs stepped together | steps/s (threads={args.threads}) |")
    print("|---|---|---|---|")
    nav = ours(Navigation2D().env, *n)
    print(f"| Navigation2D | ours (torch, batched) | {args.tasks * args.trajectories} | {nav:,.0f} |")
    l2l = learn2learn_navigation(args.tasks * args.trajectories * args.horizon // 10)
    if l2l is not None:
        print(f"| Navigation2D | learn2learn Particles2DEnv | 1 | {l2l:,.0f} |")
    for workers in [] if args.skip_mujoco else args.workers:
        env = HalfCheetahVel(env_workers=workers).env
        cheetah = ours(env, *n)
        env.close()
        where = "in this process" if workers == 1 else f"{workers} worker processes"
        print(f"| HalfCheetahVel | ours (gymnasium, {where}) | {args.tasks * args.trajectories} | {cheetah:,.0f} |")


if __name__ == "__main__":
    main()
