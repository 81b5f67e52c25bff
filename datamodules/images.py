"""Shared pieces of the image bundles: decoding, resizing, the uint8 tensor cache and their base class.

Every image bundle turns its official files into a class-indexed uint8 tensor once
(:class:`~datamodules.episodes.ClassImages`) and caches it with ``torch.save`` beside the data,
or under ``~/.cache/lightning_meta/<name>`` when the data folder is read-only. A cache records a
stamp of the files it was built from (relative path, size, modification time) and is rebuilt when
they change. Caches are memory-mapped on load, so a large split (tiered-ImageNet's 9.5 GB training
set) opens at once and is shared by the processes of one machine through the page cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from PIL import Image
from tqdm import tqdm

from .augment import random_crop_flip
from .base import EmptySplitError, EpisodicDataModule, PositiveInt
from .episodes import SPLITS, ClassImages
from .files import WriteError, atomic_file

#: File name endings that PIL can open; other files in an image folder (notes, lists) are skipped.
#: PIL also registers endings it can only write (.pdf), which are not images it can read.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)
#: Endings of images (photos from phones and cameras, vector drawings) that PIL cannot read: such a
#: file in an image folder is an error naming it, never silently skipped.
UNREADABLE_IMAGE_EXTENSIONS = (
    frozenset(
        {".heic", ".heif", ".svg", ".svgz", ".jxl", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2"}
        | {ext.lower() for ext in Image.registered_extensions()}
    )
    - IMAGE_EXTENSIONS
)
#: Environment variable that raises PIL's limit on the pixels of one image (0: no limit).
MAX_PIXELS_VARIABLE = "LIGHTNING_META_MAX_IMAGE_PIXELS"


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted; other files (notes, lists, hidden files) are skipped.

    Raises ValueError naming the file when the folder holds an image that PIL cannot read (a
    ``.heic`` photo, an ``.svg`` drawing), which would otherwise be left out without a word.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    unreadable = [p for p in files if p.suffix.lower() in UNREADABLE_IMAGE_EXTENSIONS]
    if unreadable:
        names = ", ".join(p.name for p in unreadable[:3]) + (" ..." if len(unreadable) > 3 else "")
        raise ValueError(
            f"{folder} holds {len(unreadable)} image(s) in a format PIL cannot read ({names}); convert them to "
            ".png or .jpg, or move them out of the folder"
        )
    return [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def _pixel_limit() -> int | None:
    """PIL's pixel limit, raised by ``LIGHTNING_META_MAX_IMAGE_PIXELS`` when set (0: none)."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return Image.MAX_IMAGE_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_VARIABLE}={value!r} must be a whole number of pixels (0 for no limit)") from None
    return None if limit <= 0 else limit


# ----------------------------------------------------------------------------- cache placement
def writable(folder: Path) -> bool:
    """Whether new files can be written in ``folder``."""
    # os.access says yes to root even for a folder marked read-only (like a shared data mount).
    return folder.is_dir() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def cache_folder(root: Path, name: str, cache_dir: str | None) -> Path:
    """``cache_dir`` if given, else ``root`` when writable, else ``$XDG_CACHE_HOME/lightning_meta/<name>``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if writable(root):
        return root
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_meta" / name


def files_stamp(files: Iterable[Path], root: Path) -> str:
    """A digest of the relative paths, sizes and modification times of ``files``: changes when any file does."""
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        stat = path.stat()
        # Relative names keep the cache valid when the data folder moves.
        name = path.relative_to(root) if path.is_relative_to(root) else path
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_cache(path: Path, version: int, stamp: Any) -> dict[str, Any] | None:
    """The saved dict at ``path`` if it has this ``version`` and ``stamp``; None when absent, stale or unreadable."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True, mmap=True)
        if saved["version"] == version and saved["stamp"] == stamp:
            return saved
    except Exception as err:  # an unreadable cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache {path}: {err}", stacklevel=3)
    return None


def save_cache(path: Path, content: dict[str, Any], what: str) -> None:
    """Write ``content`` to ``path`` atomically (see :func:`~datamodules.files.atomic_file`); warn when it cannot.

    A cache that cannot be written (a full disk, a read-only folder) is not fatal: the data is in
    memory already, and the next run tries again. The warning names the file and the free space.
    """
    try:
        with atomic_file(path, f"{what} image cache") as f:
            torch.save(content, f)
    except WriteError as err:
        warnings.warn(f"{err}; set cache_dir= to a folder with room", stacklevel=3)


