"""Registry of tiny fake datasets for the config tests, one entry per datamodule class name.

Each entry takes a writable folder and returns the extra command-line arguments (``--data.root``
and similar) that point the config's datamodule at a tiny dataset written there in the real
on-disk layout. A new bundle adds one function here with ``@fake_data("ClassName")``; every
config that uses the bundle is then run by ``tests/test_cli.py``.

The fake data must be big enough for the bundle's configs after ``small_args`` shrinks them:
configs are run with ``--data.tasks_per_batch 2`` and whatever the entry returns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FAKE_DATA: dict[str, Callable[[Path], list[str]]] = {}


def fake_data(name: str) -> Callable[[Callable[[Path], list[str]]], Callable[[Path], list[str]]]:
    """Register a function that writes fake data for datamodule ``name`` and returns CLI arguments."""

    def register(make: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        FAKE_DATA[name] = make
        return make

    return register


# Bundles add their entries below this line.


# ----------------------------------------------------------------------------- image bundles
# Tiny datasets in the real on-disk formats of mini-ImageNet, tiered-ImageNet, CUB and image
# folders. Image (split s, class c, item i) is a fixed function of (s, c, i), so the tests can check
# exactly where each one lands; lossless formats reproduce it bit for bit.
def fake_image(split: int, label: int, item: int, height: int = 84, width: int = 84):
    """A ``[H, W, 3]`` uint8 RGB image: class colour plus an item-specific stripe, with per-pixel noise."""
    import numpy as np

    rng = np.random.default_rng([split, label, item])
    image = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    image += np.array([40 + 50 * (label % 4), 40 + 30 * (label // 4 % 7), 40 + 60 * split], dtype=np.uint8)
    image[item % height, :, :] = 255
    return image


def write_miniimagenet(root: Path, classes: int = 5, per_class: int = 20, layout: str = "pickle") -> Path:
    """mini-ImageNet as the pickled caches (``layout="pickle"``) or as CSV files plus ``images/`` ("csv")."""
    import csv
    import pickle

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(("train", "val", "test")):
        wnids = [f"n0{s}{c:06d}" for c in range(classes)]
        if layout == "pickle":
            # Rows interleave the classes, so the loader must follow class_dict rather than assume blocks.
            order = [(c, i) for i in range(per_class) for c in range(classes)]
            data = np.stack([fake_image(s, c, i) for c, i in order])
            class_dict = {w: [r for r, (c, _) in enumerate(order) if c == k] for k, w in enumerate(wnids)}
            with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            (root / "images").mkdir(exist_ok=True)
            with (root / f"{split}.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["filename", "label"])
                for c, wnid in enumerate(wnids):
                    for i in range(per_class):
                        name = f"{wnid}{i + 1:08d}.jpg"  # as in Ravi & Larochelle's files
                        Image.fromarray(fake_image(s, c, i, 100, 120)).save(root / "images" / name, quality=95)
                        writer.writerow([name, wnid])
    return root


def write_tieredimagenet(root: Path, classes: int = 5, per_class: int = 20, variant: str = "png") -> Path:
    """tiered-ImageNet as the authors release it: ``{split}_labels.pkl`` plus ``{split}_images_png.pkl``
    (``variant="png"``: PNG byte arrays as ``cv2.imencode`` returns them) or ``{split}_images.npz`` ("npz":
    key ``images``, BGR as their ``decompress`` writes)."""
    import io
    import pickle

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(("train", "val", "test")):
        # Shuffled order: the loader must group by 'label_specific'.
        pairs = [(c, i) for c in range(classes) for i in range(per_class)]
        order = np.random.default_rng(s).permutation(len(pairs))
        pairs = [pairs[k] for k in order]
        labels = {
            "label_specific": np.array([c for c, _ in pairs], dtype=np.int64),
            "label_general": np.array([c // 2 for c, _ in pairs], dtype=np.int64),
            "label_specific_str": [f"n0{s}{c:06d}" for c in range(classes)],
            "label_general_str": [f"n1{s}{g:06d}" for g in range((classes + 1) // 2)],
        }
        with (root / f"{split}_labels.pkl").open("wb") as f:
            pickle.dump(labels, f, protocol=2)
        images = [fake_image(s, c, i) for c, i in pairs]
        if variant == "png":
            encoded = []
            for image in images:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(-1, 1))
            with (root / f"{split}_images_png.pkl").open("wb") as f:
                pickle.dump(encoded, f, protocol=2)
        else:
            np.savez(root / f"{split}_images.npz", images=np.stack(images)[..., ::-1])
    return root


def write_cub(root: Path, classes: int = 12, per_class: int = 20) -> Path:
    """CUB-200-2011 in the official layout ``CUB_200_2011/images/<NNN.Class_Name>/<Class_Name_NNNN_ID>.jpg``.

    With 12 classes, Chen et al.'s rule gives 6 train, 3 val and 3 test classes.
    """
    from PIL import Image

    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True, exist_ok=True)
    lines, names = [], []
    for c in range(classes):
        species = f"Fake_Bird_{chr(65 + c)}"
        folder = f"{c + 1:03d}.{species}"
        names.append(f"{c + 1} {folder}")
        (base / "images" / folder).mkdir(exist_ok=True)
        for i in range(per_class):
            name = f"{folder}/{species}_{i + 1:04d}_{1000 + 37 * c + i}.jpg"
            Image.fromarray(fake_image(0, c, i, 60, 80)).save(base / "images" / name, quality=95)
            lines.append(f"{len(lines) + 1} {name}")
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def write_imagefolder(root: Path, classes: int = 5, per_class: int = 20, size: int = 32) -> Path:
    """``root/<split>/<class>/<image>.png`` with ``classes`` classes per split."""
    from PIL import Image

    for s, split in enumerate(("train", "val", "test")):
        for c in range(classes):
            folder = root / split / f"{split}_class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(fake_image(s, c, i, size, size)).save(folder / f"{i:03d}.png")
    return root


# Configs train 20- and 30-way (Snell et al.); five classes per split keep the fake data small. MAML at
# 84 px is slow on a CPU: two queries per class keep its mini-ImageNet configs' fast_dev_run short.
@fake_data("MiniImageNet")
def fake_miniimagenet(folder: Path) -> list[str]:
    root = write_miniimagenet(folder / "miniimagenet")
    # train_queries too: a config may train on 15 shots (MetaOptNet's ResNet-12 ProtoNet), with 20 images a class.
    return ["--data.root", str(root), "--data.train_ways", "5", "--data.queries", "2", "--data.train_queries", "2"]


@fake_data("TieredImageNet")
def fake_tieredimagenet(folder: Path) -> list[str]:
    return ["--data.root", str(write_tieredimagenet(folder / "tieredimagenet")), "--data.train_ways", "5"]


@fake_data("CUB")
def fake_cub(folder: Path) -> list[str]:
    return ["--data.root", str(write_cub(folder / "cub", classes=20, per_class=22)), "--data.train_ways", "5"]


@fake_data("EpisodicImageFolder")
def fake_imagefolder(folder: Path) -> list[str]:
    return ["--data.root", str(write_imagefolder(folder / "images", size=84)), "--data.train_ways", "5"]


# ----------------------------------------------------------------------------- CIFAR-FS and FC100
# The committed archive of tests/data/cifar100 (real names and format, 10 images per class, see its
# make_data.py); the configs' 15 queries are cut to 4 so 5 shots + 4 queries fit.
def copy_fake_cifar100(folder: Path) -> Path:
    """A writable copy of the tiny generated ``cifar-100-python.tar.gz`` in ``folder/cifar100``."""
    import shutil

    root = folder / "cifar100"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "data" / "cifar100" / "cifar-100-python.tar.gz", root)
    return root


@fake_data("CIFARFS")
@fake_data("FC100")
def fake_cifar100(folder: Path) -> list[str]:
    # Reptile's configs train on 15 shots per class: 5 here, so that shots and queries fit in 10 images.
    args = ["--data.queries", "4", "--data.train_queries", "4", "--data.train_shots", "5"]
    return ["--data.root", str(copy_fake_cifar100(folder)), *args]


# ----------------------------------------------------------------------------- learn2learn task sets
@fake_data("Learn2LearnTasks")
def fake_learn2learn_miniimagenet(folder: Path) -> list[str]:
    """learn2learn's mini-ImageNet benchmark reads the same pickles, with ``-validation`` for the val split."""
    import shutil

    import pytest

    pytest.importorskip("learn2learn")
    root = write_miniimagenet(folder / "l2l_miniimagenet")
    shutil.copy(root / "mini-imagenet-cache-val.pkl", root / "mini-imagenet-cache-validation.pkl")
    # train_queries too: a config may train on 15 shots (MetaOptNet's ResNet-12 ProtoNet), with 20 images a class.
    return ["--data.root", str(root), "--data.train_ways", "5", "--data.queries", "2", "--data.train_queries", "2"]
