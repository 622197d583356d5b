"""Durable file writes shared by the stages that persist things (storage, index)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort where directories can't be opened)."""
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


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask.

    ``tempfile.mkstemp`` creates 0600 files; a temp file renamed into place keeps that mode,
    so outputs meant for other users and tools get this one before the rename.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> str:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write_with`); returns its
    SHA-256 hex digest."""
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(payload))
    return hashlib.sha256(payload).hexdigest()


def atomic_write_with(
    path: str | os.PathLike, write: Callable[[str], object], suffix: str = ""
) -> None:
    """Create ``path`` atomically with a writer that takes a file path (pandas, pyarrow):
    ``write(tmp)`` fills a temp file in the same folder (created if missing), which is
    then fsynced, given the umask's mode and renamed over ``path``; the folder is fsynced.
    On any error the temp file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
