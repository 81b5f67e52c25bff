"""Files we read and write: dataset pickles are loaded as data, and every file is written atomically."""

import errno
import io
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import write_miniimagenet

from datamodules import MiniImageNet
from datamodules.cifar import ARCHIVE, read_cifar100
from datamodules.files import WriteError, atomic_file
from datamodules.images import load_cache, load_pickle, save_cache

pytestmark = pytest.mark.filterwarnings("ignore:the '.*' split of mini-ImageNet")
FAKE_CIFAR = Path(__file__).parents[1] / "data" / "cifar100" / ARCHIVE


class CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a crafted pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_real_dataset_pickles_still_load_as_data():
    arrays = {"image_data": np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3), "labels": np.int64(3)}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = load_pickle(io.BytesIO(pickle.dumps({**arrays, "names": ["a", b"b"]}, protocol)))
        assert np.array_equal(loaded["image_data"], arrays["image_data"]) and loaded["labels"] == 3


def test_miniimagenet_pickle_that_would_run_code_is_refused(tmp_path):
    root = write_miniimagenet(tmp_path / "mini", classes=3, per_class=4)
    marker = tmp_path / "created_by_the_pickle"
    with (root / "mini-imagenet-cache-train.pkl").open("wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": CreatesAFile(marker)}, f)
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-train.pkl was not loaded: it names (builtins|io).open"):
        MiniImageNet(root=str(root)).load_split("train")
    assert not marker.exists()


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    with tarfile.open(FAKE_CIFAR) as archive:
        archive.extractall(tmp_path, filter="data")
    folder = tmp_path / "cifar-100-python"
    marker = tmp_path / "created_by_the_pickle"
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": CreatesAFile(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"meta was not loaded: it names (builtins|io).open"):
        read_cifar100(folder)
    assert not marker.exists()


def test_failed_write_leaves_the_old_file_and_names_path_and_free_space(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with pytest.raises(WriteError, match=rf"could not write the table {path} .*No space left.* free on that disk"):
        with atomic_file(path, "table", text=True) as f:
            f.write("new, half")
            full_disk()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary file left


def test_a_write_during_an_earlier_error_names_that_error_first(tmp_path):
    try:
        raise WriteError("could not write the checkpoint best.ckpt")
    except WriteError:
        with pytest.raises(WriteError, match=r"interrupted.ckpt .* earlier error: WriteError: .*best.ckpt"):
            with atomic_file(tmp_path / "interrupted.ckpt", "checkpoint"):
                full_disk()
    assert list(tmp_path.iterdir()) == []


DISK_FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"),
]


@pytest.mark.parametrize("error", DISK_FULL)
def test_image_cache_on_a_full_disk_warns_and_leaves_no_partial_file(tmp_path, monkeypatch, error):
    path = tmp_path / "train.pt"
    save_cache(path, {"version": 1, "stamp": "a", "images": torch.zeros(3)}, "Test")

    def write_half(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise error

    monkeypatch.setattr(torch, "save", write_half)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_cache(path, {"version": 1, "stamp": "b", "images": torch.ones(3)}, "Test")
    assert any(str(path) in str(w.message) and "free on that disk" in str(w.message) for w in caught), caught
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt"]
    assert load_cache(path, 1, "a") is not None  # the old cache is whole
