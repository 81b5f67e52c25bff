"""Caltech-UCSD Birds 200-2011 (Wah et al. 2011) with the few-shot split of Chen et al. 2019."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import PositiveInt
from .download import Remote, download
from .episodes import ClassImages
from .images import CachedImageBundle, class_offsets, decode_images, warn_class_counts

#: The official archive on CaltechDATA, and its MD5 (the value torchvision-style loaders check).
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
ARCHIVE = "CUB_200_2011.tgz"
FOLDER = "CUB_200_2011"
NUM_CLASSES = {"train": 100, "val": 50, "test": 50}

LAYOUT = """expected the official layout {root}/CUB_200_2011/images/<NNN.Class_Name>/<file>.jpg
(200 class folders such as 001.Black_footed_Albatross, as unpacked from CUB_200_2011.tgz);
set root= to the folder holding CUB_200_2011/, or pass download=True to fetch the archive from
CaltechDATA (MD5-checked) and unpack it there."""


def chen_split(index: int) -> str:
    """The split of the class at ``index`` of the sorted class folders (Chen et al.'s ``write_CUB_filelist.py``)."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


class CUB(CachedImageBundle):
    """CUB-200-2011 episodes: 200 bird species, 11788 photos (Wah et al. 2011), resized to ``image_size``.

    The few-shot split is the one of Chen et al. 2019 ("A Closer Look at Few-shot
    Classification"): of the class folders in sorted order, index ``i`` is train when ``i % 2 == 0``,
    val when ``i % 4 == 1`` and test when ``i % 4 == 3``, so 100 / 50 / 50 classes. Reads the
    official ``CUB_200_2011/images/<NNN.Class_Name>/<file>.jpg`` layout, resizes every photo to a
    square (as Chen et al. do at test time) and caches the uint8 tensor per split
    (``cub_<split>_<S>px.pt``).

    Args:
        root: folder holding ``CUB_200_2011/`` (or that folder itself).
        download: when the images are missing, fetch ``CUB_200_2011.tgz`` (1.1 GB) from CaltechDATA,
            check its MD5 and unpack it in ``root``.
        image_size: side of the square images.
        augment: random crop and horizontal flip of training images (see :class:`CachedImageBundle`).
        cache_dir: where the uint8 tensors are cached; default ``root``, or
            ``~/.cache/lightning_meta/cub`` when ``root`` is read-only.
        queries: query examples per class (16, as in Chen et al. 2019).
        test_episodes: test episodes (600, as in Chen et al. 2019).
        **kwargs: the other episode settings of :class:`EpisodicDataModule`.
    """

    cache_name = "cub"

    def __init__(
        self,
        root: str = "data/cub",
        download: bool = False,
        image_size: PositiveInt = 84,
        augment: bool = False,
        cache_dir: str | None = None,
        queries: PositiveInt = 16,
        test_episodes: PositiveInt = 600,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            augment=augment,
            cache_dir=cache_dir,
            queries=queries,
            test_episodes=test_episodes,
            **kwargs,
        )
        self.download = download
        self._classes: dict[str, list[tuple[str, list[Path]]]] = {}

    # ------------------------------------------------------------------ files
    def images_dir(self) -> Path:
        """``root/CUB_200_2011/images``, or ``root/images`` when ``root`` is the ``CUB_200_2011`` folder."""
        inside = self.root / "images"
        return inside if self.root.name == FOLDER and inside.is_dir() else self.root / FOLDER / "images"

    def class_files(self, split: str) -> list[tuple[str, list[Path]]]:
        """``(class folder name, image files)`` of the classes of ``split``, in sorted order."""
        if split in self._classes:
            return self._classes[split]
        images = self.images_dir()
        if not images.is_dir() and self.download:
            download([Remote(URL, ARCHIVE, MD5)], self.root, "CUB", extract=True)
        if not images.is_dir():
            raise FileNotFoundError(f"CUB images not found at {images}; " + LAYOUT.format(root=self.root))
        folders = [p for p in _visible(images) if p.is_dir()]
        if not folders:
            raise FileNotFoundError(f"{images} has no class folders; " + LAYOUT.format(root=self.root))
        for i, folder in enumerate(folders):
            files = [p for p in _visible(folder) if p.is_file()]
            if not files:
                raise ValueError(f"CUB class folder {folder} has no images; restore it from CUB_200_2011.tgz")
            self._classes.setdefault(chen_split(i), []).append((folder.name, files))
        return self._classes.get(split, [])

    def source_files(self, split: str) -> list[Path]:
        return [f for _, files in self.class_files(split) for f in files]

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> ClassImages:
        classes = self.class_files(split)
        if not classes:
            raise ValueError(
                f"the '{split}' split of CUB in {self.images_dir()} is empty; " + LAYOUT.format(root=self.root)
            )
        images = decode_images(self.source_files(split), self.image_size, "RGB")
        data = ClassImages(images, class_offsets([len(f) for _, f in classes]), [name for name, _ in classes])
        warn_class_counts(data, split, NUM_CLASSES, "CUB", self.images_dir())
        return data
