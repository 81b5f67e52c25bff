import pickle

import numpy as np
import pytest
import torch
from fake_data import fake_image, write_tieredimagenet

from datamodules import TieredImageNet
from datamodules.tieredimagenet import png_bytes

pytestmark = pytest.mark.filterwarnings("ignore:the '.*' split of tiered-ImageNet")


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


def test_png_pickles_load_class_by_class_in_rgb(tmp_path):
    root = write_tieredimagenet(tmp_path, classes=4, per_class=5)
    dm = TieredImageNet(root=str(root))
    with pytest.warns(UserWarning, match=r"'val' split of tiered-ImageNet .* has 4 classes, the official one has 97"):
        val = dm.load_split("val")
    assert val.names == ["n01000000", "n01000001", "n01000002", "n01000003"]  # from 'label_specific_str'
    assert val.counts.tolist() == [5] * 4
    assert val.images.shape == (20, 3, 84, 84) and val.images.dtype == torch.uint8
    # The files list the images in shuffled order; the loader groups them by 'label_specific', stably.
    assert torch.equal(val.images[3 * 5 + 4], chw(fake_image(1, 3, 4)))
    assert (root / "tieredimagenet_val_84px.pt").exists()


def test_npz_variant_gives_the_same_rgb_images(tmp_path):
    png = TieredImageNet(root=str(write_tieredimagenet(tmp_path / "png", classes=3, per_class=4)))
    npz_root = write_tieredimagenet(tmp_path / "npz", classes=3, per_class=4, variant="npz")
    assert not list(npz_root.glob("*_png.pkl"))
    npz = TieredImageNet(root=str(npz_root))
    for split in ("train", "val", "test"):
        a, b = png.load_split(split), npz.load_split(split)
        assert torch.equal(a.images, b.images) and a.names == b.names and torch.equal(a.offsets, b.offsets)
    # An npz written from RGB arrays: say so, or red and blue swap.
    swapped = TieredImageNet(root=str(npz_root), npz_channel_order="rgb", cache_dir=str(tmp_path / "c"))
    assert torch.equal(swapped.load_split("test").images, png.load_split("test").images.flip(1))


def test_files_in_the_tiered_imagenet_subfolder_are_found(tmp_path):
    write_tieredimagenet(tmp_path / "tiered-imagenet", classes=3, per_class=4)
    dm = TieredImageNet(root=str(tmp_path), ways=3, shots=1, queries=3, tasks_per_batch=2)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch.support_x.shape == (2, 3, 3, 84, 84) and batch.query_x.shape == (2, 9, 3, 84, 84)


def test_labels_without_names_use_the_indices(tmp_path):
    root = write_tieredimagenet(tmp_path, classes=3, per_class=4)
    with (root / "test_labels.pkl").open("rb") as f:
        labels = pickle.load(f)
    with (root / "test_labels.pkl").open("wb") as f:
        pickle.dump({"label_specific": labels["label_specific"]}, f)
    assert TieredImageNet(root=str(root)).load_split("test").names == ["0", "1", "2"]


def test_missing_files_describe_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        TieredImageNet(root=str(tmp_path)).prepare_data()
    message = str(err.value)
    for expected in ("'train' split not found", "train_labels.pkl", "'label_specific'", "train_images_png.pkl"):
        assert expected in message
    assert "train_images.npz" in message and "tiered-imagenet" in message and "not downloaded" in message


def test_labels_alone_are_not_enough(tmp_path):
    root = write_tieredimagenet(tmp_path, classes=3, per_class=4)
    (root / "val_images_png.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="'val' split not found"):
        TieredImageNet(root=str(root)).load_split("val")


def test_corrupt_png_names_the_file_and_the_entry(tmp_path):
    root = write_tieredimagenet(tmp_path, classes=3, per_class=4)
    with (root / "train_images_png.pkl").open("rb") as f:
        pngs = pickle.load(f)
    pngs[7] = np.frombuffer(b"\x89PNG\r\n\x1a\n broken", dtype=np.uint8)
    with (root / "train_images_png.pkl").open("wb") as f:
        pickle.dump(pngs, f)
    with pytest.raises(ValueError, match=r"cannot decode image '.*train_images_png.pkl\[7\]'"):
        TieredImageNet(root=str(root)).load_split("train")


def test_truncated_pickle_and_npz_name_the_file(tmp_path):
    root = write_tieredimagenet(tmp_path / "png", classes=3, per_class=4)
    path = root / "test_labels.pkl"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"test_labels.pkl is not a readable pickle"):
        TieredImageNet(root=str(root)).load_split("test")
    root = write_tieredimagenet(tmp_path / "npz", classes=3, per_class=4, variant="npz")
    path = root / "test_images.npz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"test_images.npz is not a readable npz file"):
        TieredImageNet(root=str(root)).load_split("test")


def test_image_and_label_counts_must_agree(tmp_path):
    root = write_tieredimagenet(tmp_path, classes=3, per_class=4, variant="npz")
    np.savez(root / "val_images.npz", images=np.zeros((5, 84, 84, 3), np.uint8))
    with pytest.raises(ValueError, match=r"val_images.npz has 5 images but the labels file has 12 labels"):
        TieredImageNet(root=str(root)).load_split("val")
    np.savez(root / "val_images.npz", data=np.zeros((12, 84, 84, 3), np.uint8))
    with pytest.raises(ValueError, match=r"val_images.npz has no array 'images'"):
        TieredImageNet(root=str(root)).load_split("val")


def test_png_bytes_accepts_the_pickled_forms():
    data = b"\x89PNG"
    assert png_bytes(np.frombuffer(data, np.uint8).reshape(-1, 1), "x") == data  # cv2.imencode's [N, 1] array
    assert png_bytes(data, "x") == data
    assert png_bytes(data.decode("latin1"), "x") == data  # a Python 2 str read with encoding="latin1"
    with pytest.raises(ValueError, match=r"f\[3\] is a int, expected PNG bytes"):
        png_bytes(3, "f[3]")


def test_channel_order_is_validated():
    with pytest.raises(ValueError, match=r"npz_channel_order='BGR' must be 'bgr' or 'rgb'"):
        TieredImageNet(npz_channel_order="BGR")  # type: ignore[arg-type]
