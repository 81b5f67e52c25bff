"""Checkpoints are data, never half-written, and ``last.ckpt`` is the last step: loading, saving, resolving, runs."""

import datetime
import errno
import shutil
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from datamodules.files import WriteError
from lightning_meta import RFS, Conv4, EpisodicModule, load_checkpoint
from lightning_meta.checkpoints import (
    CLASS_KEY,
    TRUST_VARIABLE,
    EpisodicCheckpoint,
    SafeCheckpointIO,
    check_class,
    checkpoint_class,
    class_path_of,
    find_checkpoint,
)
from lightning_meta.cli import main, make_cli

REPO = Path(__file__).resolve().parents[1]
PROTONET = REPO / "configs" / "protonet" / "omniglot_5w1s.yaml"
EPOCHS, STEPS_PER_EPOCH = 3, 2


def data_args(root: Path) -> list[str]:
    args = ["--config", str(PROTONET), "--data.root", str(root), "--data.rotations", "false", "--data.ways", "2"]
    args += ["--data.queries", "3", "--data.train_ways", "2", "--data.train_episodes", str(STEPS_PER_EPOCH)]
    args += ["--data.val_episodes", "1", "--data.test_episodes", "2"]
    return args + ["--trainer.precision", "32", "--trainer.enable_progress_bar", "false"]


class CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a crafted checkpoint can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 3-epoch ProtoNet fit on the fake Omniglot whose val/acc improves only at the first validation."""
    folder = tmp_path_factory.mktemp("fit")
    root = folder / "omniglot"
    shutil.copytree(REPO / "tests" / "data" / "omniglot", root)
    improved: list[int] = []

    def first_only(self, trainer, current=None):
        improved.append(trainer.global_step)
        return len(improved) == 1

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(EpisodicCheckpoint, "check_monitor_top_k", first_only)
        cli = make_cli(["fit", *data_args(root), "--trainer.max_epochs", str(EPOCHS)])
    run = folder / str(cli.trainer.log_dir)  # log_dir is relative to the folder the fit ran in
    return {"root": root, "folder": folder, "run": run, "checkpoints": run / "checkpoints", "improved": improved}


# ----------------------------------------------------------------------------- last.ckpt
def test_last_ckpt_holds_the_last_step_when_val_acc_stopped_improving(fitted):
    assert len(fitted["improved"]) == EPOCHS  # one validation per epoch; only the first one was a new best
    (best,) = fitted["checkpoints"].glob("best-*.ckpt")
    assert torch.load(best, weights_only=True)["global_step"] == STEPS_PER_EPOCH
    last = torch.load(fitted["checkpoints"] / "last.ckpt", weights_only=True)
    assert last["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert last["epoch"] == EPOCHS - 1


# ----------------------------------------------------------------------------- loading as data
@pytest.fixture
def crafted(fitted, tmp_path):
    """A real checkpoint plus one entry whose unpickling would create ``marker``."""
    checkpoint = torch.load(fitted["checkpoints"] / "last.ckpt", weights_only=True)
    marker = tmp_path / "created_by_the_checkpoint"
    checkpoint["extra"] = CreatesAFile(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def image_folders(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for folder in ("support/a", "support/b", "query"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("support/a/1.png", "support/b/1.png", "query/1.png"):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path / "support", tmp_path / "query"


def test_a_crafted_checkpoint_runs_nothing_via_test_predict_or_load_checkpoint(
    fitted, crafted, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    path, marker = crafted
    support, query = image_folders(tmp_path)
    commands = [
        ["test", *data_args(fitted["root"]), "--ckpt_path", str(path)],
        ["predict", "--ckpt_path", str(path), "--support", str(support), "--query", str(query)],
    ]
    for args in commands:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert f"checkpoint '{path}' was not loaded: it names io.open" in error, error
        assert "--trust_checkpoint true" in error
        assert not marker.exists()
    with pytest.raises(ValueError, match=r"crafted.ckpt' was not loaded: it names io.open.*--trust_checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"crafted.ckpt' was not loaded"):  # the Trainer's own reader in the CLI
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_trust_checkpoint_loads_a_users_own_older_file(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TRUST_VARIABLE, "0")  # restored after the test; the CLI option sets it for its process
    checkpoint = torch.load(fitted["checkpoints"] / "last.ckpt", weights_only=True)
    checkpoint["written"] = datetime.date(2024, 1, 1)  # harmless, but not a type weights_only accepts
    path = tmp_path / "older.ckpt"
    torch.save(checkpoint, path)
    monkeypatch.chdir(tmp_path)
    args = ["test", *data_args(fitted["root"]), "--ckpt_path", str(path)]
    with pytest.raises(SystemExit):
        main(args)
    assert "it names datetime.date" in capsys.readouterr().err
    assert load_checkpoint(path, trust=True).training is False
    cli = make_cli([*args, "--trust_checkpoint", "true"])
    assert cli.trainer.ckpt_path == str(path)
    assert 0 <= cli.trainer.callback_metrics["test/acc"] <= 1


# ----------------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize("keep", [0, 1000])
def test_truncated_or_empty_ckpt_path_names_the_file(fitted, tmp_path, monkeypatch, capsys, keep):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "best-epoch000-step2.ckpt"
    path.write_bytes((fitted["checkpoints"] / "last.ckpt").read_bytes()[:keep])
    with pytest.raises(SystemExit):
        main(["test", *data_args(fitted["root"]), "--ckpt_path", str(path)])
    error = capsys.readouterr().err
    assert f"lightning-meta: error: checkpoint '{path}' is " in error
    assert ("empty (0 bytes)" if keep == 0 else "truncated or corrupt") in error


def test_best_and_last_skip_and_name_unreadable_files(tmp_path):
    trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="run"), enable_progress_bar=False)
    older, newer = tmp_path / "run" / "version_0" / "checkpoints", tmp_path / "run" / "version_1" / "checkpoints"
    for folder in (older, newer):
        folder.mkdir(parents=True)
    for name in ("best-epoch000-step2.ckpt", "last.ckpt"):
        torch.save({"global_step": 2}, older / name)
    (newer / "best-epoch003-step8.ckpt").write_bytes((older / "last.ckpt").read_bytes()[:100])  # truncated
    (newer / "last.ckpt").write_bytes(b"")  # 0 bytes
    for which, name, problem in (("best", "best-epoch003-step8.ckpt", "truncated"), ("last", "last.ckpt", "empty")):
        with pytest.warns(UserWarning, match=rf"skipped {newer / name} \({problem}"):
            assert find_checkpoint(trainer, which) == str(
                older / ("best-epoch000-step2.ckpt" if which == "best" else name)
            )
    for name in ("best-epoch000-step2.ckpt", "last.ckpt"):
        (older / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"every candidate .* {older / 'last.ckpt'} \(empty"):
        find_checkpoint(trainer, "last")


# ----------------------------------------------------------------------------- atomic saves
def write_half_then_fail(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_cli_saves_checkpoints_atomically_and_a_full_disk_keeps_the_old_file(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(data_args(fitted["root"]), run=False)
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, SafeCheckpointIO)  # ModelCheckpoint, last.ckpt and interrupted.ckpt all save through it
    path = tmp_path / "checkpoints" / "best.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(WriteError, match=rf"could not write the checkpoint {path} .*No space left.* free on that"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]


def test_predictions_csv_is_replaced_whole_or_not_at_all(fitted, tmp_path, monkeypatch):
    import csv

    from lightning_meta.inference import predict_folders

    support, query = image_folders(tmp_path)
    out = tmp_path / "predictions.csv"
    out.write_text("earlier predictions\n")

    class FullDisk:
        def __init__(self, f):
            self.rows = 0

        def writerow(self, row):
            self.rows += 1
            if self.rows == 2:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv, "writer", FullDisk)
    with pytest.raises(WriteError, match=rf"predictions CSV {out} "):
        predict_folders(str(fitted["checkpoints"] / "last.ckpt"), str(support), str(query), str(out))
    assert out.read_text() == "earlier predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "query", "support"]


# ----------------------------------------------------------------------------- run folders
def test_two_runs_never_share_a_version_folder(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The race: another fit creates version_0 after this one listed the folder and chose version_0.
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: 0)
    other = tmp_path / "lightning_logs" / "protonet_omniglot_5w1s" / "version_0"
    other.mkdir(parents=True)
    cli = make_cli(data_args(fitted["root"]), run=False)
    assert Path(cli.trainer.log_dir).name == "version_1"
    assert (other.parent / "version_1").is_dir()
    # A version given on purpose (resuming into a run's folder) is kept.
    cli = make_cli([*data_args(fitted["root"]), "--trainer.logger.init_args.version", "0"], run=False)
    assert Path(cli.trainer.log_dir) == Path("lightning_logs/protonet_omniglot_5w1s/version_0")
    assert sorted(p.name for p in other.parent.iterdir()) == ["version_0", "version_1"]


# ----------------------------------------------------------------------------- out of memory
def allocation_fails(*args, **kwargs):
    """A training step failing as PyTorch's CPU allocator does when a batch does not fit.

    Raised inside the step, as a real one is: every callback has seen the batch start by then, so
    InterruptCheckpoint holds a snapshot (it would save and advise a resume).
    """
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
    )


def test_out_of_memory_names_the_batch_settings_and_the_memory_asked(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(EpisodicModule, "training_step", allocation_fails)
    args = ["fit", *data_args(fitted["root"]), "--data.tasks_per_batch", "3000", "--trainer.num_sanity_val_steps", "0"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    line = next(x for x in error if x.startswith("lightning-meta: error:"))
    assert "out of memory: an allocation of 1.0 TiB failed" in line
    # No resume advice that cannot work, and no interrupted.ckpt to resume from into the same failure.
    assert "resume with" not in captured.out + captured.err
    assert not list(tmp_path.rglob("interrupted.ckpt"))
    assert "tasks_per_batch=3000, ways=2, shots=1, queries=3, train_ways=2" in line
    assert "lower --data.tasks_per_batch" in line


OLD_CLASS_PATHS = {
    "lightning_meta.base.EpisodicModule": "lightning_meta.bases.episodic.EpisodicModule",
    "lightning_meta.algorithms.gradient.GradientModule": "lightning_meta.bases.gradient.GradientModule",
    "lightning_meta.algorithms.baseline.PretrainedModule": "lightning_meta.bases.pretrained.PretrainedModule",
    "lightning_meta.algorithms.baseline.RFS": "lightning_meta.algorithms.rfs.RFS",
    "lightning_meta.rl.module.MetaRLModule": "lightning_meta.bases.meta_rl.MetaRLModule",
}


@pytest.mark.parametrize("old, new", OLD_CLASS_PATHS.items())
def test_class_paths_from_before_the_bases_moved_still_resolve(old, new):
    assert class_path_of(checkpoint_class({CLASS_KEY: {"class_path": old}})) == new


def test_an_rfs_checkpoint_that_records_its_old_class_path_loads(tmp_path):
    model = RFS(Conv4(hidden=8), num_classes=3, head_steps=2)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": lightning.__version__,
                  CLASS_KEY: {"class_path": "lightning_meta.algorithms.baseline.RFS"}}  # fmt: skip
    check_class(checkpoint, RFS)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt", backbone=Conv4(hidden=8))
    assert type(loaded) is RFS
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
