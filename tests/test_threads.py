"""The command's thread policy reaches the process before torch loads, and never overrides the user's choice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_meta.threads import is_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-meta"
SINUSOID = ["fit", "--config", str(REPO / "configs" / "maml" / "sinusoid.yaml"), "--trainer.fast_dev_run", "1"]


def policy_line(command: list[str], cwd: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LIGHTNING_META_THREAD"))}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([*command, *SINUSOID, "--trainer.enable_progress_bar", "false"], cwd=cwd,
                          env={**environ, **env}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "OMP_WAIT_POLICY" in line]
    assert len(lines) == 1, done.stdout[-3000:]
    return lines[0]


@pytest.mark.parametrize("command", [[sys.executable, "-m", "lightning_meta"], [str(SCRIPT)]], ids=["-m", "script"])
def test_the_command_sets_passive_before_torch_loads(command, tmp_path):
    # "default" is reported only when the policy was set with torch not yet imported (threads.apply_cli_policy).
    assert "OMP_WAIT_POLICY PASSIVE (default)" in policy_line(command, tmp_path)


def test_the_users_choice_is_kept(tmp_path):
    python_m = [sys.executable, "-m", "lightning_meta"]
    line = policy_line(python_m, tmp_path, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert "OMP_WAIT_POLICY ACTIVE (from the environment), torch threads: 1;" in line


def test_only_the_command_counts_as_the_command():
    assert is_cli(["python", "-m", "lightning_meta", "fit"], "-m")
    assert is_cli(["python", "-mlightning_meta"], "-m")
    assert is_cli(["python", "/venv/bin/lightning-meta", "fit"], "/venv/bin/lightning-meta")
    assert not is_cli(["python", "train.py"], "train.py")  # a user's script that imports lightning_meta
    assert not is_cli(["python", "-m", "pytest", "tests"], "-m")
    assert not is_cli(["python", "-c", "import lightning_meta"], "-c")
