import os
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from datamodules import Omniglot
from datamodules.omniglot import LAKE_VAL_ALPHABETS, MD5, URL, vinyals_split


# ----------------------------------------------------------------------------- real files
def test_real_omniglot_has_1623_characters_and_the_vinyals_split(omniglot_cache):
    dm = Omniglot(root=omniglot_cache["root"], cache_dir=omniglot_cache["cache_dir"], rotations=False)
    splits = {s: dm.load_split(s) for s in ("train", "val", "test")}
    names = [n for d in splits.values() for n in d.names]
    assert len(names) == 1623 and len(set(names)) == 1623
    images = torch.cat([d.images for d in splits.values()])
    assert images.shape == (1623 * 20, 1, 28, 28) and images.dtype == torch.uint8
    assert {s: d.num_classes for s, d in splits.items()} == {"train": 1028, "val": 172, "test": 423}
    chars = {s: set(d.names) for s, d in splits.items()}
    assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
    assert {n.split("/")[0] for n in chars["val"]} == set(vinyals_split()["val"])
    assert "Gurmukhi/character42" in chars["test"] and "Gurmukhi/character41" in chars["train"]
    # Strokes are bright on a dark background, as the models expect.
    assert images.float().mean() < 60


def test_rotations_make_four_classes_per_character(omniglot_cache):
    dm = Omniglot(root=omniglot_cache["root"], cache_dir=omniglot_cache["cache_dir"])
    val = dm.load_split("val")
    assert val.num_classes == 172 * 4
    first = val.images[: 4 * 20].view(4, 20, 1, 28, 28)
    for r in range(4):
        assert torch.equal(first[r], torch.rot90(first[0], r, dims=(-2, -1)))
    assert val.names[:4] == [f"{val.names[0][:-7]}/rot{d:03d}" for d in (0, 90, 180, 270)]


def test_cached_second_load_is_faster(omniglot_cache):
    start = time.perf_counter()
    Omniglot(root=omniglot_cache["root"], cache_dir=omniglot_cache["cache_dir"]).prepare_data()
    cached = time.perf_counter() - start
    assert cached < omniglot_cache["first_load_s"] / 5
    assert all((Path(omniglot_cache["cache_dir"]) / f"omniglot_{s}_28px.pt").exists() for s in ("train", "val", "test"))


def test_read_only_root_caches_elsewhere(fake_omniglot, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Omniglot(root=str(fake_omniglot)).cache_path("val") == fake_omniglot / "omniglot_val_28px.pt"
    fake_omniglot.chmod(0o555)
    try:
        expected = tmp_path / "xdg" / "lightning_meta" / "omniglot" / "omniglot_val_28px.pt"
        dm = Omniglot(root=str(fake_omniglot), rotations=False)
        assert dm.cache_path("val") == expected
        dm.prepare_data()
        assert expected.exists() and not list(fake_omniglot.glob("*.pt"))
    finally:
        fake_omniglot.chmod(0o755)


def test_episode_batch_from_real_data(omniglot_cache):
    dm = Omniglot(root=omniglot_cache["root"], cache_dir=omniglot_cache["cache_dir"], ways=20, shots=5, queries=5)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch.support_x.shape == (1, 100, 1, 28, 28) and batch.support_x.dtype == torch.uint8
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch.query_x.dtype == torch.float32 and 0 <= batch.query_x.min() and batch.query_x.max() <= 1


# ----------------------------------------------------------------------------- tiny fake files
def test_fake_omniglot_loads_through_the_real_code(fake_omniglot):
    dm = Omniglot(root=str(fake_omniglot), image_size=14, rotations=False, ways=2, shots=1, queries=1)
    sizes = {s: dm.load_split(s).num_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 3, "test": 4}  # Latin 3 + Greek 2 + Gurmukhi/01; Hebrew 2 + Bengali 1
    assert (fake_omniglot / "omniglot_val_14px.pt").exists()  # cached beside the data when writable
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (1, 2, 1, 14, 14)


def test_missing_root_names_the_files_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.zip.*download=True"):
        Omniglot(root=str(tmp_path / "nowhere")).prepare_data()


def test_corrupt_zip_names_the_file(fake_omniglot):
    (fake_omniglot / "images_evaluation.zip").write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="images_evaluation.zip is not a valid zip"):
        Omniglot(root=str(fake_omniglot)).prepare_data()


