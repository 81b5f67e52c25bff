"""Omniglot (Lake et al. 2015) with the Vinyals et al. 2016 few-shot split."""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from .base import EpisodicDataModule
from .episodes import ClassImages
from .images import cache_folder, load_cache, save_cache

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
_CACHE_VERSION = 1


def vinyals_split() -> dict[str, dict[str, str | list[int]]]:
    """The val and test characters of the Vinyals et al. split, by alphabet (the rest is train)."""
    text = resources.files("datamodules").joinpath("splits/omniglot_vinyals.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def split_of(character: str, split: dict[str, dict[str, str | list[int]]]) -> str:
    """'train', 'val' or 'test' for a character named ``Alphabet/characterNN``."""
    alphabet, char = character.split("/")
    number = int(char[len("character") :])
    for name in ("val", "test"):
        chosen = split[name].get(alphabet)
        if chosen == "all" or (isinstance(chosen, list) and number in chosen):
            return name
    return "train"


def read_zip(path: Path, image_size: int) -> tuple[list[str], torch.Tensor]:
    """Decode an official Omniglot zip into character names and a ``[chars, 20, 1, S, S]`` uint8 tensor.

    Strokes become 255 and the background 0. Raises ValueError naming the file when it is not
    a zip or does not have the official layout.
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
        for c, name in enumerate(names):
            drawings = sorted(characters[name])
            if [d for d, _ in drawings] != list(range(1, DRAWERS + 1)):
                raise ValueError(
                    f"{path}: character '{name}' does not have drawings 01..{DRAWERS}; use the official zip"
                )
            for d, (_, entry) in enumerate(drawings):
                try:
                    with Image.open(io.BytesIO(archive.read(entry))) as im:
                        small = im.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
                except (OSError, zipfile.BadZipFile, ValueError) as err:
                    raise ValueError(f"{path}: cannot decode '{entry}' ({err}); the file is corrupt") from err
                images[c, d, 0] = 255 - torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(
                    image_size, image_size
                )
    if len(names) != NUM_CHARACTERS[path.stem]:
        warnings.warn(
            f"{path} has {len(names)} characters, the official file has {NUM_CHARACTERS[path.stem]}",
            stacklevel=2,
        )
    return names, images


class Omniglot(EpisodicDataModule):
    """Omniglot episodes: 1623 handwritten characters, 20 drawings each (Lake et al. 2015).

    Reads the official ``images_background.zip`` and ``images_evaluation.zip`` from ``root``
    without extracting them, resizes every drawing once to ``image_size`` and caches the uint8
    tensor (``omniglot_<S>px.pt``) so later starts take well under a second. Splits by character
    follow Vinyals et al. 2016 (1028 train / 172 val / 423 test), and with ``rotations`` each
    character rotated by 90, 180 and 270 degrees is a new class, as in Vinyals et al. and Snell
    et al. 2017 (so 4112 / 688 / 1692 classes).

    Args:
        root: folder holding the two zips (downloaded there when ``download``).
        download: fetch missing zips from github.com/brendenlake/omniglot and check their MD5.
        image_size: side of the square images after resizing.
        rotations: add the rotated characters as new classes.
        cache_dir: where the resized tensor is cached; default ``root``, or
            ``~/.cache/lightning_meta`` when ``root`` is read-only.
        ways, shots, queries, tasks_per_batch, train_episodes, val_episodes, test_episodes,
        train_ways, train_shots, train_queries, seed, num_workers: see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        root: str = "data/omniglot",
        download: bool = False,
        image_size: int = 28,
        rotations: bool = True,
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
            ways, shots, queries, tasks_per_batch, train_episodes, val_episodes, test_episodes,
            train_ways, train_shots, train_queries, seed, num_workers,
        )  # fmt: skip
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be a positive integer")
        self.root, self.download, self.image_size = Path(root).expanduser(), download, image_size
        self.rotations, self.cache_dir = rotations, cache_dir
        self._all: tuple[list[str], torch.Tensor] | None = None

    # ------------------------------------------------------------------ files
    def _zip(self, name: str) -> Path:
        return self.root / f"{name}.zip"

    def _download(self) -> None:
        from torchvision.datasets.utils import download_url

        self.root.mkdir(parents=True, exist_ok=True)
        for name in ZIPS:
            if not self._zip(name).exists():
                download_url(URL.format(name), str(self.root), f"{name}.zip", md5=MD5[name])

    def cache_path(self) -> Path:
        """Where the resized uint8 tensor is (or will be) cached."""
        return cache_folder(self.root, "omniglot", self.cache_dir) / f"omniglot_{self.image_size}px.pt"

    def _stamp(self) -> list[list[int | str]]:
        return [[name, self._zip(name).stat().st_size, self._zip(name).stat().st_mtime_ns] for name in ZIPS]

    def prepare_data(self) -> None:
        """Download (if asked) and build the cache once, on one process."""
        self._load_all()

    def _load_all(self) -> tuple[list[str], torch.Tensor]:
        if self._all is not None:
            return self._all
        missing = [self._zip(name) for name in ZIPS if not self._zip(name).exists()]
        if missing and self.download:
            self._download()
        elif missing:
            raise FileNotFoundError(
                f"Omniglot files not found: {', '.join(map(str, missing))}. Set root= to the folder "
                f"holding images_background.zip and images_evaluation.zip, or pass download=True"
            )
        cache = self.cache_path()
        stamp = self._stamp()
        saved = load_cache(cache, _CACHE_VERSION, stamp)
        if saved is not None:
            self._all = saved["names"], saved["images"]
            return self._all
        names, parts = [], []
        for name in ZIPS:
            chars, images = read_zip(self._zip(name), self.image_size)
            names += chars
            parts.append(images)
        self._all = names, torch.cat(parts)
        save_cache(
            cache, {"version": _CACHE_VERSION, "stamp": stamp, "names": names, "images": self._all[1]}, "Omniglot"
        )
        return self._all

    # ------------------------------------------------------------------ splits
    def load_split(self, split: str) -> ClassImages:
        names, images = self._load_all()
        spec = vinyals_split()
        chosen = [i for i, name in enumerate(names) if split_of(name, spec) == split]
        if not chosen:
            raise ValueError(f"the '{split}' split of Omniglot in {self.root} is empty; use the official zips")
        data = images[chosen]  # [C, 20, 1, S, S]
        chosen_names = [names[i] for i in chosen]
        if self.rotations:
            # class index = character * 4 + rotation, as in Vinyals et al.
            data = torch.stack([torch.rot90(data, r, dims=(-2, -1)) for r in range(4)], dim=1).flatten(0, 1)
            chosen_names = [f"{n}/rot{90 * r:03d}" for n in chosen_names for r in range(4)]
        return ClassImages.from_equal_classes(data.contiguous(), chosen_names)
