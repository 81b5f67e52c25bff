"""MuJoCo writes MUJOCO_LOG.TXT into the working directory when it compiles a model: run these tests in tmp."""

import pytest


@pytest.fixture(autouse=True)
def in_tmp_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
