import hashlib
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import datamodules.cifar as cifar_module
from datamodules import CIFARFS, FC100
from datamodules.cifar import ARCHIVE, MD5, URL, load_split_lists, read_cifar100

FAKE = Path(__file__).parents[1] / "data" / "cifar100" / ARCHIVE
BUNDLES = [CIFARFS, FC100]


@pytest.fixture
def fake_cifar100(tmp_path: Path) -> Path:
    """A writable folder holding the tiny generated CIFAR-100 archive (tests/data/cifar100)."""
    root = tmp_path / "cifar100"
    root.mkdir()
    shutil.copy(FAKE, root / ARCHIVE)
    return root


def extract(root: Path) -> None:
    with tarfile.open(root / ARCHIVE) as archive:
        archive.extractall(root, filter="data")


# ----------------------------------------------------------------------------- split lists
def test_published_split_lists_have_the_paper_counts_and_real_names(fake_cifar100):
    names = read_cifar100(fake_cifar100 / ARCHIVE)  # the real 100 fine and 20 coarse names
    fs = load_split_lists("cifarfs")
    assert {s: len(v) for s, v in fs.items()} == {"train": 64, "val": 16, "test": 20}
    assert set(fs["train"]) | set(fs["val"]) | set(fs["test"]) == set(names.fine_names)
    fc = load_split_lists("fc100")
    assert {s: len(v) for s, v in fc.items()} == {"train": 12, "val": 4, "test": 4}
    assert set(fc["train"]) | set(fc["val"]) | set(fc["test"]) == set(names.coarse_names)
    # Bertinetto et al.'s val and test lists, spot-checked.
    assert {"beaver", "otter", "tractor"} <= set(fs["val"]) and {"whale", "rocket", "woman"} <= set(fs["test"])
    assert set(fc["test"]) == {"aquatic_mammals", "insects", "medium_mammals", "people"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.__name__)
def test_splits_are_disjoint_with_the_published_class_counts(bundle, fake_cifar100):
    dm = bundle(root=str(fake_cifar100))
    splits = {s: dm.load_split(s) for s in ("train", "val", "test")}
    assert {s: d.num_classes for s, d in splits.items()} == bundle.num_classes
    names = {s: set(d.names) for s, d in splits.items()}
    assert len(names["train"] | names["val"] | names["test"]) == 100
    for data in splits.values():
        assert data.images.shape == (data.num_classes * 10, 3, 32, 32) and data.images.dtype == torch.uint8
        assert data.counts.tolist() == [10] * data.num_classes  # 8 from 'train' and 2 from 'test', pooled


def test_fc100_keeps_superclasses_apart(fake_cifar100):
    data = read_cifar100(fake_cifar100 / ARCHIVE)
    super_of = {data.fine_names[f]: data.coarse_names[c] for f, c in zip(data.fine, data.coarse, strict=True)}
    dm = FC100(root=str(fake_cifar100))
    supers = {s: {super_of[n] for n in dm.load_split(s).names} for s in ("train", "val", "test")}
    assert supers == {s: set(v) for s, v in load_split_lists("fc100").items()}


def test_images_of_a_class_are_its_own(fake_cifar100):
    data = read_cifar100(fake_cifar100 / ARCHIVE)
    val = CIFARFS(root=str(fake_cifar100)).load_split("val")
    c = val.names.index("otter")
    mine = val.images[val.offsets[c] : val.offsets[c + 1]]
    theirs = data.images[torch.from_numpy(data.fine == data.fine_names.index("otter"))]
    assert torch.equal(mine, theirs)


# ----------------------------------------------------------------------------- files and cache
def test_extracted_folder_reads_like_the_archive(fake_cifar100, tmp_path):
    from_archive = CIFARFS(root=str(fake_cifar100), cache_dir=str(tmp_path / "a")).load_split("test")
    extract(fake_cifar100)
    (fake_cifar100 / ARCHIVE).unlink()
    from_folder = CIFARFS(root=str(fake_cifar100), cache_dir=str(tmp_path / "b")).load_split("test")
    assert torch.equal(from_archive.images, from_folder.images) and from_archive.names == from_folder.names


