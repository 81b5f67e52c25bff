"""MAMLRL and RL2 under the Lightning Trainer: learning, bf16-mixed, 2-process DDP and resume through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.rl import Bandit, Navigation2D
from lightning_meta.algorithms.maml_rl import MAMLRL
from lightning_meta.algorithms.rl2 import RL2
from lightning_meta.callbacks import EpisodeImages, EpisodesPerSecond
from lightning_meta.functional import MetaSGD
from lightning_meta.rl import TrajectoryImages

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "lightning-meta"
TINY_NAV = ["--data.tasks_per_batch", "2", "--data.horizon", "10", "--data.val_episodes", "4"]
TINY_NAV += ["--data.test_episodes", "4", "--data.train_episodes", "16", "--model.trajectories", "2"]
TINY_NAV += ["--model.hidden_sizes", "[8, 8]", "--trainer.enable_progress_bar", "false"]


def trainer(**kwargs) -> pl.Trainer:
    defaults = {"logger": False, "enable_checkpointing": False, "inference_mode": False, "enable_progress_bar": False,
                "num_sanity_val_steps": 0, "enable_model_summary": False, "max_epochs": 1}  # fmt: skip
    return pl.Trainer(**{**defaults, **kwargs})


def metrics(t: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in t.callback_metrics.items()}


def test_maml_rl_learns_navigation2d():
    torch.manual_seed(0)
    data = Navigation2D(tasks_per_batch=10, train_episodes=150, val_episodes=10, test_episodes=20)
    model = MAMLRL(hidden_sizes=[64, 64], trajectories=10, inner_steps_eval=1, first_order=True)
    t = trainer(limit_val_batches=0)
    t.test(model, datamodule=data, verbose=False)
    untrained = metrics(t)
    t.fit(model, datamodule=data)
    t.test(model, datamodule=data, verbose=False)
    trained = metrics(t)
    # Returns are minus the summed distance to the goal over 100 steps (about -40 to -100 untrained).
    assert trained["test/return_step_1"] > trained["test/return_step_0"] + 5, (untrained, trained)
    assert trained["test/return_step_1"] > max(untrained["test/return_step_0"], untrained["test/return_step_1"]) + 5
    assert trained["test/return_ci95"] > 0


@pytest.mark.parametrize("outer", ["trpo", "ppo"])
def test_maml_rl_outer_loops_and_meta_sgd_run_under_bf16_mixed(outer):
    torch.manual_seed(0)
    data = Navigation2D(tasks_per_batch=2, train_episodes=4, val_episodes=2, test_episodes=2, horizon=10)
    model = MAMLRL(hidden_sizes=[8], trajectories=3, outer=outer, ppo_epochs=2, inner_optimizer=MetaSGD(0.1),
                   inner_steps=2, inner_steps_eval=2)  # fmt: skip
    t = trainer(precision="bf16-mixed")
    t.fit(model, datamodule=data)
    found = metrics(t)
    assert all(torch.isfinite(torch.tensor(v)) for v in found.values()), found
    assert {"train/loss", "train/return_pre", "train/return_post", "val/return_step_2", "env_steps/s"} <= set(found)
    lrs = torch.stack([p.detach().float() for p in model.inner_optimizer.parameters()])
    assert not torch.allclose(lrs, torch.full_like(lrs, 0.1))  # the step sizes are meta-learned


def test_maml_rl_needs_gradients_in_evaluation():
    model = MAMLRL(hidden_sizes=[8], trajectories=2)
    data = Navigation2D(tasks_per_batch=2, val_episodes=2, test_episodes=2, horizon=5)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer(inference_mode=True).test(model, datamodule=data, verbose=False)


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="outer='sgd'"):
        MAMLRL(outer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trajectories=0"):
        MAMLRL(trajectories=0)
    with pytest.raises(ValueError, match="episodes_per_trial=0"):
        RL2(episodes_per_trial=0)


@pytest.mark.parametrize("module", [MAMLRL, RL2])
@pytest.mark.parametrize("name, value", [("gamma", 1.5), ("gamma", 0.0), ("gae_lambda", 1.2), ("gae_lambda", -0.1),
                                         ("gamma", float("nan"))])  # fmt: skip
def test_discount_and_gae_lambda_outside_0_1_are_refused(module, name, value):
    with pytest.raises(ValueError, match=rf"{module.__name__}: {name}={value!r} must lie in \(0, 1\]"):
        module(**{name: value})


@pytest.mark.parametrize("config", ["maml_rl/navigation2d.yaml", "rl2/bandit.yaml"])
def test_gamma_above_1_in_an_rl_config_is_refused_with_one_line(config, tmp_path):
    command = [
        str(SCRIPT),
        "fit",
        "--config",
        str(REPO / "configs" / config),
        "--model.gamma",
        "1.5",
        "--trainer.fast_dev_run",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_META_DEBUG"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and "gamma=1.5 must lie in (0, 1]" in errors[0], done.stderr[-3000:]


@pytest.mark.slow
def test_rl2_later_episodes_of_a_trial_score_higher_than_the_first():
    torch.manual_seed(0)
    data = Bandit(arms=5, tasks_per_batch=16, train_episodes=16 * 300, val_episodes=16, test_episodes=64)
    model = RL2(hidden_size=32, episodes_per_trial=10, trials=8, gamma=0.99, gae_lambda=0.9, entropy_coef=0.01,
                optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))  # fmt: skip
    t = trainer(limit_val_batches=0)
    t.fit(model, datamodule=data)
    t.test(model, datamodule=data, verbose=False)
    found = metrics(t)
    later = sum(found[f"test/return_episode_{k}"] for k in range(5, 10)) / 5
    assert later > found["test/return_episode_0"] + 0.07, found  # 0.5 expected at random, about 0.63 learned


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_maml_rl_ddp_two_processes_and_resume_from_a_mid_run_checkpoint(tmp_path):
    config = ["--config", str(REPO / "configs" / "maml_rl" / "navigation2d.yaml"), *TINY_NAV]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    out = _run([str(SCRIPT), "fit", *config, *ddp, "--trainer.max_steps", "2"], tmp_path)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr + out.stdout
    checkpoints = tmp_path / "lightning_logs" / "maml_rl_navigation2d" / "version_0" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 2
    # Resume mid-epoch (an epoch is 16 tasks / (2 tasks x 2 ranks) = 4 steps) and continue to step 3.
    _run([str(SCRIPT), "fit", *config, "--trainer.max_steps", "3", "--ckpt_path", str(checkpoints / "last.ckpt")],
         tmp_path)  # fmt: skip
    # A resume from a run's own checkpoint continues in that run's folder (issue 29).
    assert not (tmp_path / "lightning_logs" / "maml_rl_navigation2d" / "version_1").exists()
    resumed = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 3
    moved = [not torch.equal(resumed["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"]]
    assert any(moved)


@pytest.mark.parametrize("module", [MAMLRL, RL2])
def test_meta_rl_modules_replace_the_episode_pictures_with_trajectory_pictures(module, tmp_path):
    # The CLI gives every run EpisodeImages, which cannot draw a batch of task parameters; the
    # modules' configure_callbacks puts TrajectoryImages in its place.
    data = Navigation2D(tasks_per_batch=2, train_episodes=2, val_episodes=2, test_episodes=2, horizon=5)
    model = MAMLRL(hidden_sizes=[8], trajectories=2, inner_steps_eval=1) if module is MAMLRL else RL2(hidden_size=8)
    logger = TensorBoardLogger(tmp_path, name="run")
    t = trainer(logger=logger, callbacks=[EpisodeImages(), EpisodesPerSecond()], log_every_n_steps=1)
    t.fit(model, datamodule=data)
    assert [type(c) for c in t.callbacks if isinstance(c, EpisodeImages)] == [TrajectoryImages]
    assert any(isinstance(c, EpisodesPerSecond) for c in t.callbacks)  # it skips batches that hold no episodes
    tags = EventAccumulator(logger.log_dir).Reload().Tags()["images"]
    assert tags == (["val/trajectories"] if module is MAMLRL else [])
