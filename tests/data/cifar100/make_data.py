"""Generate a tiny fake CIFAR-100 in the official archive layout (run from this folder).

``cifar-100-python.tar.gz`` holds ``cifar-100-python/{train,test,meta}``: Python 2 style pickles
(keys and label names are byte strings, as in the official files, so they load as ``b'data'``
with ``encoding='bytes'`` and as ``'data'`` with ``encoding='latin1'``). The 100 fine and 20
coarse label names and their grouping are the real ones, so the CIFAR-FS and FC100 split lists
apply. Each class has ``TRAIN_PER_CLASS`` images in ``train`` and ``TEST_PER_CLASS`` in ``test``
(the official files: 500 and 100), shuffled; each image is a distinct smooth pattern.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

# CIFAR-100's 20 superclasses and their 5 classes (Krizhevsky 2009), in the official label order.
SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
FINE = sorted(c for classes in SUPERCLASSES.values() for c in classes)  # the official order is alphabetical
COARSE = sorted(SUPERCLASSES)
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 2


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``bytes`` as Python 2 ``str`` opcodes, like the cPickle that wrote the official files."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def dumps(obj: object) -> bytes:
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def image(fine: int, index: int) -> np.ndarray:
    """A distinct, smooth (so compressible) 32x32 RGB pattern, flattened R, G, B like the official rows."""
    y, x = np.mgrid[0:32, 0:32]
    channels = [
        (fine * 37 + index * 53 + c * 80 + (x // 4 * (1 + index % 3) + y // 4 * (1 + fine % 4)) * 9) % 256
        for c in range(3)
    ]
    return np.stack(channels).astype(np.uint8).reshape(3072)


def batch(part: str, per_class: int, offset: int, seed: int) -> bytes:
    labels = [f for f in range(len(FINE)) for _ in range(per_class)]
    order = np.random.default_rng(seed).permutation(len(labels))
    fine = [labels[i] for i in order]
    index = [offset + int(i) % per_class for i in order]
    coarse_of = {FINE.index(c): COARSE.index(s) for s, classes in SUPERCLASSES.items() for c in classes}
    return dumps(
        {
            b"filenames": [f"{FINE[f]}_s_{i:06d}.png".encode() for f, i in zip(fine, index, strict=True)],
            b"batch_label": f"{part} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [coarse_of[f] for f in fine],
            b"data": np.stack([image(f, i) for f, i in zip(fine, index, strict=True)]),
        }
    )


def make(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "train": batch("training", TRAIN_PER_CLASS, 0, 0),
        "test": batch("testing", TEST_PER_CLASS, TRAIN_PER_CLASS, 1),
        "meta": dumps(
            {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
        ),
    }
    path = root / "cifar-100-python.tar.gz"
    # A fixed gzip timestamp makes the archive reproducible byte for byte.
    with gzip.GzipFile(path, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size, info.mtime = len(content), 1_230_000_000
            archive.addfile(info, io.BytesIO(content))
    return path


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
