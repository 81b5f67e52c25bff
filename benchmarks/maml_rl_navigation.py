"""MAML-TRPO on 2D navigation: ours (MAMLRL) against learn2learn's ``examples/rl/maml_trpo.py`` recipe, same budget.

    python benchmarks/maml_rl_navigation.py --iterations 100          # the comparison (Finn et al. 2017, Fig. 5)
    python benchmarks/maml_rl_navigation.py --iterations 2 --tasks 2 --trajectories 2 --skip_learn2learn  # smoke

Both: 2 x 100 tanh Gaussian policy, meta-batch ``--tasks`` goals, ``--trajectories`` episodes per
task of 100 steps, one inner policy-gradient step with lr 0.1, linear feature baseline, GAE
(gamma 0.99, lambda 1.0), TRPO meta-update with max KL 0.01. Ours runs under the Lightning
Trainer through ``configs/maml_rl/navigation2d.yaml``; the post-adaptation return of every
meta-iteration and the wall time per meta-iteration are printed. learn2learn's side needs
``learn2learn`` and ``gym`` and runs its example's structure in :func:`learn2learn_maml_trpo`.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch

from datamodules.rl import Navigation2D
from lightning_meta.algorithms.maml_rl import MAMLRL


class Curve(pl.Callback):
    """Post-adaptation return and wall time of each meta-iteration."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        post = float(trainer.callback_metrics["train/return_post"])
        self.rows.append((len(self.rows), post, time.perf_counter() - self._start))


def ours(iterations: int, tasks: int, trajectories: int) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    data = Navigation2D(
        tasks_per_batch=tasks, train_episodes=tasks * iterations, val_episodes=tasks, test_episodes=tasks
    )
    model = MAMLRL(trajectories=trajectories, inner_lr=0.1, outer="trpo", max_kl=0.01)
    curve = Curve()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, inference_mode=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=[curve],
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    return curve.rows


