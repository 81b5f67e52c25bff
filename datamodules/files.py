"""Files we write, written atomically: a reader never sees half a file, and a failed write leaves the old one.

Every file lightning-meta owns (image caches, checkpoints, prediction CSVs) goes through
:func:`atomic_file`: the content is written to a temporary file in the same folder, flushed to the
disk (``fsync``) and renamed over the target, which is atomic on POSIX file systems. A write that
fails (a full disk, a quota, a read-only folder) deletes the temporary file and raises
:class:`WriteError`, naming the file, the free space of its disk and the error that came first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """A file could not be written; the message names it, the free space on its disk and the cause."""


def format_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps it at 1 or more, e.g. ``"1.5 GiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def free_space(folder: Path) -> str:
    """``"<n> free"`` on the disk of ``folder`` (or its nearest existing parent), for error messages."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return f"{format_bytes(shutil.disk_usage(candidate).free)} free"
            except OSError:
                break
    return "free space unknown"


def _sync_folder(folder: Path) -> None:
    # The rename is durable once the folder's entry is on disk; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, what: str = "file", text: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path`` atomically.

    ::

        with atomic_file(out, "predictions CSV", text=True) as f:
            csv.writer(f).writerows(rows)

    On any error the temporary file is deleted and ``path`` is left as it was (the old file, or
    none). An ``OSError`` or ``RuntimeError`` (``torch.save`` reports a full disk as one) becomes a
    :class:`WriteError` naming ``what``, the path and the free space on its disk; when the write
    itself happens while an earlier error is being handled (a checkpoint saved on an exception),
    that earlier error is named too, so the first cause is not hidden.

    Args:
        path: the file to write.
        what: what the file is, for messages ("checkpoint", "image cache").
        text: open in text mode (UTF-8, no newline translation) instead of binary.
    """
    path = Path(path)
    earlier = sys.exc_info()[1]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 gives the permissions of a plain open() (the umask applies), unlike mkstemp's 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(err, OSError | RuntimeError) and not isinstance(err, WriteError):
            message = (
                f"could not write the {what} {path} ({type(err).__name__}: {err}); {free_space(path.parent)} on "
                f"that disk; {'the previous file is unchanged' if path.exists() else 'no file was left'}; free "
                "some space or write elsewhere"
            )
            if earlier is not None and earlier is not err:
                message += f". This write followed an earlier error: {type(earlier).__name__}: {earlier}"
            raise WriteError(message) from err
        raise
    _sync_folder(path.parent)


__all__ = ["WriteError", "atomic_file", "format_bytes", "free_space"]
