"""Task environments: hand-computed transitions and rewards, seeded tasks, the MuJoCo families' rewards."""

import copy

import pytest
import torch

from datamodules.rl import Bandit, HalfCheetahDir, HalfCheetahVel, Navigation2D, Pendulum
from datamodules.rl.base import TaskStream


def test_navigation2d_steps_and_rewards_match_a_hand_computation():
    env = Navigation2D().env
    goals = torch.tensor([[0.3, -0.2], [-0.5, 0.5]])
    obs = env.reset(goals, 3)
    assert obs.shape == (2, 3, 2) and obs.abs().sum() == 0
    actions = torch.tensor([[0.05, 0.5], [-0.3, 0.02], [0.0, 0.0]]).expand(2, 3, 2)
    obs, reward, done = env.step(actions)
    expected = torch.tensor([[0.05, 0.1], [-0.1, 0.02], [0.0, 0.0]])  # clipped to [-0.1, 0.1]
    torch.testing.assert_close(obs, expected.expand(2, 3, 2))
    d = lambda x, y: (x**2 + y**2) ** 0.5  # noqa: E731
    hand = torch.tensor(
        [[d(0.05 - 0.3, 0.1 + 0.2), d(-0.1 - 0.3, 0.02 + 0.2), d(0.3, 0.2)],
         [d(0.05 + 0.5, 0.1 - 0.5), d(-0.1 + 0.5, 0.02 - 0.5), d(0.5, 0.5)]]
    )  # fmt: skip
    torch.testing.assert_close(reward, -hand)
    assert done.sum() == 0
    obs, _, _ = env.step(torch.full((2, 3, 2), 0.1))
    torch.testing.assert_close(obs, expected.expand(2, 3, 2) + 0.1)


def _tasks(datamodule, split):
    datamodule.setup("fit" if split != "test" else "test")
    loader = {
        "train": datamodule.train_dataloader,
        "val": datamodule.val_dataloader,
        "test": datamodule.test_dataloader,
    }
    return torch.cat(list(loader[split]()))


@pytest.mark.parametrize("family", [Navigation2D, Pendulum, Bandit])
def test_tasks_are_reproducible_for_a_seed_and_differ_across_seeds_and_splits(family):
    kwargs = {"tasks_per_batch": 4, "train_episodes": 8, "val_episodes": 6, "test_episodes": 6}
    first, again, other = family(seed=1, **kwargs), family(seed=1, **kwargs), family(seed=2, **kwargs)
    for split in ("train", "val", "test"):
        torch.testing.assert_close(_tasks(first, split), _tasks(again, split))
        assert not torch.equal(_tasks(first, split), _tasks(other, split))
    assert _tasks(first, "val").shape[0] == 6
    assert not torch.equal(_tasks(first, "val"), _tasks(first, "test"))


def test_navigation2d_goals_lie_in_the_square():
    goals = Navigation2D().env.sample_tasks(1000, torch.Generator().manual_seed(0))
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and goals.std() > 0.2


def test_pendulum_mass_and_length_change_the_dynamics():
    env = Pendulum().env
    tasks = torch.tensor([[0.5, 0.5], [1.5, 1.5]])
    env.reset(tasks, 1, torch.Generator().manual_seed(0))
    env.state = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    obs, reward, _ = env.step(torch.ones(2, 1, 1))
    # thdot = (3 g / (2 l) sin th + 3 / (m l^2) u) dt
    for b, (m, length) in enumerate(tasks.tolist()):
        thdot = (3 * 10 / (2 * length) * torch.sin(torch.tensor(1.0)) + 3 / (m * length**2)) * 0.05
        torch.testing.assert_close(obs[b, 0, 2], thdot)
    torch.testing.assert_close(reward[:, 0], torch.full((2,), -(1.0 + 0.001)))


@pytest.mark.parametrize("family", [HalfCheetahVel, HalfCheetahDir])
def test_halfcheetah_resets_steps_and_rewards_follow_the_task(family):
    env = family(horizon=10).env
    tasks = torch.tensor([[1.0], [-1.0]]) if family is HalfCheetahDir else torch.tensor([[0.5], [2.0]])
    obs = env.reset(tasks, 2, torch.Generator().manual_seed(0))
    assert obs.shape == (2, 2, 17)
    push = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    moved = []
    for t in range(10):
        actions = (push * (1 if t % 4 < 2 else -1) * 2).expand(2, 2, 6)  # clipped to [-1, 1]
        obs, reward, done = env.step(actions)
        assert obs.shape == (2, 2, 17) and reward.shape == (2, 2) and done.sum() == 0
        # The reward is the task's function of the simulated forward velocity, minus 0.05 |a|^2 (a clipped).
        velocity = env.last_velocity
        target = tasks.expand(2, 2)
        expected = (-(velocity - target).abs() if family is HalfCheetahVel else target * velocity) - 0.05 * 6
        torch.testing.assert_close(reward, expected)
        moved.append(velocity.abs().max())
    assert max(moved) > 0.01
    # Moving at the target velocity (or in the target direction) scores higher than standing still.
    at_target = env.reward(tasks.expand(2, 2) if family is HalfCheetahVel else tasks.expand(2, 2), torch.zeros(2, 2, 6))
    still = env.reward(torch.zeros(2, 2), torch.zeros(2, 2, 6))
    assert (at_target > still).all()


def test_halfcheetah_worker_processes_give_the_same_rollouts_as_one_process():
    tasks = torch.tensor([[0.5], [1.0], [1.5]])  # 9 copies over 2 workers: the last chunk is padded
    actions = torch.randn(6, 3, 3, 6, generator=torch.Generator().manual_seed(1))
    results = []
    for workers in (1, 2):
        env = HalfCheetahVel(horizon=6, env_workers=workers).env
        first = env.reset(tasks, 3, torch.Generator().manual_seed(0))
        steps = [env.step(a) for a in actions]
        clone = copy.deepcopy(env)  # simulators and worker processes are not copied; rebuilt on use
        env.close()
        assert env._envs == {} and clone._envs == {}
        results.append((first, *(torch.stack(x) for x in zip(*steps, strict=True))))
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)
    with pytest.raises(ValueError, match="env_workers=0"):
        HalfCheetahDir(env_workers=0)


def test_evaluation_tasks_and_rollout_seeds_are_the_same_whatever_the_process_count():
    data = Navigation2D(tasks_per_batch=2, val_episodes=10, seed=3)
    one = TaskStream(data.make_source("val"), "val", 10, 2, 3)
    ranks = [TaskStream(data.make_source("val"), "val", 10, 2, 3, rank, 2) for rank in range(2)]
    served = [list(rank) for rank in ranks]
    # Batch j of the split is rank j % 2's batch j // 2, rolled out with the same seed.
    for j, batch in enumerate(one):
        rank, local = j % 2, j // 2
        assert torch.equal(batch, served[rank][local])
        assert one.rollout_seed(j) == ranks[rank].rollout_seed(local)
    assert len({one.rollout_seed(j) for j in range(len(one))}) == len(one)
