"""The one download helper of the bundles that fetch their files (Omniglot, CIFAR-FS/FC100, CUB)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class DownloadError(OSError):
    """A file could not be downloaded (no network, a proxy, an HTTP error).

    An ``OSError``, like the network errors it replaces; the message names the URL that failed and
    the folder and file names where the files can be put by hand.
    """


class Remote(NamedTuple):
    """A file to download: its URL, the name it gets in the data folder, and its MD5 (None: not checked)."""

    url: str
    filename: str
    md5: str | None = None


def download(files: Sequence[Remote], folder: Path, what: str, extract: bool = False) -> None:
    """Fetch every file of ``files`` that ``folder`` lacks, check its MD5 and, with ``extract``, unpack it there.

    Uses torchvision's ``download_url`` (redirects, progress, MD5). A file arrives under a temporary
    name (``.NAME.part``) and takes its own name only once complete and checked, and an archive is
    unpacked into a temporary folder whose entries are then moved into place: a download or an
    unpacking that is stopped half-way leaves no file that looks complete. Raises :class:`DownloadError`
    naming the URL that failed and where to put the files by hand when the network fails, and
    ValueError (after deleting the file) when a download does not have the expected MD5.
    """
    from torchvision.datasets import utils

    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        path = folder / file.filename
        if path.exists():
            if extract:  # fetched earlier (or by hand) but not unpacked
                _unpack(path, folder, what)
            continue
        part = folder / f".{file.filename}.part"
        try:
            # A .part left by a stopped run is reused when its MD5 is right, else fetched again.
            utils.download_url(file.url, str(folder), part.name, md5=file.md5)
        except (OSError, RecursionError) as err:  # URLError, HTTPError, socket errors; too many redirects
            part.unlink(missing_ok=True)
            by_hand = "\n".join(f"  {f.url} -> {folder / f.filename}" for f in files)
            then = "re-run with download=True, which unpacks them" if extract else "re-run with root= that folder"
            raise DownloadError(
                f"could not download {file.url} for {what} ({type(err).__name__}: {err}). Without network, "
                f"fetch the files on a machine that has it and put them in {folder}:\n{by_hand}\nthen {then}"
            ) from err
        except RuntimeError as err:  # torchvision's "File not found or corrupted." after a bad checksum
            part.unlink(missing_ok=True)
            raise ValueError(
                f"the download of {file.url} to {path} failed its MD5 check (expected {file.md5}): {err} "
                f"The file was deleted; re-run with download=True, or fetch {file.url} by hand into {folder}"
            ) from err
        os.replace(part, path)
        if extract:
            _unpack(path, folder, what)


def _unpack(path: Path, folder: Path, what: str) -> None:
    """Unpack an archive, saying so first: a large one takes a while and prints nothing else."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    from torchvision.datasets import utils

    rank_zero_info(f"{what}: unpacking {path.name} ({path.stat().st_size / 2**20:.0f} MB) into {folder} ...")
    staging = folder / f".{path.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)  # left by an unpacking that was stopped
    try:
        utils.extract_archive(str(path), str(staging))
        for entry in sorted(staging.iterdir()):
            if not (folder / entry.name).exists():  # never over what is there (a user's own copy)
                os.replace(entry, folder / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["DownloadError", "Remote", "download"]
