"""Bring your own data: episodes from folders of images, one folder per class."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .episodes import SPLITS, ClassImages
from .images import IMAGE_EXTENSIONS, CachedImageBundle, class_offsets, decode_images

LAYOUT = """expected either
  {root}/<split>/<class>/<image> with the splits train, val and test, or
  {root}/<class>/<image> with split_file= a JSON file {{"train": [classes], "val": [...], "test": [...]}}.
Images are files of any format PIL reads (.png, .jpg, .bmp, .gif, .tif, ...); other files are skipped."""


def _layout(root: Path) -> str:
    return LAYOUT.format(root=root)


class EpisodicImageFolder(CachedImageBundle):
    """Episodes from your own images: one folder per class, split into train, val and test classes.

    Two layouts: ``root/<split>/<class>/<image>``, or one folder of classes ``root/<class>/<image>``
    with ``split_file``, a JSON file ``{"train": [...], "val": [...], "test": [...]}`` of class
    folder names. Any file PIL can open by its extension is an image; others (a README, a list) are
    skipped, and an image that cannot be decoded is an error naming it. Images are converted to
    ``channels``, resized to ``image_size`` squares and cached as uint8 tensors per split
    (``imagefolder_<split>_<S>px_<C>ch.pt``). Classes and images are taken in sorted order.

    Args:
        root: the data folder.
        split_file: JSON file assigning the class folders of ``root`` to splits; None when ``root``
            has ``train/``, ``val/`` and ``test/`` folders.
        image_size: side of the square images.
        channels: 3 (RGB) or 1 (grayscale).
        augment: random crop and horizontal flip of training images (see :class:`CachedImageBundle`).
        cache_dir: where the uint8 tensors are cached; default ``root``, or a folder under
            ``~/.cache/lightning_meta/imagefolder`` when ``root`` is read-only.
        ways, shots, queries, tasks_per_batch, train_episodes, val_episodes, test_episodes,
        train_ways, train_shots, train_queries, seed, num_workers: see :class:`EpisodicDataModule`.
    """

    cache_name = "imagefolder"

    def __init__(
        self,
        root: str = "data/images",
        split_file: str | None = None,
        image_size: int = 84,
        channels: int = 3,
        augment: bool = False,
        cache_dir: str | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        tasks_per_batch: int = 1,
        train_episodes: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 1000,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            root, image_size, augment, cache_dir, ways, shots, queries, tasks_per_batch, train_episodes,
            val_episodes, test_episodes, train_ways, train_shots, train_queries, seed, num_workers,
        )  # fmt: skip
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} must be 1 (grayscale) or 3 (RGB)")
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.channels = channels
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
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
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
        path = super().cache_path(split)
        return path.with_name(f"{path.stem}_{self.channels}ch.pt")

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> ClassImages:
        folders = self.class_folders(split)
        if not folders:
            raise ValueError(f"the '{split}' split of {self.root} has no class folders; " + _layout(self.root))
        files = [self.class_images(folder) for folder in folders]
        mode = "RGB" if self.channels == 3 else "L"
        images = decode_images([f for fs in files for f in fs], self.image_size, mode)
        return ClassImages(images, class_offsets([len(fs) for fs in files]), [f.name for f in folders])
