"""Immutable row segments: one ``.npy`` file per batch of rows, read as one array.

The persistent index appends rows by writing a *new* file per ``add`` (never touching a
file written before) and lists the files in its manifest; :class:`SegmentedRows` reads
the listed files, memory-mapped, as one ``(N, D)`` float32 array-like, like an
:class:`~dedup_index.store.EmbeddingStore`: ``len``, ``.shape``, ``x[a:b]``, ``x[k]`` and
``x[int_array]`` return fresh float32 arrays.  Objects are immutable: :meth:`with_part`
returns a new view sharing the old parts, so a reader holding one keeps seeing the rows it
had (a snapshot) while a writer appends.  An open memory map also keeps its file readable
after a compaction unlinks it.

:func:`write_rows_file` writes a segment atomically (temp file, fsync, rename, via
:mod:`dedup_index.files`) block by block, so a segment larger than memory (a compaction
of a store) never needs a full copy; it returns the file's SHA-256 for the manifest.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_with, sha256_file
from .embeddings import StoreError

__all__ = ["SegmentedRows", "open_rows_file", "write_rows_file"]

#: Rows copied per block while writing a segment (bounds the float32 scratch).
WRITE_BLOCK = 65_536


def write_rows_file(
    path: str | os.PathLike,
    rows: Any,
    dtype: str = "float32",
    *,
    block: int = WRITE_BLOCK,
) -> str:
    """Write ``rows`` (an ``(n, D)`` array or array-like with slicing) as a ``.npy`` of
    ``dtype`` atomically; returns its SHA-256 hex digest."""
    n, d = rows.shape

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
        for a in range(0, n, block):
            out[a : a + block] = rows[a : min(n, a + block)]
        out.flush()
        del out

    atomic_write_with(path, write, suffix=".npy")
    return sha256_file(path)


def open_rows_file(path: str | os.PathLike, count: int, dim: int) -> np.ndarray:
    """Memory-map a segment written by :func:`write_rows_file`, checking its shape (a
    missing, truncated or foreign file raises :class:`StoreError` naming it)."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"rows file {path} is missing") from None
    except (ValueError, OSError) as err:
        raise StoreError(f"rows file {path} is not a readable .npy file: {err}") from err
    if arr.shape != (count, dim) or arr.dtype not in (np.float32, np.float16):
        raise StoreError(
            f"rows file {path} holds {arr.dtype} {arr.shape}; the manifest says "
            f"({count}, {dim}) (the file is damaged)"
        )
    return arr


class SegmentedRows:
    """The concatenation of row parts (memory-mapped ``.npy`` arrays, or any array-like
    with ``shape``, slicing and integer-array indexing) as one float32 array-like."""

    def __init__(self, parts: Iterable[Any], dim: int) -> None:
        self._parts = tuple(parts)
        self._dim = int(dim)
        sizes = [int(p.shape[0]) for p in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.shape = (int(self._starts[-1]), self._dim)

    @property
    def parts(self) -> tuple:
        return self._parts

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def with_part(self, part: Any) -> SegmentedRows:
        """A new view with ``part`` appended (this one is unchanged)."""
        return SegmentedRows([*self._parts, part], self._dim)

    def __getitem__(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            k = int(key)
            if not -n <= k < n:
                raise IndexError(f"row {k} is out of bounds for {n} rows")
            return self._range(k % n, k % n + 1)[0]
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step == 1:
                return self._range(a, max(a, b))
            return self._gather(np.arange(a, b, step, dtype=np.int64))
        idx = np.asarray(key)
        if idx.dtype == np.bool_:
            return self._gather(np.flatnonzero(idx))
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"rows are indexed by integers; got {idx.dtype}")
        flat = self._gather(idx.reshape(-1).astype(np.int64, copy=False))
        return flat.reshape(idx.shape + (self._dim,))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self._range(0, self.shape[0])
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def _range(self, a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, self._dim), dtype=np.float32)
        if b <= a:
            return out
        p = int(np.searchsorted(self._starts, a, side="right")) - 1
        r = a
        while r < b:
            s0, s1 = int(self._starts[p]), int(self._starts[p + 1])
            take = min(b, s1) - r
            if take > 0:
                out[r - a : r - a + take] = self._parts[p][r - s0 : r - s0 + take]
                r += take
            p += 1
        return out

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        out = np.empty((idx.shape[0], self._dim), dtype=np.float32)
        if idx.shape[0] == 0:
            return out
        if ((idx < -n) | (idx >= n)).any():
            raise IndexError(f"a row index is out of bounds for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        part = np.searchsorted(self._starts, idx, side="right") - 1
        if len(self._parts) == 1:
            out[:] = self._parts[0][idx]
            return out
        for p in np.unique(part):
            pos = np.flatnonzero(part == p)
            out[pos] = self._parts[int(p)][idx[pos] - self._starts[p]]
        return out
