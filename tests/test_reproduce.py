"""benchmarks/reproduce.py: a run stopped by its budget resumes exactly, the ledger and the table come from runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"
# Tiny episodes on the generated Omniglot: an epoch is 6 meta-batches, validation 2 episodes.
TINY = (
    "--data.train_episodes 6 --data.val_episodes 2 --data.test_episodes 3 --data.ways 3 --data.train_ways 3 "
    "--data.queries 2"
)


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reproduce(tmp_path, monkeypatch):
    module = load_reproduce()
    monkeypatch.setattr(module, "COMMITTED", tmp_path / "committed")
    monkeypatch.setattr(module, "FIGURES", tmp_path / "figures")
    monkeypatch.chdir(tmp_path)
    return module


def run(reproduce, fake_omniglot, runs, *extra):
    reproduce.main([str(CONFIG), "--runs", str(runs), "--data_root", str(fake_omniglot), "--hours", "1",
                    "--cli_args", f"{TINY} --data.cache_dir {runs.parent / 'cache'} --trainer.max_epochs 3",
                    "--precision", "32", "--test_episodes", "3", *extra])  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_run_stopped_by_its_budget_resumes_exactly(reproduce, fake_omniglot, tmp_path):
    # Stopped mid-epoch (after 4 of 6 meta-batches), then resumed: the same weights as one uninterrupted call.
    run(reproduce, fake_omniglot, tmp_path / "split", "--meta_batches", "4")
    ledger = json.loads((tmp_path / "split" / "protonet_omniglot_5w1s" / "ledger.json").read_text())
    assert ledger["status"] == "running" and ledger["sessions"][0]["meta_batches_end"] == 4
    run(reproduce, fake_omniglot, tmp_path / "split")
    run(reproduce, fake_omniglot, tmp_path / "whole")
    split = tmp_path / "split" / "protonet_omniglot_5w1s"
    whole = tmp_path / "whole" / "protonet_omniglot_5w1s"
    ledger = json.loads((split / "ledger.json").read_text())
    assert ledger["status"] == "max_epochs"
    assert [s["meta_batches_start"] for s in ledger["sessions"]] == [0, 4]
    assert [p["meta_batches"] for p in ledger["curve"]] == [6, 12, 18]
    for name, tensor in weights(whole / "resume.ckpt").items():
        torch.testing.assert_close(weights(split / "resume.ckpt")[name], tensor, rtol=0, atol=0)
    # Both ran the best checkpoint on the same fixed test episodes.
    assert ledger["tests"] and "test/acc" in ledger["tests"][-1]
    whole_ledger = json.loads((whole / "ledger.json").read_text())
    assert ledger["tests"][-1]["test/acc"] == whole_ledger["tests"][-1]["test/acc"]
    # A finished run is left alone by the next call.
    run(reproduce, fake_omniglot, tmp_path / "split")
    assert len(json.loads((split / "ledger.json").read_text())["sessions"]) == 2


def test_plateau_is_no_new_best_and_no_rising_mean_within_patience():
    reproduce = load_reproduce()
    flat = [{"val/acc": a} for a in (0.5, 0.7, 0.8, 0.801, 0.8, 0.8, 0.801, 0.799, 0.802)]
    assert reproduce.plateaued(flat, patience=3, min_delta=0.002)
    assert not reproduce.plateaued(flat, patience=3, min_delta=0.0)
    assert not reproduce.plateaued(flat[:5], patience=3, min_delta=0.002)  # fewer than two windows
    # A lucky early best and a slow noisy climb under it (Meta Networks' one-task steps): still rising.
    climbing = [{"val/acc": a} for a in (0.5, 0.9, 0.85, 0.86, 0.87, 0.88, 0.88, 0.89, 0.895)]
    assert not reproduce.plateaued(climbing, patience=3, min_delta=0.002)


def test_table_and_commit_come_from_the_ledgers(reproduce, fake_omniglot, tmp_path, capsys):
    runs = tmp_path / "runs"
    run(reproduce, fake_omniglot, runs, "--meta_batches", "7")
    reproduce.main(["--runs", str(runs), "--commit", "--table"])
    out = capsys.readouterr().out
    ledger = json.loads((runs / "protonet_omniglot_5w1s" / "ledger.json").read_text())
    best = 100 * max(p["val/acc"] for p in ledger["curve"])
    assert "| protonet/omniglot_5w1s | not plateaued yet (interim) | 7 (" in out
    assert f"| {best:.2f} |" in out and "98.80" in out  # Snell et al.'s figure beside ours
    assert (tmp_path / "figures" / "protonet_omniglot_5w1s.svg").read_text().startswith("<svg")
    # An unfinished small run is committed with its resume checkpoint; a fresh machine starts from them.
    committed = tmp_path / "committed"
    assert (committed / "ledgers" / "protonet_omniglot_5w1s.json").exists()
    assert (committed / "checkpoints" / "protonet_omniglot_5w1s.ckpt").exists()
    run(reproduce, fake_omniglot, tmp_path / "fresh_machine", "--meta_batches", "1")
    fresh = json.loads((tmp_path / "fresh_machine" / "protonet_omniglot_5w1s" / "ledger.json").read_text())
    assert [s["meta_batches_start"] for s in fresh["sessions"]] == [0, 7]
    assert fresh["sessions"][-1]["meta_batches_end"] == 8
