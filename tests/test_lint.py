"""Lint and type checks from pyproject.toml, so CI holds the code to them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]])
def test_tool_passes(command):
    tool = Path(sys.executable).parent / command[0]
    if not tool.exists() and shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed (pip install -e '.[dev]')")
    exe = str(tool) if tool.exists() else command[0]
    out = subprocess.run([exe, *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
