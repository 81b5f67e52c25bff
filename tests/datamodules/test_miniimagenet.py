import csv
import pickle

import numpy as np
import pytest
import torch
from fake_data import fake_image, write_miniimagenet
from PIL import Image

from datamodules import MiniImageNet

pytestmark = pytest.mark.filterwarnings("ignore:the '.*' split of mini-ImageNet")


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)


def test_pickles_load_class_by_class(tmp_path):
    root = write_miniimagenet(tmp_path, classes=4, per_class=6)
    dm = MiniImageNet(root=str(root))
    with pytest.warns(UserWarning, match=r"'train' split of mini-ImageNet .* has 4 classes, the official one has 64"):
        train = dm.load_split("train")
    assert train.names == ["n00000000", "n00000001", "n00000002", "n00000003"]
    assert train.counts.tolist() == [6] * 4
    assert train.images.shape == (24, 3, 84, 84) and train.images.dtype == torch.uint8
    # The rows of the pickle interleave the classes; the loader follows class_dict.
    assert torch.equal(train.images[2 * 6 + 5], chw(fake_image(0, 2, 5)))
    assert dm.load_split("test").names[0] == "n02000000"
    assert (root / "miniimagenet_train_84px.pt").exists()


def test_validation_pickle_name_of_learn2learn_copies(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4)
    (root / "mini-imagenet-cache-val.pkl").rename(root / "mini-imagenet-cache-validation.pkl")
    assert MiniImageNet(root=str(root)).load_split("val").names == ["n01000000", "n01000001", "n01000002"]


def test_csv_layout_decodes_and_resizes_the_jpegs(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4, layout="csv")
    assert (root / "images" / "n0000000000000001.jpg").exists()
    val = MiniImageNet(root=str(root), image_size=84).load_split("val")
    assert val.names == ["n01000000", "n01000001", "n01000002"] and val.counts.tolist() == [4, 4, 4]
    assert val.images.shape == (12, 3, 84, 84)
    expected = Image.fromarray(fake_image(1, 2, 3, 100, 120)).resize((84, 84), Image.Resampling.LANCZOS)
    difference = (val.images[2 * 4 + 3].float() - chw(np.array(expected)).float()).abs().mean()
    assert difference < 7  # JPEG is lossy (about 5); the next image of the class differs by 10, others by 20+


def test_pickles_win_over_the_csv_files(tmp_path):
    write_miniimagenet(tmp_path, classes=3, per_class=4, layout="csv")
    write_miniimagenet(tmp_path, classes=5, per_class=4, layout="pickle")
    assert MiniImageNet(root=str(tmp_path)).load_split("train").num_classes == 5


def test_smaller_image_size_resizes_the_pickled_images(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4)
    dm = MiniImageNet(root=str(root), image_size=32, ways=3, shots=2, queries=2, tasks_per_batch=2)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch.support_x.shape == (2, 6, 3, 32, 32) and batch.query_x.shape == (2, 6, 3, 32, 32)
    assert (root / "miniimagenet_test_32px.pt").exists()


def test_missing_files_describe_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        MiniImageNet(root=str(tmp_path)).prepare_data()
    message = str(err.value)
    assert "mini-ImageNet 'train' split not found in" in message
    for expected in ("mini-imagenet-cache-train.pkl", "'image_data'", "'class_dict'", "train.csv", "images/"):
        assert expected in message
    assert "not downloaded" in message and "root=" in message


def test_missing_listed_image_is_named(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4, layout="csv")
    (root / "images" / "n0000000200000003.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 images listed in .*train.csv are missing, e.g. .*n0000000200000003"
    ):
        MiniImageNet(root=str(root)).load_split("train")


def test_corrupt_pickle_names_the_file(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4)
    path = root / "mini-imagenet-cache-test.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-test.pkl is not a readable pickle .* truncated"):
        MiniImageNet(root=str(root)).load_split("test")


def test_pickle_with_other_keys_is_rejected(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4)
    with (root / "mini-imagenet-cache-train.pkl").open("wb") as f:
        pickle.dump({"data": np.zeros((2, 84, 84, 3), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(
        ValueError, match=r"must hold a dict with 'image_data' and 'class_dict', got \['data', 'labels'\]"
    ):
        MiniImageNet(root=str(root)).load_split("train")
    with (root / "mini-imagenet-cache-train.pkl").open("wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {"n1": [0, 1]}}, f)
    with pytest.raises(ValueError, match=r"'image_data' must be uint8 RGB images \[N, H, W, 3\]"):
        MiniImageNet(root=str(root)).load_split("train")
    with (root / "mini-imagenet-cache-train.pkl").open("wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n1": [0, 2]}}, f)
    with pytest.raises(ValueError, match=r"row indices outside 0..1"):
        MiniImageNet(root=str(root)).load_split("train")


def test_corrupt_jpeg_names_the_file(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4, layout="csv")
    (root / "images" / "n0100000100000002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode image '.*images/n0100000100000002.jpg'"):
        MiniImageNet(root=str(root)).load_split("val")


def test_csv_without_the_header_is_rejected(tmp_path):
    root = write_miniimagenet(tmp_path, classes=3, per_class=4, layout="csv")
    rows = list(csv.reader((root / "test.csv").open()))
    with (root / "test.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows[1:])
    with pytest.raises(ValueError, match=r"test.csv must start with the header 'filename,label'"):
        MiniImageNet(root=str(root)).load_split("test")


def test_too_few_images_for_shots_and_queries(tmp_path):
    root = write_miniimagenet(tmp_path, classes=5, per_class=6)
    dm = MiniImageNet(root=str(root), shots=5, queries=15)
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 15 = 20 but class 'n01000000' .* has only 6"):
        dm.setup("validate")
