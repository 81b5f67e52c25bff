"""Shared fixtures: the real Omniglot files, one cache per test session, tiny fake data."""

from __future__ import annotations

import os
import shutil
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
