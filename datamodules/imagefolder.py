"""Bring your own data: episodes from folders of images, one folder per class."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .base import EmptySplitError, PositiveInt, stage_uses
from .episodes import SPLITS, ClassImages
from .images import CachedImageBundle, class_offsets, decode_images, image_files, inverted, rotated_classes

LAYOUT = """expected either
  {root}/<split>/<class>/<image> with the splits train, val and test, or
  {root}/<class>/<image> with split_file= a JSON file {{"train": [classes], "val": [...], "test": [...]}}.
Images are files of any format PIL reads (.png, .jpg, .bmp, .gif, .tif, ...); other files are skipped, but an
image PIL cannot read (.heic, .svg, ...) is an error."""


def _layout(root: Path) -> str:
    return LAYOUT.format(root=root)


class EpisodicImageFolder(CachedImageBundle):
    """Episodes from your own images: one folder per class, split into train, val and test classes.

    Two layouts: ``root/<split>/<class>/<image>``, or one folder of classes ``root/<class>/<image>``
    with ``split_file``, a JSON file ``{"train": [...], "val": [...], "test": [...]}`` of class
    folder names. Any file PIL can open by its extension is an image; others (a README, a list) are
    skipped, and an image that cannot be decoded, or in a format PIL cannot read (``.heic``, ``.svg``),
    is an error naming it. Images above PIL's pixel limit are refused unless
    ``LIGHTNING_META_MAX_IMAGE_PIXELS`` raises it. Images are converted to
    ``channels``, resized to ``image_size`` squares and cached as uint8 tensors per split
    (``imagefolder_<split>_<S>px_<C>ch.pt``, see :meth:`cache_path`). Classes and images are taken in sorted order.
    ``invert`` and ``rotations`` are applied when a split is loaded, so they share that cache. Only
    the splits a stage uses need classes: with ``"test": []`` in ``split_file`` (or an empty
    ``test/`` folder) ``fit`` works, and ``test`` says the split is empty. The episode arguments
    (``ways``, ``shots``, ...) are those of :class:`EpisodicDataModule`.

    Args:
        root: the data folder.
        split_file: JSON file assigning the class folders of ``root`` to splits; None when ``root``
            has ``train/``, ``val/`` and ``test/`` folders.
        image_size: side of the square images.
        channels: 3 (RGB) or 1 (grayscale).
        invert: replace every pixel ``p`` by ``255 - p``: images with dark strokes on white (such as
            Omniglot's PNGs) become light on dark, as the :class:`~datamodules.Omniglot` bundle gives them.
        rotations: add each class rotated by 90, 180 and 270 degrees as three new classes, in every
            split, as the Omniglot bundle's ``rotations`` does (class ``4 * c + r``).
        augment: random crop and horizontal flip of training images (see :class:`CachedImageBundle`).
        cache_dir: where the uint8 tensors are cached; default ``root``, or a folder under
            ``~/.cache/lightning_meta/imagefolder`` when ``root`` is read-only.
        **kwargs: the episode settings of :class:`EpisodicDataModule`.
    """

    cache_name = "imagefolder"

    def __init__(
        self,
        root: str = "data/images",
        split_file: str | None = None,
        image_size: PositiveInt = 84,
        channels: int = 3,
        invert: bool = False,
        rotations: bool = False,
        augment: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=augment, cache_dir=cache_dir, **kwargs)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} must be 1 (grayscale) or 3 (RGB)")
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.channels, self.invert, self.rotations = channels, invert, rotations
        self._splits: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------ files
    def _read_split_file(self) -> dict[str, list[str]]:
        assert self.split_file is not None
        if self._splits is not None:
            return self._splits
        if not self.split_file.is_file():
            raise FileNotFoundError(f"split_file={str(self.split_file)!r} not found; " + _layout(self.root))
        try:
            spec = json.loads(self.split_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"split_file {self.split_file} is not valid JSON ({err})") from err
        if not isinstance(spec, dict) or any(
            not isinstance(spec.get(s), list) or not all(isinstance(c, str) for c in spec[s]) for s in SPLITS
        ):
            raise ValueError(
                f"split_file {self.split_file} must be a JSON object with lists of class folder names under "
                f"'train', 'val' and 'test', got {json.dumps(spec)[:200]}"
            )
        seen: dict[str, str] = {}
        for split in SPLITS:
            for name in spec[split]:
                if name in seen:
                    raise ValueError(
                        f"split_file {self.split_file} puts class '{name}' in both '{seen[name]}' and '{split}'; "
                        "each class belongs to one split"
                    )
                seen[name] = split
        self._splits = {s: list(spec[s]) for s in SPLITS}
        return self._splits

    def class_folders(self, split: str) -> list[Path]:
        """The class folders of ``split``."""
        if self.split_file is not None:
            folders = [self.root / name for name in self._read_split_file()[split]]
            missing = [str(f) for f in folders if not f.is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"split_file {self.split_file} lists class folders that do not exist: {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''}; fix the file or the folder names"
                )
            return folders
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"split folder {split_dir} not found; " + _layout(self.root))
        return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def class_images(self, folder: Path) -> list[Path]:
        """The image files of one class folder, sorted; ValueError when there are none."""
        files = image_files(folder)
        if not files:
            raise ValueError(f"class folder {folder} has no images; add some or remove the folder")
        return files

    def source_files(self, split: str) -> list[Path]:
        images = [f for folder in self.class_folders(split) for f in self.class_images(folder)]
        return images + ([self.split_file] if self.split_file is not None else [])

    def cache_params(self) -> list[Any]:
        return [self.channels, str(self.split_file) if self.split_file else None]

    def cache_folder_name(self) -> str:
        # One subfolder per data folder, so two read-only folders never share a cache file.
        digest = hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=6).hexdigest()
        return f"{self.cache_name}/{digest}"

    def cache_path(self, split: str) -> Path:
        """``imagefolder_<split>_<S>px_<C>ch.pt``, with digests of what else sets its content in the name.

        A ``split_file`` adds a digest of its path, and a ``cache_dir`` (a folder that several data
        folders may share) one of the data folder, so two settings never take turns overwriting
        one file (each run rebuilding the other's cache).
        """
        path = super().cache_path(split)
        tags = [f"{self.channels}ch"]
        if self.split_file is not None:
            tags.append("split" + hashlib.blake2b(str(self.split_file.resolve()).encode(), digest_size=4).hexdigest())
        if self.cache_dir:
            tags.append("root" + hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=4).hexdigest())
        return path.with_name(f"{path.stem}_{'_'.join(tags)}.pt")

    def _empty(self, split: str) -> str:
        uses = f"the stages {stage_uses(split)} use it; give it classes, or run a stage that does not use it"
        if self.split_file is not None:
            return f"the '{split}' split of split_file {self.split_file} is empty (\"{split}\": []); {uses}"
        return f"the '{split}' split folder {self.root / split} has no class folders; {uses}. " + _layout(self.root)

    def after_load(self, split: str, data: ClassImages) -> ClassImages:
        """``invert`` and then ``rotations``, on the cached images."""
        if self.invert:
            data = inverted(data)
        return rotated_classes(data) if self.rotations else data

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> ClassImages:
        folders = self.class_folders(split)
        if not folders:
            raise EmptySplitError(self._empty(split))
        files = [self.class_images(folder) for folder in folders]
        mode = "RGB" if self.channels == 3 else "L"
        images = decode_images([f for fs in files for f in fs], self.image_size, mode)
        return ClassImages(images, class_offsets([len(fs) for fs in files]), [f.name for f in folders])