def test_corrupt_png_names_the_entry(fake_omniglot):
    path = fake_omniglot / "images_background.zip"
    with zipfile.ZipFile(path) as src:
        entries = {n: src.read(n) for n in src.namelist()}
    first = sorted(entries)[0]
    entries[first] = b"\x89PNG broken"
    with zipfile.ZipFile(path, "w") as dst:
        for n, data in entries.items():
            dst.writestr(n, data)
    with pytest.raises(ValueError, match=f"cannot decode image '.*images_background.zip:{first}'"):
        Omniglot(root=str(fake_omniglot)).prepare_data()


def test_wrong_layout_is_rejected(fake_omniglot):
    with zipfile.ZipFile(fake_omniglot / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Latin/readme.txt", b"hello")
    with pytest.raises(ValueError, match="outside the official layout"):
        Omniglot(root=str(fake_omniglot)).prepare_data()


def test_ways_larger_than_split_is_a_clear_error(fake_omniglot):
    dm = Omniglot(root=str(fake_omniglot), ways=20, rotations=True)
    with pytest.raises(ValueError, match=r"ways=20 but the 'val' split of Omniglot has 12 classes; lower ways"):
        dm.setup("validate")
    dm = Omniglot(root=str(fake_omniglot), ways=2, train_ways=60)
    with pytest.raises(ValueError, match=r"train_ways=60 but the 'train' split"):
        dm.setup("fit")


def test_too_many_shots_and_queries_is_a_clear_error(fake_omniglot):
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=10, queries=15)
    with pytest.raises(ValueError, match=r"shots \+ queries = 10 \+ 15 = 25 but class .* has only 20 examples"):
        dm.setup("test")