def test_fake_archive_reads_with_torchvision(fake_cifar100, monkeypatch):
    """The fake is in the official format: torchvision's own CIFAR100 reader takes it."""
    from torchvision.datasets import CIFAR100

    extract(fake_cifar100)
    # torchvision checks the MD5s of the official files, which the fake cannot have.
    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: True)
    ours = read_cifar100(fake_cifar100 / ARCHIVE)
    theirs = CIFAR100(str(fake_cifar100), train=False)
    assert theirs.classes == ours.fine_names and len(theirs) == 200
    image, label = theirs[0]
    assert torch.equal(torch.as_tensor(theirs.data[0]).permute(2, 0, 1), ours.images[800])
    assert label == ours.fine[800]


def test_cache_is_written_and_reused(fake_cifar100, monkeypatch):
    CIFARFS(root=str(fake_cifar100)).prepare_data()
    for split in ("train", "val", "test"):
        assert (fake_cifar100 / f"cifarfs_{split}_32px.pt").exists()

    def no_reading(path):
        raise AssertionError("read the archive although the cache is fresh")

    monkeypatch.setattr(cifar_module, "read_cifar100", no_reading)
    assert CIFARFS(root=str(fake_cifar100)).load_split("train").num_classes == 64


def test_read_only_root_caches_elsewhere(fake_cifar100, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fake_cifar100.chmod(0o555)
    try:
        dm = FC100(root=str(fake_cifar100))
        dm.prepare_data()
        assert (tmp_path / "xdg" / "lightning_meta" / "fc100" / "fc100_val_32px.pt").exists()
        assert not list(fake_cifar100.glob("*.pt"))
    finally:
        fake_cifar100.chmod(0o755)


def test_image_size_resizes(fake_cifar100):
    data = FC100(root=str(fake_cifar100), image_size=28).load_split("val")
    assert data.images.shape[1:] == (3, 28, 28) and (fake_cifar100 / "fc100_val_28px.pt").exists()


# ----------------------------------------------------------------------------- errors
def test_missing_files_name_the_layout_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz, or the extracted folder .*download=True"):
        CIFARFS(root=str(tmp_path / "nowhere")).prepare_data()


def test_corrupt_archive_names_the_file(fake_cifar100):
    (fake_cifar100 / ARCHIVE).write_bytes(b"this is not a tar.gz")
    with pytest.raises(ValueError, match=r"cifar-100-python\.tar\.gz is not a valid tar\.gz archive.*download=True"):
        FC100(root=str(fake_cifar100)).prepare_data()


def test_truncated_archive_names_the_file(fake_cifar100):
    path = fake_cifar100 / ARCHIVE
    path.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(ValueError, match="cifar-100-python.tar.gz"):
        FC100(root=str(fake_cifar100)).prepare_data()


def test_archive_without_a_member_is_rejected(fake_cifar100):
    path = fake_cifar100 / ARCHIVE
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers() if not m.name.endswith("meta")]
    with tarfile.open(path, "w:gz") as archive:
        for member, content in members:
            archive.addfile(member, __import__("io").BytesIO(content))
    with pytest.raises(ValueError, match=r"has no 'cifar-100-python/meta'; expected the official"):
        CIFARFS(root=str(fake_cifar100)).prepare_data()


def test_corrupt_pickle_names_the_file(fake_cifar100):
    extract(fake_cifar100)
    (fake_cifar100 / ARCHIVE).unlink()
    (fake_cifar100 / "cifar-100-python" / "test").write_bytes(b"\x80\x02broken")
    with pytest.raises(ValueError, match=r"cannot read .*cifar-100-python/test"):
        CIFARFS(root=str(fake_cifar100)).prepare_data()


def test_ways_larger_than_split_is_a_clear_error(fake_cifar100):
    dm = CIFARFS(root=str(fake_cifar100), ways=20, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"ways=20 but the 'val' split of CIFARFS has 16 classes"):
        dm.setup("validate")


# ----------------------------------------------------------------------------- download
def fake_network(monkeypatch, calls):
    """Serve the fake archive to torchvision's real download_url, which then checks the MD5 itself."""
    import torchvision.datasets.utils as tv_utils

    def urlretrieve(url, filename, chunk_size=None):
        calls.append(url)
        shutil.copy(FAKE, filename)

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", urlretrieve)


def test_download_fetches_the_official_archive_and_checks_it(tmp_path, monkeypatch):
    calls = []
    fake_network(monkeypatch, calls)
    monkeypatch.setattr(cifar_module, "MD5", hashlib.md5(FAKE.read_bytes()).hexdigest())
    dm = CIFARFS(root=str(tmp_path / "new"), download=True)
    dm.prepare_data()
    assert calls == [URL] and (tmp_path / "new" / ARCHIVE).exists()
    assert dm.load_split("test").num_classes == 20
    calls.clear()
    FC100(root=str(tmp_path / "new"), download=True).prepare_data()  # present: not fetched again
    assert calls == []


