"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100.

Both read the official ``cifar-100-python.tar.gz`` (or its extracted ``cifar-100-python/``
folder), pool the 500 training and 100 test images of every class, and split by class with the
published lists in ``datamodules/splits/{cifarfs,fc100}.json``.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import torch

from .augment import random_crop_flip
from .base import PositiveInt
from .download import Remote, download
from .episodes import ClassImages
from .images import (
    ARCHIVE_ERRORS,
    CachedImageBundle,
    UnsafePickleError,
    damaged_archive,
    group_by_label,
    load_pickle,
    resize_images,
    warn_class_counts,
)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
# MD5 of the official archive (the value torchvision's CIFAR100 checks).
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBERS = ("train", "test", "meta")
LAYOUT = f"{ARCHIVE}, or the extracted folder {FOLDER}/ with the files train, test and meta"


@dataclass
class CIFAR100:
    """All 60000 CIFAR-100 images (train and test pooled) with their labels.

    Attributes:
        images: ``[N, 3, 32, 32]`` uint8.
        fine: ``[N]`` fine label of each image (index into ``fine_names``).
        coarse: ``[N]`` coarse label (superclass) of each image (index into ``coarse_names``).
        fine_names: the 100 class names.
        coarse_names: the 20 superclass names.
    """

    images: torch.Tensor
    fine: np.ndarray
    coarse: np.ndarray
    fine_names: list[str]
    coarse_names: list[str]


