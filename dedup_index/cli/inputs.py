"""Read what ``dedup-index run INPUT`` (and ``index add/query``) is given into a table.

Three kinds of input, told apart by what the path is:

- a folder: every image file under it, recursively (extensions in :data:`IMAGE_EXTENSIONS`,
  any case; hidden files and folders skipped), one row per file sorted by relative path,
  the path relative to the folder in the image column; images load relative to the folder;
- a table, ``.jsonl`` / ``.json`` (records) / ``.csv`` / ``.parquet``: read as it is, the
  image column named by ``--image-key``;
- a text file of paths (``.txt``, ``.lst``, ``.list``): one path per line, blank lines and
  lines starting with ``#`` skipped.

Every problem (missing input, empty table, no image column, unknown extension) is a
:class:`~dedup_index.cli._common.UsageError`, raised before any image is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import TABLE_FORMATS, UsageError

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
    """Read ``path`` (folder, table or text file of paths) and check its image column."""
    import pandas as pd

    source = Path(path)
    if not source.exists():
        raise UsageError(f"input {str(source)!r} does not exist")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise UsageError(f"--image-root {str(root)!r} is not a folder")
    if source.is_dir():
        if root is not None:
            raise UsageError(
                "--image-root is for table and text inputs; a folder input's images are "
                "found (and loaded) relative to the folder itself"
            )
        files = list_images(source)
        if not files:
            raise UsageError(
                f"no image files under {str(source)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "any case, recursively)"
            )
        frame = pd.DataFrame({image_key: files})
        return Input(source, "folder", frame, image_key, "jsonl", source)
    suffix = source.suffix.lower()
    if suffix in TABLE_FORMATS:
        from ..operator.storage import read_table

        try:
            frame = read_table(source, TABLE_FORMATS[suffix])
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        fmt = TABLE_FORMATS[suffix]
        kind = "table"
    elif suffix in TEXT_EXTENSIONS:
        lines = source.read_text(encoding="utf-8").splitlines()
        paths = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
        frame = pd.DataFrame({image_key: paths})
        fmt, kind = "jsonl", "text"
    else:
        raise UsageError(
            f"cannot tell what {str(source)!r} is from its extension {suffix or '(none)'!r}: "
            f"give a folder, a table ({', '.join(TABLE_FORMATS)}) or a text file of paths "
            f"({', '.join(TEXT_EXTENSIONS)})"
        )
    if len(frame) == 0:
        raise UsageError(f"input {str(source)!r} has no rows: nothing to deduplicate")
    if image_key not in frame.columns:
        raise UsageError(
            f"image column {image_key!r} not found in {str(source)!r}; its columns are "
            f"{', '.join(map(str, frame.columns))} (pass --image-key COLUMN)"
        )
    return Input(source, kind, frame, image_key, fmt, root)


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as POSIX paths relative to it, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(found)


def row_key(value: Any, row: int) -> str:
    """A readable key for a row's image value: its path, else ``row N``."""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return value["path"]
    return f"row {row}"
