"""The one download helper of the bundles that fetch their files (Omniglot, CIFAR-FS/FC100, CUB)."""

from __future__ import annotations

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

    Uses torchvision's ``download_url`` (redirects, progress, MD5). Raises :class:`DownloadError`
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
        try:
            utils.download_url(file.url, str(folder), file.filename, md5=file.md5)
        except (OSError, RecursionError) as err:  # URLError, HTTPError, socket errors; too many redirects
            path.unlink(missing_ok=True)
            by_hand = "\n".join(f"  {f.url} -> {folder / f.filename}" for f in files)
            then = "re-run with download=True, which unpacks them" if extract else "re-run with root= that folder"
            raise DownloadError(
                f"could not download {file.url} for {what} ({type(err).__name__}: {err}). Without network, "
                f"fetch the files on a machine that has it and put them in {folder}:\n{by_hand}\nthen {then}"
            ) from err
        except RuntimeError as err:  # torchvision's "File not found or corrupted." after a bad checksum
            path.unlink(missing_ok=True)
            raise ValueError(
                f"the download of {file.url} to {path} failed its MD5 check (expected {file.md5}): {err} "
                f"The file was deleted; re-run with download=True, or fetch {file.url} by hand into {folder}"
            ) from err
        if extract:
            _unpack(path, folder, what)


def _unpack(path: Path, folder: Path, what: str) -> None:
    """Unpack an archive, saying so first: a large one takes a while and prints nothing else."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    from torchvision.datasets import utils

    rank_zero_info(f"{what}: unpacking {path.name} ({path.stat().st_size / 2**20:.0f} MB) into {folder} ...")
    utils.extract_archive(str(path), str(folder))


__all__ = ["DownloadError", "Remote", "download"]
