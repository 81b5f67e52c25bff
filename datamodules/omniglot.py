"""Omniglot (Lake et al. 2015) with the Vinyals et al. 2016 or the Lake et al. 2015 few-shot split."""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from .base import EmptySplitError, PositiveInt
from .download import Remote, download
from .episodes import ClassImages
from .images import CachedImageBundle, decode_image, progress, read_zip_member, rotated_classes

ZIPS = ("images_background", "images_evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
# MD5 of the official files (the same values torchvision checks).
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
NUM_CHARACTERS = {"images_background": 964, "images_evaluation": 659}
DRAWERS = 20
_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/character(\d\d)/(\d{4})_(\d\d)\.png$")

#: The validation alphabets of the Lake split: every fourth of the 20 evaluation alphabets in sorted
#: order, starting with the first (140 characters); the other 15 (519 characters) are the test set.
LAKE_VAL_ALPHABETS = ("Angelic", "Avesta", "Kannada", "Mongolian", "Syriac_(Serto)")
#: The zips each split is read from.
SPLIT_ZIPS: dict[str, dict[str, tuple[str, ...]]] = {
    "vinyals": {"train": ZIPS, "val": ZIPS, "test": ZIPS},
    "lake": {"train": ZIPS[:1], "val": ZIPS[1:], "test": ZIPS[1:]},
}


def vinyals_split() -> dict[str, dict[str, str | list[int]]]:
    """The val and test characters of the Vinyals et al. split, by alphabet (the rest is train)."""
    text = resources.files("datamodules").joinpath("splits/omniglot_vinyals.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def split_of(character: str, split: dict[str, dict[str, str | list[int]]]) -> str:
    """'train', 'val' or 'test' of the Vinyals split for a character named ``Alphabet/characterNN``."""
    alphabet, char = character.split("/")
    number = int(char[len("character") :])
    for name in ("val", "test"):
        chosen = split[name].get(alphabet)
        if chosen == "all" or (isinstance(chosen, list) and number in chosen):
            return name
    return "train"


def lake_split_of(character: str, zip_name: str) -> str:
    """'train', 'val' or 'test' of the Lake split for a character ``Alphabet/characterNN`` of ``zip_name``."""
    if zip_name == "images_background":
        return "train"
    return "val" if character.split("/")[0] in LAKE_VAL_ALPHABETS else "test"


def read_zip(path: Path, image_size: int) -> tuple[list[str], torch.Tensor]:
    """Decode an official Omniglot zip into character names and a ``[chars, 20, 1, S, S]`` uint8 tensor.

    Strokes become 255 and the background 0. Raises ValueError naming the file when it is not
    a zip or does not have the official layout, and naming the member when one is damaged.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid zip file; delete it and re-run with download=True") from err
    with archive:
        characters: dict[str, list[tuple[int, str]]] = {}
        for entry in archive.namelist():
            if entry.endswith("/"):
                continue
            match = _PNG.match(entry)
            if match is None or match.group(1) != path.stem:
                raise ValueError(
                    f"{path} has an entry '{entry}' outside the official layout "
                    f"'{path.stem}/<Alphabet>/characterNN/IIII_DD.png'; use the official zip"
                )
            _, alphabet, number, _, drawer = match.groups()
            characters.setdefault(f"{alphabet}/character{number}", []).append((int(drawer), entry))
        if not characters:
            raise ValueError(f"{path} holds no Omniglot images; use the official zip")
        names = sorted(characters)
        images = torch.empty(len(names), DRAWERS, 1, image_size, image_size, dtype=torch.uint8)
        for c, name in progress(enumerate(names), len(names), f"decoding {path.name}", unit="char"):
            drawings = sorted(characters[name])
            if [d for d, _ in drawings] != list(range(1, DRAWERS + 1)):
                raise ValueError(
                    f"{path}: character '{name}' does not have drawings 01..{DRAWERS}; use the official zip"
                )
            for d, (_, entry) in enumerate(drawings):
                images[c, d] = decode_image(read_zip_member(archive, path, entry), image_size, "L", f"{path}:{entry}")
    if len(names) != NUM_CHARACTERS[path.stem]:
        warnings.warn(
            f"{path} has {len(names)} characters, the official file has {NUM_CHARACTERS[path.stem]}",
            stacklevel=2,
        )
    return names, 255 - images  # the PNGs have dark strokes on white


class Omniglot(CachedImageBundle):
    """Omniglot episodes: 1623 handwritten characters of 50 alphabets, 20 drawings each (Lake et al. 2015).

    Reads the official ``images_background.zip`` (30 alphabets, 964 characters) and
    ``images_evaluation.zip`` (20 alphabets, 659 characters) from ``root`` without extracting them,
    resizes every drawing once to ``image_size`` with strokes 255 on a 0 background, and caches each
    split as a uint8 tensor (``omniglot_<split>_<S>px.pt`` for the Vinyals split,
    ``omniglot_lake_<split>_<S>px.pt`` for the Lake split) so later starts take well under a second.

    Two splits by character, chosen with ``split``:

    - ``"vinyals"`` (Vinyals et al. 2016, as in Snell et al. 2017): 1028 train / 172 val / 423
      test characters, taken from both zips, so its training set holds characters of the
      evaluation set (for example Gurmukhi's characters 1-41, while 42-45 are test).
    - ``"lake"`` (Lake et al. 2015): train is the 30 background alphabets (964 characters);
      val and test are the 20 evaluation alphabets, split by alphabet in a fixed, documented way:
      every fourth of their names in sorted order, starting with the first, is val
      (:data:`LAKE_VAL_ALPHABETS`: Angelic, Avesta, Kannada, Mongolian, Syriac_(Serto), 140
      characters), the other 15 are test (519 characters). No alphabet is shared between splits.

    With ``rotations`` each character rotated by 90, 180 and 270 degrees is a new class, as in
    Vinyals et al. and Snell et al. (so 4112 / 688 / 1692 classes for the Vinyals split and
    3856 / 560 / 2076 for the Lake split). The episode arguments (``ways``, ``shots``,
    ``queries``, ``tasks_per_batch``, ...) are those of :class:`EpisodicDataModule`.

    Args:
        root: folder holding the two zips (downloaded there when ``download``).
        download: fetch missing zips from github.com/brendenlake/omniglot and check their MD5.
        image_size: side of the square images after resizing.
        rotations: add the rotated characters as new classes.
        split: "vinyals" or "lake", see above.
        cache_dir: where the resized tensors are cached; default ``root``, or
            ``~/.cache/lightning_meta/omniglot`` when ``root`` is read-only.
        **kwargs: the episode settings of :class:`EpisodicDataModule`.
    """

    cache_name = "omniglot"
    cache_version = 2
    channels = 1
    invert = True  # the official PNGs are dark strokes on white; the cache holds light strokes on dark

    def __init__(
        self,
        root: str = "data/omniglot",
        download: bool = False,
        image_size: PositiveInt = 28,
        rotations: bool = True,
        split: Literal["vinyals", "lake"] = "vinyals",
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, augment=False, cache_dir=cache_dir, **kwargs)
        if split not in SPLIT_ZIPS:
            raise ValueError(f"split={split!r} must be one of {sorted(SPLIT_ZIPS)}; see the Omniglot docstring")
        self.download, self.rotations, self.split = download, rotations, split
        self._zips: dict[str, tuple[list[str], torch.Tensor]] = {}

    # ------------------------------------------------------------------ files
    def _zip(self, name: str) -> Path:
        return self.root / f"{name}.zip"

    def source_files(self, split: str) -> list[Path]:
        """The zips ``split`` is read from; both are downloaded first when missing and ``download``."""
        missing = [self._zip(name) for name in ZIPS if not self._zip(name).exists()]
        if missing and self.download:
            download([Remote(URL.format(n), f"{n}.zip", MD5[n]) for n in ZIPS], self.root, "Omniglot")
        elif missing:
            raise FileNotFoundError(
                f"Omniglot files not found: {', '.join(map(str, missing))}. Set root= to the folder "
                f"holding images_background.zip and images_evaluation.zip, or pass download=True"
            )
        return [self._zip(name) for name in SPLIT_ZIPS[self.split][split]]

    def cache_path(self, split: str) -> Path:
        """``omniglot_<split>_<S>px.pt`` for the Vinyals split, ``omniglot_lake_<split>_<S>px.pt`` for Lake's."""
        path = super().cache_path(split)
        if self.split == "vinyals":
            return path
        return path.with_name(path.name.replace(f"{self.cache_name}_", f"{self.cache_name}_{self.split}_", 1))

    def cache_params(self) -> list[Any]:
        return [self.split]

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> ClassImages:
        spec = vinyals_split()
        names: list[str] = []
        parts = []
        for zip_name in SPLIT_ZIPS[self.split][split]:
            if zip_name not in self._zips:  # prepare_data reads each zip once for the three splits
                self._zips[zip_name] = read_zip(self._zip(zip_name), self.image_size)
            chars, images = self._zips[zip_name]
            if self.split == "vinyals":
                chosen = [i for i, name in enumerate(chars) if split_of(name, spec) == split]
            else:
                chosen = [i for i, name in enumerate(chars) if lake_split_of(name, zip_name) == split]
            names += [chars[i] for i in chosen]
            parts.append(images[chosen])
        if not names:
            raise EmptySplitError(
                f"the '{split}' split of Omniglot (split={self.split!r}) in {self.root} is empty; use the official zips"
            )
        return ClassImages.from_equal_classes(torch.cat(parts).contiguous(), names)

    def after_load(self, split: str, data: ClassImages) -> ClassImages:
        """Rotations as classes when ``rotations`` (class ``4 * character + r``, as in Vinyals et al.)."""
        return rotated_classes(data) if self.rotations else data

    def prepare_data(self) -> None:
        """Download (if asked) and build the caches once, on one process."""
        super().prepare_data()
        self._zips.clear()


__all__ = ["LAKE_VAL_ALPHABETS", "Omniglot", "lake_split_of", "read_zip", "split_of", "vinyals_split"]
