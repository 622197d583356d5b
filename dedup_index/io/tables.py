"""Tables on disk: read and write jsonl / json (records) / csv / parquet / pickle.

One reader and one writer for every table the package touches: DataFlow's
:class:`~dedup_index.operator.storage.FileStorage` steps, the CLI's inputs and outputs,
rejects files.  Writes are atomic (:func:`dedup_index.files.atomic_write_with`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..files import atomic_write_with

TABLE_TYPES = ("jsonl", "json", "csv", "parquet", "pickle")
_EXTENSIONS = {
    "jsonl": "jsonl",
    "json": "json",
    "csv": "csv",
    "parquet": "parquet",
    "pickle": "pickle",
    "pkl": "pickle",
}


def type_from_extension(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"cannot tell the file type of {path!r} from its extension {ext!r}; "
            f"use one of: {', '.join(sorted(_EXTENSIONS))}"
        )
    return _EXTENSIONS[ext]


def read_table(path: str | os.PathLike, file_type: str | None = None) -> pd.DataFrame:
    """Read a jsonl/json(records)/csv/parquet/pickle table."""
    path = os.fspath(path)
    file_type = file_type or type_from_extension(path)
    try:
        if file_type == "jsonl":
            if os.path.getsize(path) == 0:
                return pd.DataFrame()
            return pd.read_json(path, lines=True)
        if file_type == "json":
            return pd.read_json(path)
        if file_type == "csv":
            return pd.read_csv(path)
        if file_type == "parquet":
            return pd.read_parquet(path)
        if file_type == "pickle":
            return pd.read_pickle(path)
    except Exception as exc:  # noqa: BLE001 - name the file in whatever went wrong
        raise ValueError(f"failed to read {file_type} file {path!r}: {exc}") from exc
    raise ValueError(f"unsupported file type {file_type!r}; use one of {TABLE_TYPES}")


def write_table(frame: pd.DataFrame, path: str | os.PathLike, file_type: str | None = None) -> None:
    """Write ``frame`` atomically: temp file in the same folder, fsync, rename."""
    path = os.fspath(path)
    file_type = file_type or type_from_extension(path)
    if file_type not in TABLE_TYPES:
        raise ValueError(f"unsupported file type {file_type!r}; use one of {TABLE_TYPES}")

    frame = _printable_frame(frame)

    def write(tmp: str) -> None:
        if file_type == "jsonl":
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False, default_handler=str)
        elif file_type == "json":
            frame.to_json(tmp, orient="records", force_ascii=False, indent=2, default_handler=str)
        elif file_type == "csv":
            frame.to_csv(tmp, index=False)
        elif file_type == "parquet":
            frame.to_parquet(tmp)
        else:
            frame.to_pickle(tmp)

    atomic_write_with(path, write, suffix="." + file_type)


def _printable_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Text that cannot be written as UTF-8 (file names that are not UTF-8, held as
    surrogate-escaped ``str`` or ``Path``) with its bad bytes as ``\\xNN``; nothing else
    changes (the frame is copied only when a value needs it)."""
    from .keys import printable

    def fix(value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            return printable(value) if isinstance(value, str) else value
        return printable(value) if isinstance(value, str) else value

    out = frame
    for column in frame.columns:
        if frame[column].dtype != object:
            continue
        fixed = frame[column].map(fix)
        if not fixed.equals(frame[column]):
            out = out.copy() if out is frame else out
            out[column] = fixed
    return out


def shown_similarity(scores):
    """Similarities as written to files and shown: at most 1.0.  The canonical score of two
    unit float32 rows can exceed 1 by ~1e-8; decisions keep that value, people see 1.0."""
    import numpy as np

    return np.minimum(np.asarray(scores, dtype=np.float64), 1.0)


__all__ = ["TABLE_TYPES", "read_table", "shown_similarity", "type_from_extension", "write_table"]
