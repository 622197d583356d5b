"""Input discovery: a folder, a table or a list of paths read into a table of image values.

What ``dedup-index run INPUT``, ``index add/query`` and the Ray path
(:func:`dedup_index.distributed.embed_table`) are given, read one way for all of them.

Three kinds of input, told apart by what the path is:

- a folder: every image file under it, recursively (extensions in :data:`IMAGE_EXTENSIONS`,
  any case; hidden files and folders skipped), one row per file sorted by relative path,
  the path relative to the folder in the image column; images load relative to the folder;
- a table, ``.jsonl`` / ``.json`` (records) / ``.csv`` / ``.parquet``: read as it is, the
  image column named by ``--image-key``;
- a text file of paths (``.txt``, ``.lst``, ``.list``): one path per line, blank lines and
  lines starting with ``#`` skipped.

Every problem (missing input, empty table, no image column, unknown extension) is an
:class:`InputError` (a ``ValueError``), raised before any image is touched; the CLI turns
it into its exit code 2.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DedupIndexError

logger = logging.getLogger(__name__)

#: Table formats read (and written by the CLI), by file extension.
TABLE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)
TEXT_EXTENSIONS = (".txt", ".lst", ".list")


class InputError(DedupIndexError, ValueError):
    """The input cannot be read as a table of images (missing, empty, no image column)."""


@dataclass
class Input:
    """A table to deduplicate and where it came from.

    ``kind`` is ``"folder"``, ``"table"`` or ``"text"``; ``format`` the table format the
    kept rows are written in by default (``jsonl`` for folders and text files);
    ``image_root`` the folder relative image paths resolve against (None: the current
    directory).
    """

    path: Path
    kind: str
    frame: Any  # pandas.DataFrame
    image_key: str
    format: str
    image_root: Path | None


def read_input(path: str | os.PathLike, image_key: str, image_root: str | None = None) -> Input:
    """Read ``path`` (folder, table or text file of paths) and check its image column.

    Raises :class:`InputError` naming the problem."""
    import pandas as pd

    source = Path(path)
    if not source.exists():
        raise InputError(f"input {str(source)!r} does not exist")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise InputError(f"--image-root {str(root)!r} is not a folder")
    if source.is_dir():
        if root is not None:
            raise InputError(
                "--image-root is for table and text inputs; a folder input's images are "
                "found (and loaded) relative to the folder itself"
            )
        files = list_images(source)
        if not files:
            raise InputError(
                f"no image files under {str(source)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "any case, recursively)"
            )
        # object dtype: a name that is not UTF-8 (kept as Python's surrogate-escaped str, so
        # it still opens) cannot go into an Arrow string column.
        frame = pd.DataFrame({image_key: pd.Series(files, dtype=object)})
        return Input(source, "folder", frame, image_key, "jsonl", source)
    suffix = source.suffix.lower()
    if suffix in TABLE_FORMATS:
        from .tables import read_table

        try:
            frame = read_table(source, TABLE_FORMATS[suffix])
        except ValueError as exc:
            raise InputError(str(exc)) from None
        fmt = TABLE_FORMATS[suffix]
        kind = "table"
    elif suffix in TEXT_EXTENSIONS:
        raw = source.read_bytes()
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise InputError(
                f"the list file {str(source)!r} is not UTF-8 text (line {line}, byte "
                f"{raw[exc.start]:#04x}); write its paths as UTF-8, or put the images in a "
                "folder and pass the folder (names that are not UTF-8 are read there)"
            ) from None
        paths = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
        frame = pd.DataFrame({image_key: paths})
        fmt, kind = "jsonl", "text"
    else:
        raise InputError(
            f"cannot tell what {str(source)!r} is from its extension {suffix or '(none)'!r}: "
            f"give a folder, a table ({', '.join(TABLE_FORMATS)}) or a text file of paths "
            f"({', '.join(TEXT_EXTENSIONS)})"
        )
    if len(frame) == 0:
        raise InputError(f"input {str(source)!r} has no rows: nothing to deduplicate")
    if image_key not in frame.columns:
        raise InputError(
            f"image column {image_key!r} not found in {str(source)!r}; its columns are "
            f"{', '.join(map(str, frame.columns))} (pass --image-key COLUMN)"
        )
    return Input(source, kind, frame, image_key, fmt, root)


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as POSIX paths relative to it, sorted.

    What is skipped, and how the user is told (a WARNING each, with counts and examples):
    hidden files and folders (names starting with ``.``: silently, by convention); folders
    that cannot be read (permission); symlinked folders (not followed: a link can loop or
    leave the collection; link the files, or pass the target folder).  Symlinked *files* are
    listed.  A top-level folder that cannot be read is an :class:`InputError`.
    """
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"cannot read the folder {str(folder)!r} (permission denied)")
    found: list[str] = []
    unreadable: list[str] = []
    linked: list[str] = []

    def note(err: OSError) -> None:
        unreadable.append(f"{err.filename} ({err.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=note, followlinks=False):
        kept = []
        for d in dirnames:
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                linked.append(Path(dirpath, d).relative_to(folder).as_posix())
                continue
            kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(Path(dirpath, name).relative_to(folder).as_posix())
    if unreadable:
        logger.warning(
            "%d folder(s) under %s could not be read and were skipped: %s",
            len(unreadable),
            folder,
            "; ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""),
        )
    if linked:
        logger.warning(
            "%d symlinked folder(s) under %s were not followed: %s (pass the target folder, "
            "or link the files)",
            len(linked),
            folder,
            ", ".join(linked[:5]) + (" ..." if len(linked) > 5 else ""),
        )
    return sorted(found)


__all__ = [
    "IMAGE_EXTENSIONS",
    "TABLE_FORMATS",
    "TEXT_EXTENSIONS",
    "Input",
    "InputError",
    "list_images",
    "read_input",
]