_T = TypeVar("_T")


def progress(items: Iterable[_T], total: int, what: str, unit: str = "img", delay: float = 2.0) -> Iterator[_T]:
    """``items`` with a progress bar on stderr, shown once the work has taken ``delay`` seconds (a cache build).

    tqdm comes with Lightning; a short loop prints nothing.
    """
    return iter(tqdm(items, total=total, desc=what, unit=unit, delay=delay, leave=False, dynamic_ncols=True))


# ----------------------------------------------------------------------------- decoding
def decode_image(source: bytes | Path, size: int, mode: str, name: str | None = None) -> torch.Tensor:
    """Decode one image file (or its bytes) into a ``[C, size, size]`` uint8 tensor.

    ``mode`` is PIL's "RGB" or "L". The image is resized to a square (aspect ratio not kept, as in
    the few-shot literature) with Lanczos filtering. Raises ValueError naming ``name`` (or the
    path) when PIL cannot read it.
    """
    label = name if name is not None else str(source)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, _pixel_limit()
    try:
        im = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
    except Image.DecompressionBombError as err:  # PIL refuses twice its limit (and warns above it)
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels"
        raise ValueError(
            f"image '{label}' has {pixels}, above PIL's limit of {Image.MAX_IMAGE_PIXELS:,} (a guard against "
            f"decompression bombs); if you trust the file, raise the limit with {MAX_PIXELS_VARIABLE}="
            f"{int(found.group(1)) if found else 0} (0 for none), or shrink the image"
        ) from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot decode image '{label}' ({err}); the file is corrupt or not an image") from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with im:
            if im.format == "JPEG":
                im.draft(mode, (size, size))  # decode at a reduced scale that is still >= size: much faster
            converted = im.convert(mode)
            if converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(converted, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot decode image '{label}' ({err}); the file is corrupt or not an image") from err
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def decode_images(
    sources: Sequence[bytes | Path], size: int, mode: str, names: Sequence[str] | None = None
) -> torch.Tensor:
    """Decode many images (see :func:`decode_image`) into one preallocated ``[N, C, size, size]`` uint8 tensor."""
    out = torch.empty(len(sources), 3 if mode == "RGB" else 1, size, size, dtype=torch.uint8)
    for i, source in progress(enumerate(sources), len(sources), f"decoding {len(sources)} images at {size}px"):
        out[i] = decode_image(source, size, mode, names[i] if names is not None else None)
    return out


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` uint8 images to ``size x size`` (antialiased bilinear); no copy when they fit."""
    if images.shape[-2:] == (size, size):
        return images
    small = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return small.round_().clamp_(0, 255).to(torch.uint8)


def gather_hwc(array: np.ndarray, order: np.ndarray, size: int, bgr: bool = False, chunk: int = 2048) -> torch.Tensor:
    """``array[order]`` of ``[N, H, W, 3]`` uint8 images as ``[len(order), 3, size, size]``, chunk by chunk.

    Going in chunks keeps the peak memory near one copy of the data (tiered-ImageNet's training
    split is 9.5 GB). ``bgr`` swaps the channels of images stored in OpenCV's BGR order.
    """
    out = torch.empty(len(order), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(order), chunk):
        part = torch.from_numpy(np.ascontiguousarray(array[order[start : start + chunk]])).permute(0, 3, 1, 2)
        if bgr:
            part = part.flip(1)
        out[start : start + chunk] = resize_images(part, size)
    return out


def check_hwc(array: Any, path: Path, key: str) -> np.ndarray:
    """Return ``array`` if it is ``[N, H, W, 3]`` uint8 images, else raise ValueError naming ``path`` and ``key``."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        raise ValueError(
            f"{path}: '{key}' must be uint8 RGB images [N, H, W, 3], got {dtype} of shape {shape}; "
            "use the original file"
        )
    return array


def class_offsets(counts: Sequence[int]) -> torch.Tensor:
    """The ``[num_classes + 1]`` offsets of :class:`ClassImages` from the number of images of each class."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.as_tensor(list(counts), dtype=torch.long).cumsum(0)
    return offsets


def group_by_label(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The sorted distinct labels, the order that groups the items by label (stable), and the class offsets."""
    classes, counts = np.unique(labels, return_counts=True)
    return classes, np.argsort(labels, kind="stable"), class_offsets(counts.tolist())


def warn_class_counts(data: ClassImages, split: str, expected: dict[str, int], what: str, source: Path) -> None:
    """Warn when ``split`` does not have the number of classes of the official files (a subset is allowed)."""
    if data.num_classes != expected[split]:
        warnings.warn(
            f"the '{split}' split of {what} in {source} has {data.num_classes} classes, the official one "
            f"has {expected[split]}",
            stacklevel=3,
        )


def rotated_classes(data: ClassImages) -> ClassImages:
    """Each class of ``data`` and its rotations by 90, 180 and 270 degrees as four classes (Santoro et al. 2016).

    Class ``4 * c + r`` holds the images of class ``c`` rotated by ``90 * r`` degrees
    counter-clockwise, named ``<name>/rot000`` ... ``<name>/rot270``; images must be square.
    """
    counts = data.counts
    total = len(data.images)
    # Output row of image i of class c, rotation r: every rotation of a class follows its class's start * 4.
    starts = data.offsets[:-1].repeat_interleave(counts)
    within = torch.arange(total) - starts
    sizes = counts.repeat_interleave(counts)
    images = torch.empty(4 * total, *data.images.shape[1:], dtype=data.images.dtype)
    for r in range(4):
        images[4 * starts + r * sizes + within] = torch.rot90(data.images, r, dims=(-2, -1))
    names = [f"{name}/rot{90 * r:03d}" for name in data.names for r in range(4)]
    return ClassImages(images, class_offsets([int(c) for c in counts for _ in range(4)]), names)


def inverted(data: ClassImages) -> ClassImages:
    """``data`` with every pixel ``p`` replaced by ``255 - p`` (dark strokes on white become light on dark)."""
    return ClassImages(255 - data.images, data.offsets, data.names)


# ----------------------------------------------------------------------------- archives
#: What reading a damaged archive member raises: a bad CRC, bad deflate data, a truncated stream.
ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, tarfile.TarError)


def damaged_archive(archive: Path, member: str, err: BaseException, fix: str = "download=True") -> ValueError:
    """The ValueError for a damaged ``member`` of ``archive``: names both and says to fetch the archive again."""
    return ValueError(
        f"{archive} is damaged: its member '{member}' cannot be read ({type(err).__name__}: {err}); delete "
        f"{archive} and download it again (or re-run with {fix})"
    )


def read_zip_member(archive: zipfile.ZipFile, path: Path, member: str) -> bytes:
    """The bytes of ``member`` of the zip ``archive`` read from ``path``; ValueError naming both when damaged."""
    try:
        return archive.read(member)
    except ARCHIVE_ERRORS as err:
        raise damaged_archive(path, member, err) from err


# ----------------------------------------------------------------------------- base class
class CachedImageBundle(EpisodicDataModule):
    """Base of the image bundles: files read by :meth:`read_split`, cached as uint8 tensors, optional augmentation.

    A subclass sets :attr:`cache_name` and implements :meth:`source_files` (the files a split is read
    from, raising FileNotFoundError that describes the expected layout when they are missing) and
    :meth:`read_split` (the real reading code). The cache of a split is
    ``<cache folder>/<cache_name>_<split>_<S>px.pt``; it is rebuilt when those files or
    :meth:`cache_params` change.

    A bundle's constructor takes its own arguments and ``**kwargs``, passed on to this class and
    then to :class:`EpisodicDataModule`, so the episode settings are declared once; LightningCLI
    follows ``**kwargs`` into those signatures, so ``--data.ways 5`` and ``data.init_args.ways``
    work for every bundle.

    Args:
        root: the data folder.
        image_size: side of the square images after resizing.
        augment: random crop (8 px padding) and horizontal flip of training images, on the device.
        cache_dir: where the uint8 tensors are cached; default ``root``, or
            ``~/.cache/lightning_meta/<name>`` when ``root`` is read-only.
        **kwargs: the episode settings (``ways``, ``shots``, ``queries``, ...): see :class:`EpisodicDataModule`.
    """

    #: Short name for cache files and the fallback cache folder.
    cache_name: ClassVar[str] = "images"
    #: Bump when the cached content of a bundle changes meaning.
    cache_version: ClassVar[int] = 1
    #: Channels of the cached images: 3 (RGB) or 1 (grayscale). A bundle that takes ``channels`` sets it per instance.
    channels: int = 3
    #: Whether a decoded file is inverted (``255 - v``) before caching (Omniglot's light strokes on dark).
    invert: bool = False

    def __init__(
        self,
        root: str,
        image_size: PositiveInt,
        augment: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be at least 1; set image_size to the side in pixels")
        image_size = int(image_size)
        self.root, self.image_size = Path(root).expanduser(), image_size
        self.augment, self.cache_dir = augment, cache_dir
        self._loaded: dict[str, ClassImages] = {}
        self._built: list[Path] = []  # caches written by this process, named once by prepare_data

    def preprocessing(self) -> dict[str, Any]:
        """How an image file becomes model input here, as plain data (saved in the hyperparameters).

        ``image_size`` (the square a file is resized to), ``channels`` (1: grayscale, 3: RGB),
        ``invert`` (``255 - v`` after decoding), and the model input: ``v / 255``, then
        ``(x - mean) / std`` per channel where ``mean`` and ``std`` are given (None: not normalised).
        :func:`lightning_meta.inference.predict_folders` reads a checkpoint's images with it.
        """
        return {"image_size": self.image_size, "channels": self.channels, "invert": self.invert, "mean": None,
                "std": None}  # fmt: skip

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Here rather than in __init__: a subclass sets channels and invert after this class's __init__.
        self.hparams["preprocessing"] = self.preprocessing()

    # ------------------------------------------------------------------ hooks for subclasses
    def source_files(self, split: str) -> list[Path]:
        """The files that ``split`` is read from; raise FileNotFoundError describing the layout if missing."""
        raise NotImplementedError

    def read_split(self, split: str) -> ClassImages:
        """Read ``split`` from :meth:`source_files` into uint8 ``[M, C, S, S]`` images (no cache)."""
        raise NotImplementedError

    def cache_params(self) -> list[Any]:
        """Settings besides ``image_size`` that change the cached tensor (part of the cache stamp)."""
        return []

    def after_load(self, split: str, data: ClassImages) -> ClassImages:
        """Derive the classes of ``split`` from its cached images; called on every load, the result is not cached.

        For cheap steps that should not need a cache of their own, such as rotations as classes or
        inverted pixels; the identity by default.
        """
        return data

    def cache_folder_name(self) -> str:
        """Folder under ``~/.cache/lightning_meta`` used when ``root`` is read-only."""
        return self.cache_name

    # ------------------------------------------------------------------ caching
    def cache_path(self, split: str) -> Path:
        """Where the uint8 tensor of ``split`` is (or will be) cached."""
        folder = cache_folder(self.root, self.cache_folder_name(), self.cache_dir)
        return folder / f"{self.cache_name}_{split}_{self.image_size}px.pt"

    def load_split(self, split: str) -> ClassImages:
        """The class-indexed images of ``split``, from the cache when it matches the files."""
        if split in self._loaded:
            return self._loaded[split]
        files = self.source_files(split)
        stamp = [self.cache_params(), files_stamp(files, self.root)]
        path = self.cache_path(split)
        saved = load_cache(path, self.cache_version, stamp)
        if saved is None and self.cache_dir:
            self._check_cache_dir(path.parent)
        if saved is not None:
            data = ClassImages(saved["images"], saved["offsets"], list(saved["names"]))
        else:
            data = self.read_split(split)
            content = {"images": data.images, "offsets": data.offsets, "names": data.names}
            save_cache(path, {"version": self.cache_version, "stamp": stamp, **content}, type(self).__name__)
            if path.is_file():
                self._built.append(path)
        data = self.after_load(split, data)
        self._loaded[split] = data
        return data

    def _check_cache_dir(self, folder: Path) -> None:
        """Raise ValueError before the slow read when the given ``cache_dir`` cannot take the new cache file."""
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and existing.is_dir() and writable(existing):
            return
        why = "is not a folder" if existing is not None and not existing.is_dir() else "is not writable"
        shown = folder if existing == folder else existing
        raise ValueError(
            f"cache_dir={self.cache_dir!r}: {shown} {why}, so the {type(self).__name__} image cache cannot be "
            f"written there; pass a writable folder as --data.cache_dir, or leave cache_dir unset (the cache then "
            f"goes beside the data, or under ~/.cache/lightning_meta when the data folder is read-only)"
        )

    def prepare_data(self) -> None:
        """Read every split once and write the caches, on one process.

        An empty split (:class:`EmptySplitError`) is skipped here: it is an error only in
        :meth:`setup` for a stage that uses it.
        """
        self._built = []
        for split in SPLITS:
            try:
                self.load_split(split)
            except EmptySplitError:
                continue
        if self._built:  # said once, after a first run's long silent decoding
            size = sum(p.stat().st_size for p in self._built) / 2**20
            names = ", ".join(p.name for p in self._built)
            folder = self._built[0].parent
            rank_zero_info(f"{type(self).__name__}: image cache built in {folder} ({names}; {size:.0f} MB)")

    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        """Random crop and flip of training images when ``augment`` (see :func:`random_crop_flip`)."""
        return random_crop_flip(images) if self.augment else images


#: What a dataset pickle may name besides lists, dicts, strings, bytes and numbers: numpy arrays,
#: their dtypes and scalars (under numpy 1's and 2's module names), and the helper with which
#: Python 3 writes bytes in protocol 2. Nothing here runs code of the file's choosing.
NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1 and numpy 2
PICKLE_GLOBALS = frozenset(
    [
        *((f"{core}.multiarray", name) for core in NUMPY_CORE for name in ("_reconstruct", "scalar")),
        *((f"{core}.numeric", "_frombuffer") for core in NUMPY_CORE),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    ]
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names something other than arrays, lists, dicts, strings and numbers (:data:`PICKLE_GLOBALS`)."""


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays, lists, dicts, strings, bytes and numbers.

    A pickle can name any importable function and call it while loading (``os.system``, ``open``);
    the published dataset pickles (mini/tiered-ImageNet, CIFAR) need none of that, so any name
    outside :data:`PICKLE_GLOBALS` raises :class:`UnsafePickleError` before it is imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"it names {module}.{name}, which unpickling would import and may call; a dataset pickle holds only "
            "arrays, lists, dicts, strings and numbers, so it was refused"
        )


def load_pickle(stream: IO[bytes], encoding: str = "latin1") -> Any:
    """Unpickle ``stream`` with :class:`ArrayUnpickler`; ``encoding`` decodes Python 2 ``str`` ("bytes" keeps them)."""
    return ArrayUnpickler(stream, encoding=encoding).load()


def read_pickle(path: Path) -> Any:
    """Unpickle ``path`` as data (Python 2 pickles too, see :class:`ArrayUnpickler`); ValueError naming the file.

    The error says whether the file is unreadable (corrupt, truncated) or refused (it would run code).
    """
    try:
        with path.open("rb") as f:
            # latin1 reads the numpy arrays and str of Python 2 pickles, the form most of these files have.
            return load_pickle(f, encoding="latin1")
    except UnsafePickleError as err:
        raise ValueError(
            f"{path} was not loaded: {err}; get the file again from the dataset's official source"
        ) from err
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable pickle ({type(err).__name__}: {err}); the file is corrupt or "
            "truncated: copy or download it again"
        ) from err


__all__ = [
    "ARCHIVE_ERRORS",
    "CachedImageBundle",
    "IMAGE_EXTENSIONS",
    "PICKLE_GLOBALS",
    "ArrayUnpickler",
    "UnsafePickleError",
    "MAX_PIXELS_VARIABLE",
    "UNREADABLE_IMAGE_EXTENSIONS",
    "cache_folder",
    "check_hwc",
    "class_offsets",
    "damaged_archive",
    "decode_image",
    "decode_images",
    "progress",
    "files_stamp",
    "gather_hwc",
    "image_files",
    "group_by_label",
    "inverted",
    "load_cache",
    "load_pickle",
    "read_pickle",
    "read_zip_member",
    "resize_images",
    "rotated_classes",
    "save_cache",
    "warn_class_counts",
    "writable",
]