def _text(value: Any) -> str:
    # The official pickles come from Python 2: loaded with encoding="bytes", names are bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _unpickle(stream: IO[bytes], source: str) -> dict[str, Any]:
    try:
        content = load_pickle(stream, encoding="bytes")
    except UnsafePickleError as err:
        raise ValueError(f"{source} was not loaded: {err}; use the official {ARCHIVE}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, zlib.error, OSError) as err:
        raise ValueError(
            f"cannot read {source} ({err}); the file is corrupt: delete it and download it again "
            f"(download=True), or use the official {ARCHIVE}"
        ) from err
    if not isinstance(content, dict):
        raise ValueError(f"{source} is not a CIFAR-100 pickle (a dict); use the official {ARCHIVE}")
    return {_text(key): value for key, value in content.items()}


def _field(content: dict[str, Any], key: str, source: str) -> Any:
    if key not in content:
        raise ValueError(f"{source} has no '{key}' entry (it has {sorted(content)}); use the official {ARCHIVE}")
    return content[key]


def _read_members(path: Path) -> dict[str, bytes]:
    """The bytes of the members ``train``, ``test`` and ``meta`` of the archive ``path``, read in one pass.

    ValueError naming the archive when it is no tar.gz or lacks a member, and naming the member
    whose data (or the header after it) is damaged.
    """
    wanted = {f"{FOLDER}/{member}": member for member in MEMBERS}
    found: dict[str, bytes] = {}
    current = None  # the member being read: a bad CRC or deflate error lies in its data or the next header
    try:
        with tarfile.open(path, "r|gz") as archive:
            for info in archive:
                current = info.name
                if info.name in wanted:
                    stream = archive.extractfile(info)
                    if stream is not None:
                        found[wanted[info.name]] = stream.read()
    except ARCHIVE_ERRORS as err:
        if current is None:
            raise ValueError(
                f"{path} is not a valid tar.gz archive ({err}); delete it and re-run with download=True"
            ) from err
        raise damaged_archive(path, current, err) from err
    missing = [f"{FOLDER}/{member}" for member in MEMBERS if member not in found]
    if missing and current is not None:
        # tarfile takes a garbled header for the end of the archive; the gzip checksum tells damage apart.
        try:
            with gzip.open(path) as whole:
                while whole.read(1 << 20):
                    pass
        except ARCHIVE_ERRORS as err:
            raise damaged_archive(path, current, err) from err
    if missing:
        raise ValueError(f"{path} has no {', '.join(map(repr, missing))}; expected the official {LAYOUT}")
    return found


def read_cifar100(path: Path) -> CIFAR100:
    """Read the official archive ``path`` (``.tar.gz``) or extracted folder (``cifar-100-python/``).

    Raises ValueError naming the file when it is not a valid archive, lacks a member, or its
    pickles do not have the official keys and shapes.
    """
    raw: dict[str, dict[str, Any]] = {}
    if path.is_dir():
        for member in MEMBERS:
            with open(path / member, "rb") as file:
                raw[member] = _unpickle(file, str(path / member))
    else:
        for member, data in _read_members(path).items():
            raw[member] = _unpickle(io.BytesIO(data), f"{path}:{FOLDER}/{member}")
    fine_names = [_text(n) for n in _field(raw["meta"], "fine_label_names", "meta")]
    coarse_names = [_text(n) for n in _field(raw["meta"], "coarse_label_names", "meta")]
    images, fine, coarse = [], [], []
    for member in ("train", "test"):
        content = raw[member]
        data = _field(content, "data", member)
        labels = np.asarray(_field(content, "fine_labels", member), dtype=np.int64)
        supers = np.asarray(_field(content, "coarse_labels", member), dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(
                f"{path}: '{member}' data must be uint8 rows of 3072 pixels (3 x 32 x 32), got "
                f"{getattr(data, 'dtype', type(data).__name__)} of shape {getattr(data, 'shape', None)}; "
                f"use the official {ARCHIVE}"
            )
        if not len(data) == len(labels) == len(supers):
            raise ValueError(f"{path}: '{member}' has {len(data)} images but {len(labels)} fine labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(fine_names) or supers.max() >= len(coarse_names)):
            raise ValueError(f"{path}: '{member}' has labels outside the names in 'meta'; use the official {ARCHIVE}")
        images.append(torch.from_numpy(data).view(-1, 3, 32, 32))
        fine.append(labels)
        coarse.append(supers)
    return CIFAR100(torch.cat(images), np.concatenate(fine), np.concatenate(coarse), fine_names, coarse_names)


def load_split_lists(name: str) -> dict[str, list[str]]:
    """The published class (CIFAR-FS) or superclass (FC100) names of each split, from the package data."""
    text = resources.files("datamodules").joinpath(f"splits/{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


class CIFAR100Bundle(CachedImageBundle):
    """Shared base of :class:`CIFARFS` and :class:`FC100`: reading, download, class selection.

    A subclass sets :attr:`cache_name` (its split list in ``datamodules/splits/<cache_name>.json``
    and its cache file names), :attr:`num_classes` (the published class counts) and :meth:`split_classes`.

    Args:
        root: folder holding ``cifar-100-python.tar.gz`` or its extracted ``cifar-100-python/``
            (downloaded there when ``download``).
        download: fetch the archive from www.cs.toronto.edu when missing and check its MD5.
        image_size: side of the images (32 is CIFAR's own; others are resized).
        augment: random crop (4 px padding) and horizontal flip of training images, on the device.
        cache_dir: where the uint8 tensors are cached; default ``root``, or
            ``~/.cache/lightning_meta/<cifarfs or fc100>`` when ``root`` is read-only.
        **kwargs: the episode settings of :class:`EpisodicDataModule`.
    """

    #: Classes per split in the published split (a warning says when the files give another count).
    num_classes: ClassVar[dict[str, int]] = {}

    def __init__(
        self,
        root: str = "data/cifar100",
        download: bool = False,
        image_size: PositiveInt = 32,
        augment: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, cache_dir=cache_dir, **kwargs)
        self.download = download
        self._cifar100: CIFAR100 | None = None

    # ------------------------------------------------------------------ files
    def _found(self) -> list[Path] | None:
        folder = self.root / FOLDER
        if all((folder / member).is_file() for member in MEMBERS):
            return [folder / member for member in MEMBERS]  # the extracted files read faster than the archive
        if (self.root / ARCHIVE).is_file():
            return [self.root / ARCHIVE]
        return None

    def source_files(self, split: str) -> list[Path]:
        """The official archive, or the extracted files; downloaded first when missing and ``download``."""
        files = self._found()
        if files is None and self.download:
            download([Remote(URL, ARCHIVE, MD5)], self.root, "CIFAR-100")
            files = self._found()
        if files is None:
            raise FileNotFoundError(
                f"CIFAR-100 not found in {self.root}: expected {LAYOUT}. Set root= to the folder holding "
                f"them, or pass download=True to fetch {URL}"
            )
        return files

    def cifar100(self) -> CIFAR100:
        """All of CIFAR-100, read once per instance (the splits are cut from it)."""
        if self._cifar100 is None:
            files = self.source_files("train")
            self._cifar100 = read_cifar100(files[0] if len(files) == 1 else files[0].parent)
        return self._cifar100

    # ------------------------------------------------------------------ splits
    def split_classes(self, split: str, data: CIFAR100) -> list[int]:
        """The fine labels of the classes of ``split``."""
        raise NotImplementedError

    def read_split(self, split: str) -> ClassImages:
        data = self.cifar100()
        classes = self.split_classes(split, data)
        chosen = np.isin(data.fine, classes)
        _, order, offsets = group_by_label(data.fine[chosen])
        if len(offsets) - 1 != len(classes):
            empty = sorted(set(classes) - set(np.unique(data.fine[chosen]).tolist()))
            names = [data.fine_names[c] for c in empty]
            raise ValueError(
                f"{self.root}: classes {names} of the '{split}' split have no images; use the official files"
            )
        indices = torch.from_numpy(np.flatnonzero(chosen)[order])
        images = resize_images(data.images[indices], self.image_size).contiguous()
        split_data = ClassImages(images, offsets, [data.fine_names[c] for c in sorted(classes)])
        warn_class_counts(split_data, split, self.num_classes, type(self).__name__, self.root)
        return split_data

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        """Random crop after 4 px padding and horizontal flip of training images when ``augment``.

        4 px is the standard CIFAR padding (He et al. 2016), used by the CIFAR-FS and FC100 few-shot
        literature (e.g. Lee et al. 2019, MetaOptNet).
        """
        return random_crop_flip(images, padding=4) if self.augment else images


def _indices(names: list[str], wanted: list[str], what: str, source: str) -> list[int]:
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ValueError(f"{source}: the {what} {missing} are not in CIFAR-100's 'meta'; use the official files")
    return [names.index(n) for n in wanted]


class CIFARFS(CIFAR100Bundle):
    """CIFAR-FS episodes (Bertinetto et al. 2019): CIFAR-100 split by class into 64 / 16 / 20 classes.

    The split lists are Bertinetto et al.'s ``cifar100/splits/bertinetto/{train,val,test}.txt``.
    Every class has all of its 600 images (CIFAR-100's train and test images pooled), 32x32 RGB.
    The uint8 tensors are cached as ``cifarfs_<split>_<S>px.pt``.

    Args: those of :class:`CIFAR100Bundle`.
    """

    cache_name = "cifarfs"
    num_classes = {"train": 64, "val": 16, "test": 20}

    def split_classes(self, split: str, data: CIFAR100) -> list[int]:
        return _indices(data.fine_names, load_split_lists(self.cache_name)[split], "classes", str(self.root))


class FC100(CIFAR100Bundle):
    """FC100 episodes (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60 / 20 / 20 classes.

    The 20 superclasses are split 12 / 4 / 4 as in the paper's supplementary material, so no
    superclass is shared between training and evaluation. Every class has all of its 600 images
    (CIFAR-100's train and test images pooled), 32x32 RGB. The uint8 tensors are cached as
    ``fc100_<split>_<S>px.pt``.

    Args: those of :class:`CIFAR100Bundle`.
    """

    cache_name = "fc100"
    num_classes = {"train": 60, "val": 20, "test": 20}

    def split_classes(self, split: str, data: CIFAR100) -> list[int]:
        supers = set(
            _indices(data.coarse_names, load_split_lists(self.cache_name)[split], "superclasses", str(self.root))
        )
        return np.unique(data.fine[np.isin(data.coarse, sorted(supers))]).tolist()


__all__ = ["CIFAR100", "CIFARFS", "FC100", "CIFAR100Bundle", "read_cifar100", "load_split_lists"]
