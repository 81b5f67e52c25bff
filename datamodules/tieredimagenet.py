"""tiered-ImageNet (Ren et al. 2018) in the files of the authors' release."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .base import PositiveInt
from .episodes import ClassImages
from .images import (
    CachedImageBundle,
    check_hwc,
    decode_image,
    gather_hwc,
    group_by_label,
    progress,
    read_pickle,
    warn_class_counts,
)

NUM_CLASSES = {"train": 351, "val": 97, "test": 160}
LABELS = "{}_labels.pkl"
PNG_PICKLE = "{}_images_png.pkl"
NPZ = "{}_images.npz"
#: The release tar unpacks into this folder; ``root`` may be it or its parent.
SUBFOLDER = "tiered-imagenet"

LAYOUT = """put these files in {root} or {root}/tiered-imagenet (or set root= to the folder that has them):
  {split}_labels.pkl: a dict with 'label_specific' (the class of each image, 0..C-1 within the split;
      'label_general' and 'label_specific_str', the class names, come with it), and one of
  {split}_images_png.pkl: a list of PNG-encoded images (Ren et al.'s release), or
  {split}_images.npz: key 'images', uint8 [N, 84, 84, 3] (what their code decompresses the PNGs into).
tiered-ImageNet comes from ImageNet and needs a login, so it is not downloaded here."""


def png_bytes(item: Any, where: str) -> bytes:
    """The bytes of one PNG of the release: a numpy uint8 array (from ``cv2.imencode``) or a byte string."""
    if isinstance(item, np.ndarray):
        return item.tobytes()
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):  # a Python 2 byte string read with encoding="latin1"
        return item.encode("latin1")
    raise ValueError(f"{where} is a {type(item).__name__}, expected PNG bytes; use the original file")


class TieredImageNet(CachedImageBundle):
    """tiered-ImageNet episodes: 608 ImageNet classes under 34 high-level categories, 84x84 RGB (Ren et al. 2018).

    Classes are split by category so that test classes differ more from training ones than in
    mini-ImageNet: 351 train (20 categories), 97 val (6) and 160 test (8) classes, with 448695,
    124261 and 206209 images (about 1300 per class). Reads the authors' files from ``root``:
    ``{split}_labels.pkl`` with ``{split}_images_png.pkl`` or the decompressed ``{split}_images.npz``
    (used when both are there), and caches each split as a uint8 tensor
    (``tieredimagenet_<split>_<S>px.pt``; the training one is 9.5 GB at 84 px, memory-mapped on
    load). Decoding the 779165 PNGs takes several minutes, once. Pickles can run code when loaded: only use
    files from a source you trust.

    Args:
        root: folder holding the files (or its parent, with the files in ``tiered-imagenet/``).
        image_size: side of the square images (84 in the files).
        npz_channel_order: channel order of ``{split}_images.npz``. "bgr" for files made by the
            authors' ``decompress`` (OpenCV decodes to BGR); "rgb" for files written from RGB arrays.
            The PNG pickles always decode to RGB.
        augment: random crop and horizontal flip of training images (see :class:`CachedImageBundle`).
        cache_dir: where the uint8 tensors are cached; default ``root``, or
            ``~/.cache/lightning_meta/tieredimagenet`` when ``root`` is read-only.
        **kwargs: the episode settings of :class:`EpisodicDataModule`.
    """

    cache_name = "tieredimagenet"

    def __init__(
        self,
        root: str = "data/tieredimagenet",
        image_size: PositiveInt = 84,
        npz_channel_order: Literal["bgr", "rgb"] = "bgr",
        augment: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, cache_dir=cache_dir, **kwargs)
        if npz_channel_order not in ("bgr", "rgb"):
            raise ValueError(f"npz_channel_order={npz_channel_order!r} must be 'bgr' or 'rgb'")
        self.npz_channel_order = npz_channel_order

    # ------------------------------------------------------------------ files
    def _files(self, split: str) -> tuple[Path, Path] | None:
        """``(labels, images)`` of ``split``, preferring the npz, in ``root`` or ``root/tiered-imagenet``."""
        for folder in (self.root, self.root / SUBFOLDER):
            labels = folder / LABELS.format(split)
            for images in (folder / NPZ.format(split), folder / PNG_PICKLE.format(split)):
                if labels.is_file() and images.is_file():
                    return labels, images
        return None

    def source_files(self, split: str) -> list[Path]:
        files = self._files(split)
        if files is None:
            raise FileNotFoundError(
                f"tiered-ImageNet '{split}' split not found in {self.root}; "
                + LAYOUT.format(root=self.root, split=split)
            )
        return list(files)

    def cache_params(self) -> list[Any]:
        return [self.npz_channel_order]

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> ClassImages:
        labels_path, images_path = self.source_files(split)
        content = read_pickle(labels_path)
        if not isinstance(content, dict) or "label_specific" not in content:
            keys = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{labels_path} must hold a dict with 'label_specific', got {keys}")
        labels = np.asarray(content["label_specific"]).reshape(-1)
        if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(f"{labels_path}: 'label_specific' must be non-negative integer class indices")
        classes, order, offsets = group_by_label(labels)
        strings = content.get("label_specific_str")
        names = [str(strings[c]) if strings is not None and c < len(strings) else str(c) for c in classes.tolist()]
        if images_path.suffix == ".npz":
            images = gather_hwc(
                self._read_npz(images_path, len(labels)), order, self.image_size, bgr=self.npz_channel_order == "bgr"
            )
        else:
            pngs = read_pickle(images_path)
            if not isinstance(pngs, (list, tuple, np.ndarray)) or len(pngs) != len(labels):
                count = len(pngs) if hasattr(pngs, "__len__") else type(pngs).__name__
                raise ValueError(
                    f"{images_path} must hold a list of {len(labels)} PNG images (one per label in "
                    f"{labels_path.name}), got {count}"
                )
            # One PNG at a time: a list of all the bytes would double the memory of the 448695 training PNGs.
            images = torch.empty(len(order), 3, self.image_size, self.image_size, dtype=torch.uint8)
            for k, i in progress(enumerate(order.tolist()), len(order), f"decoding {images_path.name}"):
                where = f"{images_path}[{i}]"
                images[k] = decode_image(png_bytes(pngs[i], where), self.image_size, "RGB", where)
        data = ClassImages(images, offsets, names)
        warn_class_counts(data, split, NUM_CLASSES, "tiered-ImageNet", images_path)
        return data

    @staticmethod
    def _read_npz(path: Path, count: int) -> np.ndarray:
        try:
            with np.load(path) as archive:
                images = archive["images"]
        except KeyError as err:
            raise ValueError(f"{path} has no array 'images'; use the file the authors' code writes") from err
        except Exception as err:
            raise ValueError(f"{path} is not a readable npz file ({err}); the file is corrupt: make it again") from err
        images = check_hwc(images, path, "images")
        if len(images) != count:
            raise ValueError(f"{path} has {len(images)} images but the labels file has {count} labels")
        return images
