"""Shared fixtures: the real Omniglot files, one cache per test session, tiny fake data."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_OMNIGLOT = REPO / "tests" / "data" / "omniglot"


def shared_data() -> Path:
    """Real data: $LIGHTNING_META_DATA, or ../shared/data beside the repository."""
    return Path(os.environ.get("LIGHTNING_META_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = shared_data() / "omniglot"
    if not (root / "images_background.zip").exists():
        if os.environ.get("CI"):
            pytest.fail(f"real Omniglot missing at {root}; set LIGHTNING_META_DATA")
        pytest.skip(f"real Omniglot not found at {root}; set LIGHTNING_META_DATA")
    return root


@pytest.fixture(scope="session")
def omniglot_cache(omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the 28px cache of the real files once per session; records how long the first build took."""
    from datamodules import Omniglot

    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    start = time.perf_counter()
    Omniglot(root=str(omniglot_root), cache_dir=str(cache_dir)).prepare_data()
    return {
        "root": str(omniglot_root),
        "cache_dir": str(cache_dir),
        "first_load_s": time.perf_counter() - start,
    }


@pytest.fixture
def fake_omniglot(tmp_path: Path) -> Path:
    """A writable copy of the tiny generated Omniglot (tests/data/omniglot)."""
    root = tmp_path / "omniglot"
    root.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy(FAKE_OMNIGLOT / name, root / name)
    return root


# ----------------------------------------------------------------------------- nothing left behind
# Tests write only into temporary folders. The session compares the files git does not track
# (ignored ones included: lightning_logs/, MUJOCO_LOG.TXT) before and after, and fails when one
# appeared; caches of Python and the tools are allowed.
_TOOL_CACHES = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.ruff_cache|\.mypy_cache|\.venv|[^/]*\.egg-info)(/|$)")


def untracked_files() -> set[str] | None:
    """Paths under the clone that git does not track (folders collapsed), or None outside a git clone."""
    try:
        done = subprocess.run(["git", "ls-files", "--others", "--directory"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return {path for path in done.stdout.splitlines() if not _TOOL_CACHES.search(path)}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = untracked_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before, after = session.config.stash.get(_BEFORE, None), untracked_files()
    if before is None or after is None:
        return
    left = sorted(after - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: the tests left files in the clone outside temporary folders: {left}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str] | None]()