def test_download_fetches_the_official_files_with_checksums(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        omniglot_root = Path(__file__).parents[1] / "data" / "omniglot"
        served = filename.removeprefix(".").removesuffix(".part")  # fetched under a temporary name
        (Path(root) / filename).write_bytes((omniglot_root / served).read_bytes())

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    root = tmp_path / "new"
    dm = Omniglot(root=str(root), download=True, rotations=False)
    dm.prepare_data()
    assert calls == [
        (URL.format("images_background"), ".images_background.zip.part", MD5["images_background"]),
        (URL.format("images_evaluation"), ".images_evaluation.zip.part", MD5["images_evaluation"]),
    ]
    assert (root / "images_background.zip").exists() and (root / "images_evaluation.zip").exists()
    assert not list(root.glob("*.part"))
    assert URL.startswith("https://raw.githubusercontent.com/brendenlake/omniglot/")
    assert dm.load_split("test").num_classes == 4
    # Present files are not downloaded again.
    calls.clear()
    Omniglot(root=str(root), download=True, cache_dir=str(tmp_path / "c")).prepare_data()
    assert calls == []


def test_stale_cache_is_rebuilt(fake_omniglot):
    Omniglot(root=str(fake_omniglot), rotations=False).prepare_data()
    cache = fake_omniglot / "omniglot_test_28px.pt"
    saved = torch.load(cache, weights_only=True)
    saved["images"].zero_()
    torch.save(saved, cache)
    zip_path = fake_omniglot / "images_evaluation.zip"
    stat = zip_path.stat()
    os.utime(zip_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if the zip had changed
    assert Omniglot(root=str(fake_omniglot)).load_split("test").images.float().mean() > 0
    assert torch.load(cache, weights_only=True)["version"] == Omniglot.cache_version


def test_truncated_cache_is_rebuilt_with_a_warning(fake_omniglot):
    expected = Omniglot(root=str(fake_omniglot)).load_split("val").images.clone()
    cache = fake_omniglot / "omniglot_val_28px.pt"
    cache.write_bytes(cache.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        assert torch.equal(Omniglot(root=str(fake_omniglot)).load_split("val").images, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read from the cache, without a warning or the zips
        assert torch.equal(Omniglot(root=str(fake_omniglot)).load_split("val").images, expected)


# Pixel sums of the support images of the first episode of each split (fake zips, 14 px, seed 7),
# recorded before Omniglot moved onto CachedImageBundle: the same seed must keep drawing the same episodes.
PINNED_EPISODES = {
    "train": ([4363, 3919, 4106, 5248, 5352, 3373], 11517),
    "val": ([4772, 5183, 4312, 5625, 4454, 4314], 11698),
    "test": ([5325, 4518, 3694, 5169, 3883, 4518], 16753),
}


@pytest.mark.parametrize("split", PINNED_EPISODES)
def test_fixed_seed_episodes_are_pinned(fake_omniglot, split):
    dm = Omniglot(root=str(fake_omniglot), image_size=14, ways=3, shots=2, queries=1, seed=7)
    dm.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    batch = next(iter(getattr(dm, f"{split}_dataloader")()))
    support_sums, query_sum = PINNED_EPISODES[split]
    assert batch.support_x.flatten(2).long().sum(-1).tolist() == [support_sums]
    assert batch.support_y.tolist() == [[0, 0, 1, 1, 2, 2]]
    assert batch.query_x.long().sum().item() == query_sum


# ----------------------------------------------------------------------------- the Lake split
def test_lake_split_of_the_fake_zips(fake_omniglot):
    dm = Omniglot(root=str(fake_omniglot), split="lake", rotations=False, image_size=14)
    data = {s: dm.load_split(s) for s in ("train", "val", "test")}
    # train: every background character; val: Kannada (a LAKE_VAL_ALPHABETS alphabet); test: Gurmukhi.
    assert data["train"].names == sorted(
        ["Latin/character01", "Latin/character02", "Latin/character03", "Greek/character01", "Greek/character02",
         "Hebrew/character01", "Hebrew/character02", "Bengali/character01"]
    )  # fmt: skip
    assert data["val"].names == ["Kannada/character01", "Kannada/character02"]
    assert data["test"].names == ["Gurmukhi/character01", "Gurmukhi/character42", "Gurmukhi/character43"]
    assert dm.cache_path("val") == fake_omniglot / "omniglot_lake_val_14px.pt" and dm.cache_path("val").exists()
    assert not (fake_omniglot / "omniglot_val_14px.pt").exists()  # the Vinyals caches are apart
    # Same drawings as the Vinyals split's, and rotations as classes as there.
    vinyals = Omniglot(root=str(fake_omniglot), rotations=False, image_size=14).load_split("train")
    k = vinyals.names.index("Latin/character02")
    assert torch.equal(data["train"].images[data["train"].names.index("Latin/character02") * 20 :][:20],
                       vinyals.images[k * 20 : (k + 1) * 20])  # fmt: skip
    rotated = Omniglot(root=str(fake_omniglot), split="lake", image_size=14).load_split("val")
    assert rotated.num_classes == 8 and rotated.names[1] == "Kannada/character01/rot090"
    assert torch.equal(rotated.images[20:40], torch.rot90(data["val"].images[:20], 1, dims=(-2, -1)))


def test_lake_val_alphabets_are_every_fourth_sorted_evaluation_alphabet(omniglot_root):
    with zipfile.ZipFile(omniglot_root / "images_evaluation.zip") as archive:
        alphabets = sorted({n.split("/")[1] for n in archive.namelist() if n.endswith(".png")})
    assert len(alphabets) == 20
    assert LAKE_VAL_ALPHABETS == tuple(alphabets[::4])


def test_real_lake_split_trains_on_exactly_the_background_characters(omniglot_root, tmp_path):
    dm = Omniglot(root=str(omniglot_root), cache_dir=str(tmp_path), split="lake")
    dm.prepare_data()
    with zipfile.ZipFile(omniglot_root / "images_background.zip") as archive:
        background = {n.rsplit("/", 1)[0].split("/", 1)[1] for n in archive.namelist() if n.endswith(".png")}
    assert len(background) == 964
    splits = {s: dm.load_split(s) for s in ("train", "val", "test")}
    assert {s: d.num_classes for s, d in splits.items()} == {"train": 964 * 4, "val": 140 * 4, "test": 519 * 4}
    assert {n.rsplit("/", 1)[0] for n in splits["train"].names} == background
    assert {n.split("/")[0] for n in splits["val"].names} == set(LAKE_VAL_ALPHABETS)
    assert not {n.split("/")[0] for n in splits["test"].names} & set(LAKE_VAL_ALPHABETS)
    # The Vinyals split, by contrast, trains on characters of the evaluation set.
    vinyals = Omniglot(root=str(omniglot_root), cache_dir=str(tmp_path), rotations=False).load_split("train")
    assert "Gurmukhi/character01" in vinyals.names and not set(vinyals.names) <= background