def learn2learn_maml_trpo(iterations: int, tasks: int, trajectories: int) -> list[tuple[int, float, float]]:
    """The structure of learn2learn's examples/rl/maml_trpo.py on its Particles2DEnv, one environment at a time.

    Per task: ``l2l.clone_module`` of the policy, episodes collected by stepping the gym environment in
    Python, one second-order ``l2l.algorithms.maml.maml_update`` step (first order while sampling, as
    in the example), then the TRPO meta-step over per-task surrogate losses re-adapted from the policy.
    cherry-rl 0.2 does not import with gym 0.26 (its video recorder), so its few helpers (discounting,
    GAE, the linear value baseline, conjugate gradient) come from lightning_meta.rl instead: the same
    formulas, applied per task exactly as the example applies cherry's.
    """
    import learn2learn as l2l
    from learn2learn.gym.envs.particles import Particles2DEnv
    from torch import autograd, nn
    from torch.distributions import Independent, Normal, kl_divergence

    from lightning_meta.rl import conjugate_gradient, discounted_returns, gae, linear_baseline, normalize

    class Policy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = nn.Sequential(nn.Linear(2, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 2))
            self.log_std = nn.Parameter(torch.zeros(2))

        def density(self, obs: torch.Tensor) -> Independent:
            return Independent(Normal(self.mean(obs), self.log_std.exp()), 1)

    def run(env, policy, goal) -> dict[str, torch.Tensor]:
        record: dict[str, list] = {"obs": [], "actions": [], "rewards": []}
        for _ in range(trajectories):
            env.set_task({"goal": goal})
            obs = env.reset()
            for _ in range(100):
                with torch.no_grad():
                    action = policy.density(torch.as_tensor(obs, dtype=torch.float32)).sample()
                next_obs, reward, _, _ = env.step(action.numpy())
                record["obs"].append(torch.as_tensor(obs, dtype=torch.float32))
                record["actions"].append(action)
                record["rewards"].append(float(reward))
                obs = next_obs
        return {"obs": torch.stack(record["obs"]).reshape(1, trajectories, 100, 2),
                "actions": torch.stack(record["actions"]).reshape(1, trajectories, 100, 2),
                "rewards": torch.tensor(record["rewards"]).reshape(1, trajectories, 100)}  # fmt: skip

    def advantages(episodes: dict[str, torch.Tensor]) -> torch.Tensor:
        dones = torch.zeros_like(episodes["rewards"])
        values = linear_baseline(episodes["obs"], discounted_returns(episodes["rewards"], dones, 0.99))
        return normalize(gae(episodes["rewards"], values, dones, 0.99, 1.0))

    def adapt(clone, episodes, second_order: bool):
        loss = -(clone.density(episodes["obs"]).log_prob(episodes["actions"]) * advantages(episodes)).mean()
        grads = autograd.grad(loss, clone.parameters(), create_graph=second_order, retain_graph=second_order)
        return l2l.algorithms.maml.maml_update(clone, 0.1, grads)

    def surrogate(policy, replays, olds):
        losses, kls = [], []
        for (train, valid), old in zip(replays, olds, strict=True):
            new = adapt(l2l.clone_module(policy), train, True)
            new_density, old_density = new.density(valid["obs"]), old.density(valid["obs"])
            ratio = (new_density.log_prob(valid["actions"]) - old_density.log_prob(valid["actions"]).detach()).exp()
            losses.append(-(ratio * advantages(valid)).mean())
            kls.append(kl_divergence(new_density, old_density).mean())
        return torch.stack(losses).mean(), torch.stack(kls).mean()

    torch.manual_seed(0)
    env, policy, rows = Particles2DEnv(), Policy(), []
    params = list(policy.parameters())
    for iteration in range(iterations):
        start = time.perf_counter()
        replays, olds, post = [], [], 0.0
        for task in env.sample_tasks(tasks):
            clone = l2l.clone_module(policy)
            train = run(env, clone, task["goal"])
            clone = adapt(clone, train, False)
            valid = run(env, clone, task["goal"])
            post += float(valid["rewards"].sum()) / trajectories / tasks
            replays.append((train, valid))
            olds.append(clone)
        loss, kl = surrogate(policy, replays, olds)
        grad = torch.cat([g.reshape(-1) for g in autograd.grad(loss, params, retain_graph=True)])
        kl_grad = torch.cat([g.reshape(-1) for g in autograd.grad(kl, params, create_graph=True)])

        def fisher(v: torch.Tensor, kl_grad: torch.Tensor = kl_grad) -> torch.Tensor:
            return torch.cat([g.reshape(-1) for g in autograd.grad(kl_grad @ v, params, retain_graph=True)]) + 1e-5 * v

        step = conjugate_gradient(fisher, grad)
        step = step / torch.sqrt(0.5 * (step @ fisher(step)) / 0.01)
        old_params = torch.cat([p.detach().reshape(-1) for p in params])
        for i in range(15):
            torch.nn.utils.vector_to_parameters(old_params - 0.5**i * step, params)
            new_loss, new_kl = surrogate(policy, replays, olds)
            if new_loss < loss and new_kl < 0.01:
                break
        else:
            torch.nn.utils.vector_to_parameters(old_params, params)
        rows.append((iteration, post, time.perf_counter() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--trajectories", type=int, default=20)
    parser.add_argument("--skip_learn2learn", action="store_true")
    args = parser.parse_args()
    runs = {"ours (MAMLRL, TRPO)": ours(args.iterations, args.tasks, args.trajectories)}
    if not args.skip_learn2learn:
        runs["learn2learn maml_trpo"] = learn2learn_maml_trpo(args.iterations, args.tasks, args.trajectories)
    print("| implementation | meta-iteration | post-adaptation return | wall s / iteration |")
    print("|---|---|---|---|")
    for name, rows in runs.items():
        for i, post, seconds in rows:
            print(f"| {name} | {i} | {post:.2f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
