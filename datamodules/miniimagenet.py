"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle 2017 split."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .base import PositiveInt
from .episodes import ClassImages
from .images import (
    CachedImageBundle,
    check_hwc,
    class_offsets,
    decode_images,
    gather_hwc,
    read_pickle,
    warn_class_counts,
)

NUM_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600
PICKLE = "mini-imagenet-cache-{}.pkl"
# learn2learn's copies name the validation pickle "validation".
PICKLE_ALIASES = {"val": ("val", "validation")}

LAYOUT = """put one of these two layouts in {root} (or set root= to the folder that has it):
  (a) pickled caches: mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl (or
      mini-imagenet-cache-validation.pkl) and mini-imagenet-cache-test.pkl, each a dict with
      'image_data' (uint8 [N, 84, 84, 3]) and 'class_dict' ({{class name: [row indices]}});
  (b) the Ravi & Larochelle files: train.csv, val.csv and test.csv (header 'filename,label',
      e.g. 'n0153282900000005.jpg,n01532829') and the folder images/ holding every listed file.
mini-ImageNet comes from ImageNet and needs a login, so it is not downloaded here."""


class MiniImageNet(CachedImageBundle):
    """mini-ImageNet episodes: 100 ImageNet classes of 600 images, 84x84 RGB (Vinyals et al. 2016).

    Splits follow Ravi & Larochelle 2017: 64 train, 16 val, 20 test classes. Reads either the
    pickled caches (``mini-imagenet-cache-{train,val,test}.pkl``) or the CSV files with an
    ``images/`` folder, both from ``root``; the split is the one the files carry. Images are
    resized to ``image_size`` (the pickles already hold 84x84) and cached as a uint8 tensor per
    split (``miniimagenet_<split>_<S>px.pt``). Pickles can run code when loaded: only use
    files from a source you trust.

    Args:
        root: folder holding the pickles or the CSV files and ``images/``.
        image_size: side of the square images.
        augment: random crop and horizontal flip of training images (see :class:`CachedImageBundle`).
        cache_dir: where the uint8 tensors are cached; default ``root``, or
            ``~/.cache/lightning_meta/miniimagenet`` when ``root`` is read-only.
        **kwargs: the episode settings of :class:`EpisodicDataModule`.
    """

    cache_name = "miniimagenet"

    def __init__(
        self,
        root: str = "data/miniimagenet",
        image_size: PositiveInt = 84,
        augment: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, cache_dir=cache_dir, **kwargs)
        self._rows: dict[str, list[tuple[str, str]]] = {}

    # ------------------------------------------------------------------ files
    def pickle_path(self, split: str) -> Path | None:
        """The pickled cache of ``split`` in ``root``, if there is one."""
        for alias in PICKLE_ALIASES.get(split, (split,)):
            path = self.root / PICKLE.format(alias)
            if path.is_file():
                return path
        return None

    def csv_rows(self, split: str) -> list[tuple[str, str]]:
        """The ``(filename, label)`` rows of ``<split>.csv``."""
        if split not in self._rows:
            path = self.root / f"{split}.csv"
            with path.open(newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or [h.strip() for h in header] != ["filename", "label"]:
                    raise ValueError(f"{path} must start with the header 'filename,label', got {header}")
                rows = []
                for line, row in enumerate(reader, start=2):
                    if len(row) != 2 or not row[0] or not row[1]:
                        raise ValueError(f"{path} line {line}: expected 'filename,label', got {row}")
                    rows.append((row[0].strip(), row[1].strip()))
            if not rows:
                raise ValueError(f"{path} lists no images")
            self._rows[split] = rows
        return self._rows[split]

    def source_files(self, split: str) -> list[Path]:
        pkl = self.pickle_path(split)
        if pkl is not None:
            return [pkl]
        table = self.root / f"{split}.csv"
        if not table.is_file():
            raise FileNotFoundError(
                f"mini-ImageNet '{split}' split not found in {self.root}; " + LAYOUT.format(root=self.root)
            )
        images = [self.root / "images" / filename for filename, _ in self.csv_rows(split)]
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in {table} are missing, e.g. {missing[0]}; put every listed file "
                f"in {self.root / 'images'} (layout (b)), or use the pickled caches; " + LAYOUT.format(root=self.root)
            )
        return [table, *images]

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> ClassImages:
        pkl = self.pickle_path(split)
        data = self._read_pickle(pkl) if pkl is not None else self._read_csv(split)
        warn_class_counts(data, split, NUM_CLASSES, "mini-ImageNet", pkl or self.root / f"{split}.csv")
        return data

    def _read_pickle(self, path: Path) -> ClassImages:
        content = read_pickle(path)
        if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
            keys = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{path} must hold a dict with 'image_data' and 'class_dict', got {keys}")
        images = check_hwc(content["image_data"], path, "image_data")
        class_dict = content["class_dict"]
        if not isinstance(class_dict, dict) or not class_dict:
            raise ValueError(f"{path}: 'class_dict' must be a non-empty dict {{class name: [row indices]}}")
        names = sorted(class_dict)
        rows = [np.asarray(class_dict[n], dtype=np.int64).reshape(-1) for n in names]
        order = np.concatenate(rows)
        if order.size == 0 or order.min() < 0 or order.max() >= len(images):
            raise ValueError(f"{path}: 'class_dict' has row indices outside 0..{len(images) - 1} of 'image_data'")
        offsets = class_offsets([len(r) for r in rows])
        return ClassImages(gather_hwc(images, order, self.image_size), offsets, [str(n) for n in names])

    def _read_csv(self, split: str) -> ClassImages:
        by_class: dict[str, list[str]] = {}
        for filename, label in self.csv_rows(split):
            by_class.setdefault(label, []).append(filename)
        names = sorted(by_class)
        files = [f for n in names for f in by_class[n]]
        images = decode_images([self.root / "images" / f for f in files], self.image_size, "RGB")
        return ClassImages(images, class_offsets([len(by_class[n]) for n in names]), names)
