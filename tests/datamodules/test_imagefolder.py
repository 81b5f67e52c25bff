import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from fake_data import fake_image, write_imagefolder

from datamodules import EpisodicImageFolder, Omniglot
from datamodules.base import EmptySplitError
from datamodules.omniglot import read_zip


def flatten_to_split_file(root: Path, tmp_path: Path) -> Path:
    """Turn root/<split>/<class> into flat/<class> plus a split file; returns the split file."""
    flat, spec = tmp_path / "flat", {}
    for split in ("train", "val", "test"):
        spec[split] = sorted(p.name for p in (root / split).iterdir())
        for folder in (root / split).iterdir():
            shutil.copytree(folder, flat / folder.name)
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps(spec))
    return split_file


def test_split_folders(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=20)
    (root / "val" / "val_class1" / "README.txt").write_text("not an image, skipped")
    dm = EpisodicImageFolder(root=str(root), image_size=20)
    val = dm.load_split("val")
    assert val.names == ["val_class0", "val_class1", "val_class2"] and val.counts.tolist() == [4, 4, 4]
    assert val.images.shape == (12, 3, 20, 20) and val.images.dtype == torch.uint8
    assert torch.equal(val.images[4 + 3], torch.from_numpy(fake_image(1, 1, 3, 20, 20)).permute(2, 0, 1))
    assert (root / "imagefolder_val_20px_3ch.pt").exists()


def test_split_file_over_one_folder_of_classes(tmp_path):
    split_file = flatten_to_split_file(write_imagefolder(tmp_path / "data", classes=3, per_class=4), tmp_path)
    dm = EpisodicImageFolder(
        root=str(tmp_path / "flat"), split_file=str(split_file), image_size=16, channels=1, ways=3, queries=2
    )
    test = dm.load_split("test")
    assert test.names == ["test_class0", "test_class1", "test_class2"]
    assert test.images.shape == (12, 1, 16, 16)
    assert dm.cache_path("test").parent == tmp_path / "flat" and dm.cache_path("test").exists()
    assert dm.cache_path("test").name.startswith("imagefolder_test_16px_1ch_split")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (1, 3, 1, 16, 16) and batch.query_x.shape == (1, 6, 1, 16, 16)


def test_channels_and_split_file_are_part_of_the_cache(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=12)
    rgb = EpisodicImageFolder(root=str(root), image_size=12).load_split("test")
    gray = EpisodicImageFolder(root=str(root), image_size=12, channels=1).load_split("test")
    assert rgb.images.shape[1] == 3 and gray.images.shape[1] == 1
    assert EpisodicImageFolder(root=str(root), image_size=12).load_split("test").images.shape[1] == 3


def test_missing_split_folder_describes_both_layouts(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=8)
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError) as err:
        EpisodicImageFolder(root=str(root)).prepare_data()
    message = str(err.value)
    assert f"split folder {root / 'val'} not found" in message
    assert "<split>/<class>/<image>" in message and "split_file=" in message


def test_split_file_errors(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=8)
    split_file = flatten_to_split_file(root, tmp_path)
    flat = str(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match=r"split_file='.*nowhere.json' not found"):
        EpisodicImageFolder(root=flat, split_file=str(tmp_path / "nowhere.json")).load_split("train")
    split_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"splits.json is not valid JSON"):
        EpisodicImageFolder(root=flat, split_file=str(split_file)).load_split("train")
    split_file.write_text(json.dumps({"train": ["train_class0"], "test": []}))
    with pytest.raises(ValueError, match=r"lists of class folder names under 'train', 'val' and 'test'"):
        EpisodicImageFolder(root=flat, split_file=str(split_file)).load_split("train")
    split_file.write_text(json.dumps({"train": ["train_class0"], "val": ["train_class0"], "test": []}))
    with pytest.raises(ValueError, match=r"puts class 'train_class0' in both 'train' and 'val'"):
        EpisodicImageFolder(root=flat, split_file=str(split_file)).load_split("train")
    split_file.write_text(json.dumps({"train": ["train_class0", "nope"], "val": [], "test": []}))
    with pytest.raises(FileNotFoundError, match=r"lists class folders that do not exist: .*nope"):
        EpisodicImageFolder(root=flat, split_file=str(split_file)).load_split("train")


