"""Lightning integration of every algorithm: DDP, bf16-mixed, learning on real Omniglot.

Parametrised over ``MODULES``, the registry of algorithms: a new algorithm is covered by adding
one entry (``test_registry_covers_every_module`` fails until it is added).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_cli import scalars

import lightning_meta
from lightning_meta.base import EpisodicModule
from lightning_meta.cli import make_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-meta"


@dataclass
class Entry:
    """How to run one algorithm small: a 5-way 1-shot Omniglot config and arguments that shrink it."""

    config: str
    small: list[str] = field(default_factory=list)  # fewer inner steps and the like, for wiring tests
    # Pinned for the DDP-equals-single-process comparison: a setting chosen by timing (MAML's
    # task_batching="auto") can differ between the runs and round differently.
    deterministic: list[str] = field(default_factory=list)
    learn: list[str] = field(default_factory=list)  # a short run that must learn
    learn_margin: float = 0.1  # val/acc must rise at least this much over the untrained network
    bf16_tolerance: float = 0.05


MODULES: dict[str, Entry] = {
    "ProtoNet": Entry(
        "protonet/omniglot_5w1s.yaml",
        small=["--data.train_ways", "5", "--data.train_queries", "3"],
        learn=["--data.train_ways", "20", "--data.train_episodes", "300"],
    ),
    "MatchingNet": Entry(
        "matchingnet/omniglot_5w1s_fce.yaml",
        learn=["--model.fce", "false", "--data.train_episodes", "1200"],
    ),
    "Baseline": Entry(
        "baseline/omniglot_5w1s.yaml",
        small=["--data.batch_size", "8", "--model.head_steps", "20"],
        # 200 labelled batches of 64 over the 1028 unrotated characters: val/acc 0.53 -> 0.70 (bf16-mixed).
        learn=(
            "--data.batch_size 64 --data.rotations false --model.head_steps 50 --trainer.limit_train_batches 200"
        ).split(),
    ),
    "BaselinePlusPlus": Entry(
        "baselinepp/omniglot_5w1s.yaml",
        small=["--data.batch_size", "8", "--model.head_steps", "20"],
        learn=(
            "--data.batch_size 64 --data.rotations false --model.head_steps 50 --trainer.limit_train_batches 200"
        ).split(),
    ),
    "RFS": Entry(
        "rfs/omniglot_5w1s.yaml",
        small=["--data.batch_size", "8", "--model.head_steps", "20"],
        # A narrower ResNet-12 than the paper's 64-160-320-640, for CPU time.
        learn=(
            "--data.batch_size 64 --data.rotations false --model.head_steps 50 --trainer.limit_train_batches 200"
            " --model.backbone.channels [32,32,64,64]"
        ).split(),
    ),
    "MAML": Entry(
        "maml/omniglot_5w1s.yaml",
        small=["--data.tasks_per_batch", "2"],
        deterministic=["--model.task_batching", "loop"],
        learn=["--data.tasks_per_batch", "8", "--data.train_episodes", "480"],
    ),
    "ANIL": Entry(
        "anil/omniglot_5w1s.yaml",
        small=["--data.tasks_per_batch", "2"],
        learn=["--data.tasks_per_batch", "8", "--data.train_episodes", "480"],
    ),
    "R2D2": Entry(
        "r2d2/omniglot_5w1s.yaml",
        # Untrained, in eval mode (running statistics at their start), Conv4's features are ~0.05 and R2-D2's
        # logits differ by ~1e-4 at the authors' scale 10, too little for bf16 to show; a larger scale lets it.
        small=["--data.train_ways", "5", "--data.train_queries", "3", "--model.init_scale", "10000"],
        learn=["--data.train_ways", "20", "--data.train_episodes", "300"],
    ),
    "MAMLPlusPlus": Entry(
        "mamlpp/omniglot_5w1s.yaml",
        small=["--data.tasks_per_batch", "2", "--model.inner_steps", "2", "--model.inner_steps_eval", "2"],
        # 40 meta-batches of 4 tasks: val/acc 0.71 -> 0.84 (5 adapted steps already fit the untrained net well).
        learn=["--data.tasks_per_batch", "4", "--data.train_episodes", "160", "--data.val_episodes", "40"],
        bf16_tolerance=0.1,  # the untrained max-pooled Conv4: MAML's loss in this config moves as much (0.18)
    ),
    "Reptile": Entry(
        "reptile/omniglot_5w1s.yaml",
        small=["--model.inner_steps_eval", "3", "--data.tasks_per_batch", "2"],
        # 150 meta-batches: the untrained net fine-tuned reaches ~41%, Reptile ~60% after 200.
        learn=(
            "--model.inner_steps_eval 10 --data.train_episodes 750 --data.val_episodes 40"
            " --model.adaptation_curve false"
        ).split(),
        bf16_tolerance=0.1,
    ),
    "MetaOptNet": Entry(
        "metaoptnet/omniglot_5w1s.yaml",
        small=["--data.tasks_per_batch", "2", "--data.train_shots", "2", "--data.train_queries", "3"],
        # 20 batches of 8 episodes: val/acc 0.22 -> 0.69 under bf16-mixed (0.81 after 40).
        learn=["--data.train_episodes", "160"],
    ),
    "MetaNetwork": Entry(
        "metanetwork/omniglot_5w1s.yaml",
        small=["--data.train_queries", "3"],
        # 32-filter backbones and layers: val/acc went 0.20 -> 0.77 after 150 episodes, 0.83 after 300.
        learn=(
            "--data.train_episodes 200 --model.init_args.backbone.init_args.hidden 32 --model.init_args.hidden 32"
        ).split(),
    ),
    "Aggregate": Entry(
        "aggregate/omniglot_5w1s.yaml",  # ProtoNet, MatchingNet and MAML members built from config
        small=["--data.tasks_per_batch", "2"],
        # The members train jointly with the weights (train_members: true in the config); to learn within the
        # budget, a ProtoNet and a MatchingNet of 32 filters (the DDP and bf16 tests run the config's three).
        learn=[
            "--model.init_args.members",
            "[{class_path: ProtoNet, init_args: {backbone: {class_path: lightning_meta.Conv4,"
            " init_args: {hidden: 32}}}}, {class_path: MatchingNet, init_args: {backbone:"
            " {class_path: lightning_meta.Conv4, init_args: {hidden: 32}}}}]",
            *"--data.tasks_per_batch 4 --data.train_queries 5 --data.train_episodes 200".split(),
        ],
    ),
}


def omniglot_args(cache: dict) -> list[str]:
    return ["--data.root", cache["root"], "--data.cache_dir", cache["cache_dir"]]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_registry_covers_every_module():
    exported = {
        name
        for name in lightning_meta.__all__
        if isinstance(getattr(lightning_meta, name), type)
        and issubclass(getattr(lightning_meta, name), EpisodicModule)
        and name not in lightning_meta.BASE_CLASSES
    }
    assert exported == set(MODULES), "add the new algorithm to MODULES in tests/test_integration.py"


@pytest.mark.parametrize("name", MODULES)
def test_ddp_trains_and_tests_like_a_single_process(name, omniglot_cache, tmp_path, monkeypatch):
    """Two gloo processes train; the checkpoint's test metrics under DDP equal the single-process ones.

    Equal by construction, not by tolerance: every run is a fresh process with one intra-op thread
    (Lightning gives each DDP process ``cores // processes`` threads, and a CPU kernel's reduction
    order follows the thread count, which the inner loop amplifies into flipped near-tie
    predictions), and settings chosen by timing are pinned (``Entry.deterministic``).
    """
    monkeypatch.chdir(tmp_path)
    entry = MODULES[name]
    common = ["--config", str(REPO / "configs" / entry.config), *omniglot_args(omniglot_cache), *entry.small]
    common += [*entry.deterministic, "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    common += ["--data.val_episodes", "4", "--data.test_episodes", "7", "--data.tasks_per_batch", "2"]
    common += ["--trainer.logger.init_args.name", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    fit = [str(SCRIPT), "fit", *common, *ddp, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2"]
    out = run(fit, tmp_path, env)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr + out.stdout
    logs = tmp_path / "lightning_logs" / "run"
    assert len(scalars(logs / "version_0")["val/acc"]) == 2
    checkpoint = str(next((logs / "version_0" / "checkpoints").glob("best-*.ckpt")))

    run([str(SCRIPT), "test", *common, *ddp, "--ckpt_path", checkpoint], tmp_path, env)
    run([str(SCRIPT), "test", *common, "--trainer.devices", "1", "--ckpt_path", checkpoint], tmp_path, env)
    distributed, single = scalars(logs / "version_1"), scalars(logs / "version_2")
    for tag in ("test/acc", "test/acc_ci95", "test/loss"):
        assert single[tag][0] == pytest.approx(distributed[tag][0], abs=1e-5), (tag, single, distributed)


def build(name: str, cache: dict, extra: list[str]):
    entry = MODULES[name]
    config = str(REPO / "configs" / entry.config)
    cli = make_cli(["--config", config, *omniglot_args(cache), *extra, "--trainer.logger", "false"], run=False)
    return cli.model, cli.datamodule, cli.trainer


@pytest.mark.parametrize("name", MODULES)
def test_bf16_autocast_loss_matches_fp32_on_a_fixed_batch(name, omniglot_cache):
    model, dm, _ = build(name, omniglot_cache, [*MODULES[name].small, "--data.val_episodes", "2"])
    dm.setup("validate")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    model.eval()
    torch.manual_seed(0)
    fp32 = model.episode_loss(batch)[0]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.episode_loss(batch)[0]
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32), "autocast had no effect"
    tolerance = MODULES[name].bf16_tolerance
    torch.testing.assert_close(bf16, fp32, rtol=tolerance, atol=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_learns_real_omniglot_under_bf16_mixed(name, omniglot_cache, tmp_path, monkeypatch):
    """A short bf16-mixed run must beat the untrained network by a margin a broken update would miss."""
    monkeypatch.chdir(tmp_path)
    entry = MODULES[name]
    args = ["--data.val_episodes", "100", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.precision", "bf16-mixed", *entry.learn]
    model, dm, trainer = build(name, omniglot_cache, args)
    assert trainer.precision == "bf16-mixed"
    initial = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    trainer.fit(model, dm)
    final = trainer.callback_metrics["val/acc"].item()
    assert final >= initial + entry.learn_margin, (initial, final)
