"""Interrupted fits resume exactly: Ctrl-C (the CLI's interrupted.ckpt) and kill -9 (a periodic checkpoint)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_meta.cli import make_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-meta"
PROTONET = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"
STEPS = 10  # an epoch is 6 batches: the run crosses an epoch end and a validation


class InterruptAt(Callback):
    """Press Ctrl-C during the forward-backward of training step ``step`` (after the forward updated BN stats)."""

    def __init__(self, step: int = 7) -> None:
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def fit_args(root: Path) -> list[str]:
    args = ["fit", "--config", str(PROTONET), "--data.root", str(root), "--data.rotations", "false"]
    args += ["--data.ways", "2", "--data.queries", "3", "--data.train_ways", "2", "--data.train_episodes", "6"]
    args += ["--data.val_episodes", "2", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false"]
    return args + ["--trainer.max_steps", str(STEPS)]


@pytest.fixture
def keep_sigint():
    # Lightning ignores SIGINT after a KeyboardInterrupt ("graceful shutdown"); give pytest its handler back.
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_saves_interrupted_ckpt_that_resumes_exactly(fake_omniglot, tmp_path, monkeypatch, keep_sigint):
    monkeypatch.chdir(tmp_path)
    reference = make_cli(fit_args(fake_omniglot)).model.state_dict()
    assert int(reference["backbone.features.1.num_batches_tracked"]) == STEPS

    with pytest.raises(SystemExit):  # Lightning exits with status 1 after a KeyboardInterrupt
        make_cli([*fit_args(fake_omniglot), "--trainer.callbacks+=test_interrupt.InterruptAt"])
    interrupted = (
        tmp_path / "lightning_logs" / "protonet_omniglot_5w1s" / "version_1" / "checkpoints" / "interrupted.ckpt"
    )
    assert interrupted.exists()
    saved = torch.load(interrupted, weights_only=False)
    assert saved["global_step"] == 7
    # The interrupted step's forward had counted its batch; the checkpoint holds the count before it.
    assert int(saved["state_dict"]["backbone.features.1.num_batches_tracked"]) == 7

    resumed = make_cli([*fit_args(fake_omniglot), "--ckpt_path", str(interrupted)])
    assert resumed.trainer.global_step == STEPS
    weights = resumed.model.state_dict()
    assert weights.keys() == reference.keys()
    for name in reference:  # weights and BN buffers, num_batches_tracked included
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=0, msg=name)
    # A fit that ends normally leaves no interrupted.ckpt in its own folder.
    assert not (Path(resumed.trainer.log_dir) / "checkpoints" / "interrupted.ckpt").exists()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the fit ended (status {process.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)  # polling the file system, not waiting for time to pass


def test_kill_9_mid_epoch_resumes_from_the_periodic_checkpoint(fake_omniglot, tmp_path):
    every = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"]
    every += ["--trainer.callbacks.dirpath", "steps", "--trainer.callbacks.filename", "{step}"]
    every += ["--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", "-1"]
    command = [str(SCRIPT), *fit_args(fake_omniglot), *every]
    killed, reference, resumed = (tmp_path / name for name in ("killed", "reference", "resumed"))
    for folder in (killed, reference, resumed):
        folder.mkdir()

    # The run to kill would go on for 10000 steps; kill it once step 8's file exists (so step 4's is complete).
    process = subprocess.Popen([*command, "--trainer.max_steps", "10000"], cwd=killed,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(killed / "steps" / "step=8.ckpt", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    mid_epoch = killed / "steps" / "step=4.ckpt"  # batch 4 of the first 6-batch epoch
    saved = torch.load(mid_epoch, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (0, 4)

    for folder, extra in ((reference, []), (resumed, ["--ckpt_path", str(mid_epoch)])):
        done = subprocess.run([*command, *extra], cwd=folder, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    final = f"step={STEPS}.ckpt"
    expected = torch.load(reference / "steps" / final, weights_only=False)["state_dict"]
    got = torch.load(resumed / "steps" / final, weights_only=False)["state_dict"]
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
