"""``FileStorage``: DataFlow's file storage, same constructor, steps and file names.

Step 0 reads ``first_entry_file_name`` (its type from its extension); a write at step
``n`` goes to ``{cache_path}/{file_name_prefix}_step{n + 1}.{cache_type}``, which the
next step reads.  Pipelines call ``op.run(storage=storage.step(), ...)``.  Beyond
DataFlow's: writes are atomic (temp file, fsync, rename), and reading a step that was
never written, or before ``step()``, says which file is missing and why.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from ..io.tables import TABLE_TYPES, read_table, type_from_extension, write_table
from ..validation import check_choice

#: DataFlow's cache types: the table types of :mod:`dedup_index.io.tables`.
CACHE_TYPES = TABLE_TYPES


class FileStorage:
    """DataFlow-compatible storage on local files (see module docstring)."""

    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache",
        file_name_prefix: str = "dataflow_cache",
        cache_type: str = "jsonl",
    ) -> None:
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = check_choice(cache_type, CACHE_TYPES, "cache_type")
        self.operator_step = -1

    def step(self) -> FileStorage:
        """Advance to the next step; returns ``self`` for ``op.run(storage=storage.step())``."""
        self.operator_step += 1
        return self

    def reset(self) -> FileStorage:
        self.operator_step = -1
        return self

    def file_path(self, step: int) -> str:
        """The file step ``step`` reads (step 0: the first entry file)."""
        if step == 0:
            return os.path.join(self.first_entry_file_name)
        return os.path.join(
            self.cache_path, f"{self.file_name_prefix}_step{step}.{self.cache_type}"
        )

    # DataFlow's private name, kept for code that calls it.
    _get_cache_file_path = file_path

    def side_file_path(self, suffix: str, extension: str = "jsonl") -> str:
        """A companion file of the next write, e.g. ``{prefix}_step{n+1}_rejects.jsonl``."""
        return os.path.join(
            self.cache_path,
            f"{self.file_name_prefix}_step{self.operator_step + 1}_{suffix}.{extension}",
        )

    def read(self, output_type: str = "dataframe") -> Any:
        """Read the current step as a DataFrame (``"dataframe"``) or records (``"dict"``)."""
        check_choice(output_type, ("dataframe", "dict"), "output_type")
        if self.operator_step < 0:
            raise RuntimeError(
                "FileStorage.read() before step(): call storage.step() first "
                "(pipelines pass storage=storage.step() to op.run)"
            )
        path = self.file_path(self.operator_step)
        if self.operator_step == 0:
            if str(path).startswith(("hf:", "ms:")):
                raise ValueError(
                    f"first_entry_file_name {path!r} names a remote dataset; dedup-index reads "
                    "local files only: export it to jsonl/parquet first"
                )
            file_type = type_from_extension(path)
        else:
            file_type = self.cache_type
        if not os.path.exists(path):
            what = (
                "first entry file"
                if self.operator_step == 0
                else (f"step {self.operator_step} file (written by the previous step's write())")
            )
            raise FileNotFoundError(f"FileStorage: {what} {path!r} does not exist")
        frame = read_table(path, file_type)
        return frame if output_type == "dataframe" else frame.to_dict(orient="records")

    def write(self, data: Any) -> str:
        """Write a DataFrame (or list of dicts) as the next step's input; returns its path."""
        if isinstance(data, list) and all(isinstance(r, dict) for r in data):
            frame = pd.DataFrame(data)
        elif isinstance(data, pd.DataFrame):
            frame = data
        else:
            raise TypeError(
                f"FileStorage.write takes a DataFrame or a list of dicts, got {type(data).__name__}"
            )
        path = self.file_path(self.operator_step + 1)
        write_table(frame, path, self.cache_type)
        return path


__all__ = ["CACHE_TYPES", "FileStorage", "read_table", "write_table"]
