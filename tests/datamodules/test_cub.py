import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import fake_image, write_cub
from PIL import Image

from datamodules import CUB
from datamodules.cub import MD5, URL, chen_split

pytestmark = pytest.mark.filterwarnings("ignore:the '.*' split of CUB")


def test_chen_split_of_the_200_classes():
    splits = [chen_split(i) for i in range(200)]
    assert {s: splits.count(s) for s in ("train", "val", "test")} == {"train": 100, "val": 50, "test": 50}
    # write_CUB_filelist.py: base i % 2 == 0, val i % 4 == 1, novel i % 4 == 3
    assert splits[:8] == ["train", "val", "train", "test", "train", "val", "train", "test"]


def test_official_layout_loads_with_the_chen_split(tmp_path):
    root = write_cub(tmp_path, classes=12, per_class=5)
    (root / "CUB_200_2011" / "images" / "002.Fake_Bird_B" / ".DS_Store").write_bytes(b"junk")
    dm = CUB(root=str(root))
    with pytest.warns(UserWarning, match=r"'val' split of CUB .* has 3 classes, the official one has 50"):
        val = dm.load_split("val")
    assert val.names == ["002.Fake_Bird_B", "006.Fake_Bird_F", "010.Fake_Bird_J"]
    assert dm.load_split("test").names == ["004.Fake_Bird_D", "008.Fake_Bird_H", "012.Fake_Bird_L"]
    assert dm.load_split("train").names == [f"{i:03d}.Fake_Bird_{chr(64 + i)}" for i in (1, 3, 5, 7, 9, 11)]
    assert val.counts.tolist() == [5, 5, 5]  # the hidden file is not an image
    assert val.images.shape == (15, 3, 84, 84) and val.images.dtype == torch.uint8
    # The 80x60 photos are resized to 84x84 squares.
    expected = Image.fromarray(fake_image(0, 5, 2, 60, 80)).resize((84, 84), Image.Resampling.LANCZOS)
    difference = (val.images[5 + 2].float() - torch.from_numpy(np.array(expected)).permute(2, 0, 1)).abs().mean()
    assert difference < 10  # JPEG is lossy (about 6.5 here); the other images differ by 15 or more
    assert (root / "cub_val_84px.pt").exists()


def test_root_may_be_the_cub_folder_itself(tmp_path):
    root = write_cub(tmp_path, classes=4, per_class=3) / "CUB_200_2011"
    assert CUB(root=str(root), image_size=16).load_split("test").names == ["004.Fake_Bird_D"]
    assert (root / "cub_test_16px.pt").exists()


def test_missing_images_describe_the_layout_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CUB(root=str(tmp_path)).prepare_data()
    message = str(err.value)
    assert f"CUB images not found at {tmp_path / 'CUB_200_2011' / 'images'}" in message
    assert "CUB_200_2011/images/<NNN.Class_Name>/<file>.jpg" in message and "download=True" in message


def test_corrupt_jpeg_names_the_file(tmp_path):
    root = write_cub(tmp_path, classes=4, per_class=3)
    bad = root / "CUB_200_2011" / "images" / "003.Fake_Bird_C" / "Fake_Bird_C_0002_1075.jpg"
    assert bad.exists()
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot decode image '.*003.Fake_Bird_C/Fake_Bird_C_0002_1075.jpg'"):
        CUB(root=str(root)).load_split("train")


def test_empty_class_folder_is_named(tmp_path):
    root = write_cub(tmp_path, classes=4, per_class=3)
    shutil.rmtree(root / "CUB_200_2011" / "images" / "002.Fake_Bird_B")
    (root / "CUB_200_2011" / "images" / "002.Fake_Bird_B").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*002.Fake_Bird_B has no images"):
        CUB(root=str(root)).load_split("val")


def test_download_fetches_the_official_archive_with_its_md5(tmp_path, monkeypatch):
    calls = []
    archive = tmp_path / "served" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(write_cub(tmp_path / "made", classes=8, per_class=3) / "CUB_200_2011", arcname="CUB_200_2011")

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        shutil.copy(archive, Path(root) / filename)

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    root = tmp_path / "new"
    dm = CUB(root=str(root), download=True)
    dm.prepare_data()
    # Fetched under a temporary name, renamed once checked, then unpacked by the real extract_archive.
    assert calls == [(URL, ".CUB_200_2011.tgz.part", MD5)] and (root / "CUB_200_2011.tgz").exists()
    assert URL == "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    assert MD5 == "97eceeb196236b17998738112f37df78"
    assert dm.load_split("test").num_classes == 2
    calls.clear()
    CUB(root=str(root), download=True, cache_dir=str(tmp_path / "c")).prepare_data()
    assert calls == []  # present images are not downloaded again