def test_download_with_a_wrong_checksum_is_a_clear_error(tmp_path, monkeypatch):
    calls = []
    fake_network(monkeypatch, calls)  # the fake archive does not have the official MD5
    assert (
        MD5 == "eb9058c3a382ffc7106e4002c42a8d85" and URL == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    )
    with pytest.raises(ValueError, match=f"failed its MD5 check \\(expected {MD5}\\).*re-run with download=True"):
        CIFARFS(root=str(tmp_path / "new"), download=True).prepare_data()
    assert calls == [URL] and not (tmp_path / "new" / ARCHIVE).exists()


def test_a_stopped_download_or_unpacking_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from datamodules.download import Remote, download

    folder, md5 = tmp_path / "data", hashlib.md5(FAKE.read_bytes()).hexdigest()
    remote = [Remote(URL, ARCHIVE, md5)]

    def cut_off(url, filename, chunk_size=None):  # half the bytes arrive, then the user presses Ctrl+C
        Path(filename).write_bytes(FAKE.read_bytes()[: FAKE.stat().st_size // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", cut_off)
    with pytest.raises(KeyboardInterrupt):
        download(remote, folder, "CIFAR-100", extract=True)
    assert not (folder / ARCHIVE).exists()  # only the .part, which the next call does not trust

    def unpack_cut_off(from_path, to_path, *args, **kwargs):
        Path(to_path, "cifar-100-python").mkdir(parents=True)
        Path(to_path, "cifar-100-python", "train").write_bytes(b"half")
        raise KeyboardInterrupt

    fake_network(monkeypatch, calls := [])
    monkeypatch.setattr(tv_utils, "extract_archive", unpack_cut_off)
    with pytest.raises(KeyboardInterrupt):
        download(remote, folder, "CIFAR-100", extract=True)
    assert calls == [URL] and (folder / ARCHIVE).read_bytes() == FAKE.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [ARCHIVE]  # no half-unpacked folder, no .part

    monkeypatch.undo()
    fake_network(monkeypatch, calls)
    download(remote, folder, "CIFAR-100", extract=True)  # the archive is there: only unpacked
    assert calls == [URL] and (folder / "cifar-100-python" / "train").stat().st_size > 4


# ----------------------------------------------------------------------------- episodes and augmentation
@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.__name__)
def test_episode_shapes(bundle, fake_cifar100):
    dm = bundle(root=str(fake_cifar100), ways=5, shots=2, queries=3, train_ways=20, tasks_per_batch=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 40, 3, 32, 32) and batch.query_x.shape == (2, 60, 3, 32, 32)
    assert batch.support_x.dtype == torch.uint8 and batch.support_y[0].tolist() == [i for i in range(20) for _ in "ab"]
    batch = next(iter(dm.val_dataloader()))
    assert batch.support_x.shape == (2, 10, 3, 32, 32) and batch.query_y.shape == (2, 15)


def transferred(dm, split, training):
    batch = next(iter(dm.val_dataloader() if split == "val" else dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=training)
    try:
        return dm.on_after_batch_transfer(batch, 0)
    finally:
        dm.trainer = None


def test_augmentation_changes_training_images_only(fake_cifar100):
    plain = CIFARFS(root=str(fake_cifar100), ways=5, shots=1, queries=2, seed=3)
    augmented = CIFARFS(root=str(fake_cifar100), ways=5, shots=1, queries=2, seed=3, augment=True)
    for dm in (plain, augmented):
        dm.setup("fit")
    torch.manual_seed(0)
    a, b = transferred(plain, "train", True), transferred(augmented, "train", True)
    assert torch.equal(a.support_y, b.support_y) and a.support_x.shape == b.support_x.shape
    assert not torch.equal(a.support_x, b.support_x)  # cropped or flipped
    assert a.support_x.min() >= 0 and a.support_x.max() <= 1
    # Validation episodes: the same for the same seed, augmented or not.
    a, b = transferred(plain, "val", False), transferred(augmented, "val", False)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_augmentation_pads_by_4_pixels(fake_cifar100, monkeypatch):
    seen = []
    monkeypatch.setattr(cifar_module, "random_crop_flip", lambda images, padding: seen.append(padding) or images)
    CIFARFS(root=str(fake_cifar100), augment=True).augment_images(torch.zeros(1, 1, 3, 32, 32))
    assert seen == [4]