def test_unreadable_image_names_the_file(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=8)
    (root / "train" / "train_class2" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"cannot decode image '.*train/train_class2/001.png'"):
        EpisodicImageFolder(root=str(root)).load_split("train")


def test_class_without_images_and_too_few_images(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=8)
    (root / "test" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*test/empty has no images"):
        EpisodicImageFolder(root=str(root)).load_split("test")
    (root / "test" / "empty").rmdir()
    dm = EpisodicImageFolder(root=str(root), ways=3, shots=2, queries=3)
    with pytest.raises(ValueError, match=r"shots \+ queries = 2 \+ 3 = 5 but class 'test_class0' .* has only 4"):
        dm.setup("test")


def test_channels_must_be_1_or_3():
    with pytest.raises(ValueError, match=r"channels=2 must be 1 \(grayscale\) or 3 \(RGB\)"):
        EpisodicImageFolder(channels=2)


# ----------------------------------------------------------------------------- real Omniglot PNGs
def test_real_omniglot_pngs_match_the_omniglot_bundle(omniglot_root, tmp_path):
    """Unpack 12 real characters into train/val/test folders; the pixels equal the Omniglot bundle's (inverted)."""
    with zipfile.ZipFile(omniglot_root / "images_background.zip") as archive:
        entries = sorted(n for n in archive.namelist() if n.endswith(".png"))
        characters = sorted({n.rsplit("/", 1)[0] for n in entries})[:12]
        chosen = [n for n in entries if n.rsplit("/", 1)[0] in characters]
        # The same entries in a zip of the official name, for the Omniglot bundle's reader.
        (tmp_path / "zip").mkdir()
        with zipfile.ZipFile(tmp_path / "zip" / "images_background.zip", "w") as small:
            for name in chosen:
                small.writestr(name, archive.read(name))
        root = tmp_path / "folders"
        for k, character in enumerate(characters):
            _, alphabet, char = character.split("/")
            split = "train" if k < 6 else "val" if k < 9 else "test"
            folder = root / split / f"{alphabet}_{char}"
            folder.mkdir(parents=True)
            for name in chosen:
                if name.startswith(character + "/"):
                    (folder / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    dm = EpisodicImageFolder(root=str(root), image_size=28, channels=1, ways=3, train_ways=5, queries=5)
    data = {s: dm.load_split(s) for s in ("train", "val", "test")}
    assert {s: d.num_classes for s, d in data.items()} == {"train": 6, "val": 3, "test": 3}
    assert all(d.counts.tolist() == [20] * d.num_classes for d in data.values())

    with pytest.warns(UserWarning, match="the official file has 964"):
        names, images = read_zip(tmp_path / "zip" / "images_background.zip", 28)
    assert [n.replace("/", "_") for n in names] == data["train"].names + data["val"].names + data["test"].names
    folder_images = torch.cat([d.images for d in data.values()]).view(12, 20, 1, 28, 28)
    assert torch.equal(255 - folder_images, images)  # Omniglot strokes are dark on white in the PNGs

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (1, 5, 1, 28, 28) and batch.query_x.shape == (1, 25, 1, 28, 28)


def test_invert_and_rotations_give_the_omniglot_bundles_tensors(omniglot_root, tmp_path):
    """Real Omniglot PNGs in class folders, invert=True and rotations=True: the Omniglot bundle's tensors."""
    with zipfile.ZipFile(omniglot_root / "images_evaluation.zip") as archive:
        entries = sorted(n for n in archive.namelist() if n.endswith(".png"))
        characters = sorted({n.rsplit("/", 1)[0] for n in entries})[:3]  # Angelic 1-3: Lake val characters
        chosen = [n for n in entries if n.rsplit("/", 1)[0] in characters]
        (tmp_path / "zips").mkdir()
        with zipfile.ZipFile(tmp_path / "zips" / "images_evaluation.zip", "w") as small:
            for name in chosen:
                small.writestr(name, archive.read(name))
        for character in characters:
            _, alphabet, char = character.split("/")
            folder = tmp_path / "flat" / f"{alphabet}_{char}"
            folder.mkdir(parents=True)
            for name in chosen:
                if name.startswith(character + "/"):
                    (folder / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    shutil.copy(omniglot_root / "images_background.zip", tmp_path / "zips")
    split_file = tmp_path / "splits.json"
    split_file.write_text(
        json.dumps({"train": [], "val": sorted(p.name for p in (tmp_path / "flat").iterdir()), "test": []})
    )
    folder = EpisodicImageFolder(
        root=str(tmp_path / "flat"), split_file=str(split_file), image_size=28, channels=1, invert=True, rotations=True
    ).load_split("val")
    bundle = Omniglot(root=str(tmp_path / "zips"), split="lake", cache_dir=str(tmp_path / "c")).load_split("val")
    assert folder.num_classes == bundle.num_classes == 12 and folder.counts.tolist() == [20] * 12
    assert folder.names == [n.replace("/", "_", 1) for n in bundle.names]  # Angelic_character01/rot000, ...
    assert torch.equal(folder.images, bundle.images)
    plain = EpisodicImageFolder(root=str(tmp_path / "flat"), split_file=str(split_file), image_size=28, channels=1)
    unrotated = bundle.images.view(3, 4, 20, 1, 28, 28)[:, 0].reshape(-1, 1, 28, 28)
    assert torch.equal(255 - plain.load_split("val").images, unrotated)  # dark strokes on white without invert


def test_rotations_of_classes_of_unequal_sizes(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=2, per_class=3, size=12)
    (root / "test" / "test_class0" / "002.png").unlink()
    plain = EpisodicImageFolder(root=str(root), image_size=12).load_split("test")
    rotated = EpisodicImageFolder(root=str(root), image_size=12, rotations=True).load_split("test")
    assert plain.counts.tolist() == [2, 3] and rotated.counts.tolist() == [2, 2, 2, 2, 3, 3, 3, 3]
    assert rotated.names[4:6] == ["test_class1/rot000", "test_class1/rot090"]
    for c in range(2):
        for r in range(4):
            start, stop = rotated.offsets[4 * c + r], rotated.offsets[4 * c + r + 1]
            original = plain.images[plain.offsets[c] : plain.offsets[c + 1]]
            assert torch.equal(rotated.images[start:stop], torch.rot90(original, r, dims=(-2, -1)))


def test_empty_test_split_only_fails_the_stages_that_use_it(tmp_path):
    split_file = flatten_to_split_file(write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=8), tmp_path)
    spec = json.loads(split_file.read_text())
    split_file.write_text(json.dumps({**spec, "test": []}))
    dm = EpisodicImageFolder(root=str(tmp_path / "flat"), split_file=str(split_file), image_size=8, ways=3, queries=2)
    dm.prepare_data()
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).support_x.shape == (1, 3, 3, 8, 8)
    dm.setup("validate")
    with pytest.raises(EmptySplitError) as err:
        dm.setup("test")
    message = str(err.value)
    assert f"the 'test' split of split_file {split_file} is empty" in message
    assert "the stages test, predict use it; give it classes" in message


def test_empty_split_folder_only_fails_the_stages_that_use_it(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, per_class=4, size=8)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    dm = EpisodicImageFolder(root=str(root), image_size=8, ways=3, queries=2)
    dm.prepare_data()
    dm.setup("test")
    with pytest.raises(
        ValueError, match=rf"the 'val' split folder {root / 'val'} has no class folders; the stages fit"
    ):
        dm.setup("fit")
