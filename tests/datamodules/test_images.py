"""What every cached image bundle shares, run on each bundle's tiny fake data in its real format."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_data import write_cub, write_imagefolder, write_miniimagenet, write_tieredimagenet

from datamodules import CUB, EpisodicImageFolder, MiniImageNet, TieredImageNet
from datamodules.images import CachedImageBundle

pytestmark = pytest.mark.filterwarnings("ignore:the '.*' split of .* classes, the official one")

# Each entry writes a tiny dataset with at least 3 classes of 6 images per split and returns the root.
WRITERS = {
    MiniImageNet: lambda tmp: write_miniimagenet(tmp / "mini", classes=3, per_class=6),
    TieredImageNet: lambda tmp: write_tieredimagenet(tmp / "tiered", classes=3, per_class=6),
    CUB: lambda tmp: write_cub(tmp / "cub", classes=12, per_class=6),
    EpisodicImageFolder: lambda tmp: write_imagefolder(tmp / "folder", classes=3, per_class=6, size=20),
}
BUNDLES = pytest.mark.parametrize("bundle", list(WRITERS), ids=lambda b: b.__name__)


def make(bundle, root: Path, **kwargs) -> CachedImageBundle:
    kwargs = {"ways": 3, "shots": 1, "queries": 2, "image_size": 24, **kwargs}
    return bundle(root=str(root), **kwargs)


@BUNDLES
def test_episodes_from_every_split(bundle, tmp_path):
    dm = make(bundle, WRITERS[bundle](tmp_path), tasks_per_batch=2, train_episodes=4, val_episodes=2)
    dm.prepare_data()
    for split, loader in (("train", dm.train_dataloader), ("val", dm.val_dataloader), ("test", dm.test_dataloader)):
        batch = next(iter(loader()))
        assert batch.support_x.shape == (2, 3, 3, 24, 24), split
        assert batch.query_x.shape == (2, 6, 3, 24, 24) and batch.query_x.dtype == torch.uint8
        assert batch.support_y.tolist() == [[0, 1, 2]] * 2 and batch.query_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
        data = dm.load_split(split)
        assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (3, 24, 24)
        assert data.offsets[-1] == len(data.images) and len(data.names) == data.num_classes >= 3


@BUNDLES
def test_cache_is_written_beside_the_data_and_reused(bundle, tmp_path, monkeypatch):
    root = WRITERS[bundle](tmp_path)
    first = make(bundle, root)
    first.prepare_data()
    for split in ("train", "val", "test"):
        assert first.cache_path(split).parent == root and first.cache_path(split).exists()

    def no_reading(self, split):
        raise AssertionError("read the files although the cache is valid")

    monkeypatch.setattr(bundle, "read_split", no_reading)
    again = make(bundle, root)
    for split in ("train", "val", "test"):
        cached = again.load_split(split)
        assert torch.equal(cached.images, first.load_split(split).images)
        assert cached.names == first.load_split(split).names
    # A changed source file makes the cache stale.
    monkeypatch.undo()
    source = make(bundle, root).source_files("val")[0]
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = []
    original = bundle.read_split
    monkeypatch.setattr(bundle, "read_split", lambda self, split: rebuilt.append(split) or original(self, split))
    make(bundle, root).prepare_data()
    assert rebuilt == ["val"]


@BUNDLES
def test_read_only_root_caches_under_xdg(bundle, tmp_path, monkeypatch):
    root = WRITERS[bundle](tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root.chmod(0o555)
    try:
        dm = make(bundle, root)
        path = dm.cache_path("test")
        assert path.is_relative_to(tmp_path / "xdg" / "lightning_meta" / bundle.cache_name)
        dm.load_split("test")
        assert path.exists() and not list(root.glob("*.pt"))
    finally:
        root.chmod(0o755)


@BUNDLES
def test_unreadable_cache_is_rebuilt_with_a_warning(bundle, tmp_path):
    root = WRITERS[bundle](tmp_path)
    expected = make(bundle, root).load_split("test").images.clone()
    make(bundle, root).cache_path("test").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        assert torch.equal(make(bundle, root).load_split("test").images, expected)


@BUNDLES
def test_augment_changes_training_images_only(bundle, tmp_path):
    root = WRITERS[bundle](tmp_path)
    plain, augmented = make(bundle, root), make(bundle, root, augment=True)
    batches = {}
    for name, dm in (("plain", plain), ("augmented", augmented)):
        dm.setup("fit")
        train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
        dm.trainer = SimpleNamespace(training=True)
        torch.manual_seed(0)
        train = dm.on_after_batch_transfer(train, 0)
        dm.trainer = SimpleNamespace(training=False)
        batches[name] = train, dm.on_after_batch_transfer(val, 0)
    (plain_train, plain_val), (aug_train, aug_val) = batches["plain"], batches["augmented"]
    assert plain_train.support_x.dtype == torch.float32 and aug_train.support_x.shape == plain_train.support_x.shape
    assert not torch.equal(aug_train.support_x, plain_train.support_x)
    assert not torch.equal(aug_train.query_x, plain_train.query_x)
    for field in range(4):
        assert torch.equal(aug_val[field], plain_val[field])


@BUNDLES
def test_more_ways_than_classes_is_a_clear_error(bundle, tmp_path):
    dm = make(bundle, WRITERS[bundle](tmp_path), ways=4)
    with pytest.raises(ValueError, match=rf"ways=4 but the 'val' split of {bundle.__name__} has 3 classes"):
        dm.setup("validate")


@BUNDLES
def test_image_size_is_validated(bundle, tmp_path):
    with pytest.raises(ValueError, match="image_size=0 must be at least 1"):
        make(bundle, tmp_path, image_size=0)
