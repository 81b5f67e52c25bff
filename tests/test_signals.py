"""The real CLI stopped by a signal: exit status 128 + signal, a checkpoint that resumes exactly and in place.

Also the end-of-fit summary and the SLURM requeue path (Lightning's SLURMEnvironment with a faked
SLURM environment: SIGUSR1 saves ``hpc_ckpt_1.ckpt``, the requeued job resumes in the same run).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_interrupt import fit_args, wait_for

from lightning_meta.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN = Path("lightning_logs") / "protonet_omniglot_5w1s"
# Keep every step's weights, so runs can be compared at any step.
EVERY_STEP = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
              "steps", "--trainer.callbacks.filename", "{step}", "--trainer.callbacks.every_n_train_steps", "1",
              "--trainer.callbacks.save_top_k", "-1"]  # fmt: skip


def cli(args: list[str], cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.Popen([sys.executable, "-m", "lightning_meta", *args], cwd=cwd, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def stop_at(process: subprocess.Popen, cwd: Path, signum: int, step: int = 2) -> tuple[int, str]:
    """Send ``signum`` once step ``step``'s checkpoint exists; the status and the output."""
    try:
        wait_for(cwd / "steps" / f"step={step}.ckpt", process)
    finally:
        process.send_signal(signum)
    return finish(process)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["state_dict"]


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_sigterm_exits_143_and_resumes_exactly_in_place(fake_omniglot, tmp_path):
    work, reference = tmp_path / "work", tmp_path / "reference"
    work.mkdir(), reference.mkdir()
    args = [*fit_args(fake_omniglot), *EVERY_STEP, "--trainer.log_every_n_steps", "1"]
    status, out = stop_at(cli([*args, "--trainer.max_steps", "10000"], work), work, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, out[-3000:]
    interrupted = work / RUN / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert interrupted.is_file(), out[-3000:]
    assert f"--ckpt_path {interrupted.relative_to(work)}" in out  # the resume command is printed
    stopped = torch.load(interrupted, weights_only=False)["global_step"]
    final = stopped + 4  # crosses the end of the first 6-batch epoch when stopped early

    # The saved config.yaml said max_steps=10000: the resume names the difference, and goes on in version_0.
    status, out = finish(cli([*args, "--trainer.max_steps", str(final), "--ckpt_path", str(interrupted)], work))
    assert status == 0, out[-3000:]
    assert re.search(r"warning: resuming .*version_0.*trainer\.max_steps: 10000 -> " + str(final), out), out[-3000:]
    assert not (work / RUN / "version_1").exists()
    assert not interrupted.exists()  # newer checkpoints of the run exist
    assert "could not find the monitored key" not in out

    status, out = finish(cli([*args, "--trainer.max_steps", str(final)], reference))
    assert status == 0, out[-3000:]
    assert_same(weights(work / "steps" / f"step={final}.ckpt"), weights(reference / "steps" / f"step={final}.ckpt"))

    # One event stream in version_0, its steps going on past the interrupted step without repeats.
    events = EventAccumulator(str(work / RUN / "version_0"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] >= stopped, steps


def test_ctrl_c_exits_130(fake_omniglot, tmp_path):
    status, out = stop_at(cli([*fit_args(fake_omniglot), *EVERY_STEP, "--trainer.max_steps", "10000"], tmp_path),
                          tmp_path, signal.SIGINT)  # fmt: skip
    assert status == 128 + signal.SIGINT, out[-3000:]
    assert (tmp_path / RUN / "version_0" / "checkpoints" / "interrupted.ckpt").is_file()


def test_fit_ends_with_a_summary_whose_test_command_runs(fake_omniglot, tmp_path, monkeypatch, capsys):
    status, out = finish(cli([*fit_args(fake_omniglot), "--trainer.max_steps", "8"], tmp_path))
    assert status == 0, out[-3000:]
    run = RUN / "version_0"
    assert f"run folder:      {run}" in out
    assert re.search(rf"best checkpoint: {run}/checkpoints/best-\S+\.ckpt \(val/acc [0-9.]+ at step 6\)", out), out
    assert f"last checkpoint: {run}/checkpoints/last.ckpt" in out
    assert re.search(r"fit ended at step 8 after [0-9.]+ s, [0-9.]+ episodes/s", out), out
    assert f"tensorboard --logdir {RUN}" in out
    command = re.search(r"test it: +lightning-meta (.*)", out).group(1)
    assert command == f"test --config {run}/config.yaml --ckpt_path best"
    status, out = finish(cli(shlex.split(command), tmp_path))
    assert status == 0, out[-3000:]
    assert "test/acc" in out

    # predict on folders takes --ckpt_path best and last too (the newest run's under ./lightning_logs).
    monkeypatch.chdir(tmp_path)
    for split, count in (("support", 1), ("query", 2)):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                image = np.random.default_rng([c, i]).integers(0, 255, (28, 28), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / f"c{c}" / f"{i}.png")
    for which in ("best", "last"):
        main(["predict", "--ckpt_path", which, "--support", "support", "--query", "query", "--output", "out.csv"])
        said = capsys.readouterr().out
        assert f"--ckpt_path {which} is {run}/checkpoints/{'best-' if which == 'best' else 'last.ckpt'}" in said
        assert "wrote 4 predictions over 2 classes" in said


def test_slurm_requeue_resumes_the_stopped_run_in_place(fake_omniglot, tmp_path):
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "fit", "SLURM_JOB_ID": "42", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    args = [*fit_args(fake_omniglot), *EVERY_STEP]
    process = cli([*args, "--trainer.max_steps", "10000"], tmp_path, env=slurm)
    try:
        wait_for(tmp_path / "steps" / "step=2.ckpt", process)
        process.send_signal(signal.SIGUSR1)  # SLURM's pre-timeout signal: Lightning saves and requeues
        wait_for(tmp_path / "hpc_ckpt_1.ckpt", process)
    finally:
        process.send_signal(signal.SIGTERM)  # then SLURM stops the job
    status, out = finish(process)
    assert status == 128 + signal.SIGTERM, out[-3000:]
    interrupted = tmp_path / RUN / "version_0" / "checkpoints" / "interrupted.ckpt"
    stopped = torch.load(interrupted, weights_only=False)["global_step"]

    # The requeued job runs the same command: it resumes from the newest checkpoint, in version_0.
    status, out = finish(cli([*args, "--trainer.max_steps", str(stopped + 2)], tmp_path,
                             env={**slurm, "SLURM_RESTART_COUNT": "1"}))  # fmt: skip
    assert status == 0, out[-3000:]
    assert f"SLURM requeue: resuming from {interrupted.relative_to(tmp_path)}" in out, out[-3000:]
    assert not (tmp_path / RUN / "version_1").exists()
    assert torch.load(tmp_path / "steps" / f"step={stopped + 2}.ckpt", weights_only=False)["global_step"] == stopped + 2
