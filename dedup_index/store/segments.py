"""Immutable row segments: one ``.npy`` file per batch of rows, read as one array.

The persistent index appends rows by writing a *new* file per ``add`` (never touching a
file written before) and lists the files in its manifest; :class:`SegmentedRows` reads
the listed files, memory-mapped, as one ``(N, D)`` float32 array-like, like an
:class:`~dedup_index.store.EmbeddingStore`: ``len``, ``.shape``, ``x[a:b]``, ``x[k]`` and
``x[int_array]`` return fresh float32 arrays.  Objects are immutable: :meth:`with_part`
returns a new view sharing the old parts, so a reader holding one keeps seeing the rows it
had (a snapshot) while a writer appends.  An open memory map also keeps its file readable
after a compaction unlinks it.

:func:`write_rows_segment` writes a segment atomically (temp file, fsync, rename, via
:mod:`dedup_index.files`) block by block, so a segment larger than memory (a compaction
of a store) never needs a full copy, and beside it a small *block-checksum* file
(:func:`blocks_name`: ``rows-000001.blocks.json``) with the SHA-256 of every ~1 MiB block
of its rows (:mod:`dedup_index.store.blocks`); it returns the SHA-256 of both files for the
manifest.  :func:`open_rows_file` given the block file checks each block the first time a
row in it is read (:class:`BlockCheckedRows`), so opening and querying a segment of
millions of rows never waits for the whole file to be hashed, and no answer is computed
from a block whose bytes changed.  Segments written before block files existed (only a
whole-file SHA-256 in the manifest) are checked whole on first read (:class:`CheckedRows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_with, sha256_file, write_json_atomic
from .blocks import (
    HashingThread,
    block_rows_for,
    check_gather,
    check_range,
    digest,
    n_blocks,
)
from .embeddings import FOLIO_BYTES, StoreCorruptError, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "BlockCheckedRows",
    "CheckedRows",
    "SegmentedRows",
    "blocks_name",
    "open_rows_file",
    "write_rows_file",
    "write_rows_segment",
]

#: Rows copied per block while writing a segment (bounds the float32 scratch).
WRITE_BLOCK = 65_536


#: Blocks read and hashed at a time while a segment's checksums are computed.
HASH_CHUNK_BLOCKS = 64
#: ``format`` of a block-checksum file.
BLOCKS_FORMAT = "dedup_index.row_blocks"


def blocks_name(name: str) -> str:
    """The block-checksum file of the rows file ``name`` (``rows/rows-000001.npy`` ->
    ``rows/rows-000001.blocks.json``), relative to the same folder."""
    return (name[:-4] if name.endswith(".npy") else name) + ".blocks.json"


def write_rows_file(
    path: str | os.PathLike,
    rows: Any,
    dtype: str = "float32",
    *,
    block: int = WRITE_BLOCK,
) -> str:
    """Write ``rows`` (an ``(n, D)`` array or array-like with slicing) as a ``.npy`` of
    ``dtype`` atomically; returns its SHA-256 hex digest (no block-checksum file: see
    :func:`write_rows_segment`)."""
    _write_npy(Path(path), rows, dtype, block)
    return sha256_file(path)


def write_rows_segment(
    root: str | os.PathLike,
    name: str,
    rows: Any,
    dtype: str = "float32",
    *,
    block: int = WRITE_BLOCK,
) -> dict[str, str]:
    """Write ``rows`` as the segment ``root/name`` (a ``.npy``, as :func:`write_rows_file`)
    and its block-checksum file ``root/blocks_name(name)``, each atomically; returns
    ``{name: sha256, blocks_name(name): sha256}`` for the manifest's checksums.

    The rows file is read back once (from the page cache) to hash it whole (what
    ``index verify`` checks) and block by block (what reads check) in the same pass."""
    root = Path(root)
    path = root / name
    _write_npy(path, rows, dtype, block)
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    offset, (n, d) = int(arr.offset), arr.shape
    row_bytes = d * arr.dtype.itemsize
    del arr
    block_rows = block_rows_for(row_bytes)
    whole = hashlib.sha256()
    digests: list[str] = []
    block_bytes = block_rows * row_bytes
    with open(path, "rb") as f:
        whole.update(f.read(offset))
        left = n * row_bytes
        for _ in range(0, n_blocks(n, block_rows), HASH_CHUNK_BLOCKS):
            # At most what is left: read(k) allocates k bytes first (64 MiB per add).
            data = f.read(min(HASH_CHUNK_BLOCKS * block_bytes, left))
            left -= len(data)
            blocks = HashingThread(b"", data, block_bytes)  # both hashes at once
            whole.update(data)
            digests += blocks.result()
        whole.update(f.read())  # nothing, for a file np.save wrote; hashed all the same
    sums_name = blocks_name(name)
    record = {
        "format": BLOCKS_FORMAT,
        "version": 1,
        "algorithm": "sha256",
        "rows_file": Path(name).name,
        "count": int(n),
        "dim": int(d),
        "dtype": np.dtype(dtype).name,
        "data_offset": offset,
        "block_rows": block_rows,
        "sha256": digests,
    }
    return {name: whole.hexdigest(), sums_name: write_json_atomic(root / sums_name, record)}


def _write_npy(path: Path, rows: Any, dtype: str, block: int) -> None:
    n, d = rows.shape

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
        for a in range(0, n, block):
            out[a : a + block] = rows[a : min(n, a + block)]
        out.flush()
        del out

    atomic_write_with(path, write, suffix=".npy")


def open_rows_file(
    path: str | os.PathLike,
    count: int,
    dim: int,
    sha256: str | None = None,
    *,
    blocks: str | os.PathLike | None = None,
    blocks_sha256: str | None = None,
) -> Any:
    """Memory-map a segment written by :func:`write_rows_segment` (or
    :func:`write_rows_file`), checking its shape (a missing, truncated or foreign file
    raises :class:`StoreError` naming it).  Opening hashes no rows.

    With ``blocks`` (its block-checksum file, and ``blocks_sha256``, that file's SHA-256
    from the manifest) the rows come as a :class:`BlockCheckedRows`: each ~1 MiB block is
    checked the first time a row in it is read.  Else with ``sha256`` (the whole file's)
    as a :class:`CheckedRows`: the whole file is hashed on the first read.  A mismatch
    raises :class:`~dedup_index.store.StoreCorruptError` instead of giving an answer
    computed from damaged bytes."""
    path = Path(path)
    arr = _open_rows(path, count, dim)
    if blocks is not None and (sha256 is None or Path(blocks).exists()):
        digests, block_rows = _read_blocks_file(Path(blocks), blocks_sha256, arr, path)
        return BlockCheckedRows(arr, path, digests, block_rows, Path(blocks))
    if blocks is not None:  # e.g. deleted by an older dedup_index that did not list it
        logger.warning(
            "block-checksum file %s is missing: %s is checked whole on its first read "
            "instead (`dedup-index index compact` writes it again)",
            blocks,
            path,
        )
    return arr if sha256 is None else CheckedRows(arr, path, sha256)


def _read_blocks_file(
    sums: Path, sha256: str | None, arr: np.ndarray, rows_path: Path
) -> tuple[list[str], int]:
    """The block digests and rows per block a block-checksum file records for ``arr``,
    the file checked against ``sha256`` and against the rows file's shape."""
    try:
        payload = sums.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"block-checksum file {sums} (of {rows_path.name}) is missing") from None
    if sha256 is not None and digest(payload) != sha256:
        raise StoreCorruptError(
            f"block-checksum file {sums} is damaged: its SHA-256 does not match the one "
            "recorded in the manifest (no result was computed from its rows); restore the "
            "index from a copy, or rebuild it"
        )
    try:
        rec = json.loads(payload)
        block_rows, digests = int(rec["block_rows"]), rec["sha256"]
        good = (
            rec["format"] == BLOCKS_FORMAT
            and rec["algorithm"] == "sha256"
            and rec["count"] == arr.shape[0]
            and rec["dim"] == arr.shape[1]
            and rec["dtype"] == arr.dtype.name
            and rec["data_offset"] == arr.offset
            and block_rows >= 1
            and isinstance(digests, list)
            and len(digests) == n_blocks(arr.shape[0], block_rows)
            and all(isinstance(x, str) and len(x) == 64 for x in digests)
        )
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"block-checksum file {sums} is not readable: {err}") from err
    if not good:
        raise StoreError(
            f"block-checksum file {sums} does not describe {rows_path} "
            f"({arr.dtype} {arr.shape}): one of them is damaged"
        )
    return digests, block_rows


class BlockCheckedRows:
    """A memory-mapped segment whose rows are checked block by block on first read.

    Each ~1 MiB block is hashed the first time any row in it is read and compared with
    the SHA-256 recorded when it was written (:mod:`dedup_index.store.blocks`); a block
    that differs raises :class:`~dedup_index.store.StoreCorruptError` naming the file and
    its rows on every read that touches it, while rows in other blocks still answer.
    Supports what :class:`SegmentedRows` asks of a part: ``shape``, ``dtype``, ``len``,
    ``x[k]``, ``x[a:b]`` and integer or boolean array indexing."""

    def __init__(
        self, rows: np.ndarray, path: Path, digests: list[str], block_rows: int, sums: Path
    ) -> None:
        self._rows, self._path, self._sums = rows, path, sums
        self._digests, self._block_rows = digests, block_rows
        self._checked = np.zeros(len(digests), dtype=bool)
        self.shape = rows.shape
        self.dtype = rows.dtype
        self.ndim = rows.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def _corrupt(self, lo: int, hi: int) -> StoreCorruptError:
        return StoreCorruptError(
            f"rows file {self._path} is damaged: the bytes of its rows {lo}-{hi - 1} do not "
            f"match the SHA-256 recorded in {self._sums.name} when they were written (no "
            "result was computed from them); restore the index from a copy, or rebuild it"
        )

    def _check_range(self, a: int, b: int) -> None:
        check_range(self._rows, a, b, self._digests, self._checked, self._block_rows, self._corrupt)

    def __getitem__(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        first = key[0] if isinstance(key, tuple) and key else key
        if isinstance(first, numbers.Integral) and not isinstance(first, bool):
            k = int(first)
            if not -n <= k < n:
                raise IndexError(f"row {k} is out of bounds for {n} rows")
            self._check_range(k % n, k % n + 1)
        elif isinstance(first, slice):
            a, b, step = first.indices(n)
            if step == 1:
                self._check_range(a, max(a, b))
            else:
                self._check_gather(np.arange(a, b, step, dtype=np.int64))
        else:
            idx = np.asarray(first)
            if idx.dtype == np.bool_:
                idx = np.flatnonzero(idx)
            elif idx.size and idx.dtype.kind not in "iu":
                raise IndexError(f"rows are indexed by integers; got {idx.dtype}")
            idx = idx.reshape(-1).astype(np.int64, copy=False)
            if ((idx < -n) | (idx >= n)).any():
                raise IndexError(f"a row index is out of bounds for {n} rows")
            self._check_gather(np.where(idx < 0, idx + n, idx))
        return self._rows[key]

    def _check_gather(self, idx: np.ndarray) -> None:
        check_gather(self._rows, idx, self._digests, self._checked, self._block_rows, self._corrupt)

    def release_pages(self) -> None:
        """Map the file again (:func:`remap`): the pages reads touched leave this
        process's RSS; blocks already checked stay checked."""
        self._rows = remap(self._rows)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        self._check_range(0, self.shape[0])
        arr = np.asarray(self._rows)
        return arr if dtype is None else arr.astype(dtype, copy=False)


class CheckedRows:
    """A memory-mapped segment whose file is checked against its SHA-256 on first read
    (a segment with no block-checksum file: see :class:`BlockCheckedRows`).

    Segments are immutable, so one whole-file check per process is enough; it costs one
    read of the file (about 1 s per GB), paid by the first query or add that touches the
    segment rather than by ``open``.  Supports what :class:`SegmentedRows` asks of a
    part: ``shape``, ``dtype``, ``len``, slicing and integer-array indexing."""

    def __init__(self, rows: np.ndarray, path: Path, sha256: str) -> None:
        self._rows, self._path, self._sha256 = rows, path, sha256
        self._checked = False
        self.shape = rows.shape
        self.dtype = rows.dtype
        self.ndim = rows.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def _check(self) -> np.ndarray:
        if not self._checked:
            if sha256_file(self._path) != self._sha256:
                raise StoreCorruptError(
                    f"rows file {self._path} is damaged: its SHA-256 does not match the one "
                    "recorded when it was written (no result was computed from it); restore "
                    "the index from a copy, or rebuild it"
                )
            self._checked = True
        return self._rows

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._check()[key]

    def release_pages(self) -> None:
        """Map the file again (:func:`remap`): the pages reads touched leave this
        process's RSS."""
        self._rows = remap(self._rows)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = np.asarray(self._check())
        return arr if dtype is None else arr.astype(dtype, copy=False)


def remap(arr: Any) -> Any:
    """A fresh read-only map of the ``.npy`` file that ``arr`` (``np.load(...,
    mmap_mode="r")``) maps, the same rows, so the old map (and with it every page reads
    touched, counted in the process's RSS as ``RssFile`` while it lives) can go: the
    pages stay in the OS page cache.  ``arr`` itself when it is no map, or its file is
    gone (a retired segment keeps its old map) or changed shape."""
    filename = getattr(arr, "filename", None)
    if not isinstance(arr, np.memmap) or filename is None:
        return arr
    try:
        fresh = np.load(filename, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return arr
    if fresh.shape != arr.shape or fresh.dtype != arr.dtype or fresh.offset != arr.offset:
        return arr
    return fresh


def _open_rows(path: Path, count: int, dim: int) -> np.ndarray:
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


class RowRange:
    """Rows ``[a, b)`` of an array-like ``base`` (a store, a rows file, a
    :class:`SegmentedRows`), indexed like an array: slices, integers and integer arrays
    relative to ``a``; nothing is read until indexed."""

    def __init__(self, base: Any, a: int, b: int) -> None:
        self.base, self.a, self.b = base, int(a), int(b)
        self.shape = (self.b - self.a, int(base.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            lo, hi, _ = key.indices(self.shape[0])
            return self.base[self.a + lo : self.a + hi]
        return self.base[np.asarray(key, dtype=np.int64) + self.a]


class SegmentedRows:
    """The concatenation of row parts (memory-mapped ``.npy`` arrays, or any array-like
    with ``shape``, slicing and integer-array indexing) as one float32 array-like."""

    def __init__(self, parts: Iterable[Any], dim: int, *, release_after: int | None = None) -> None:
        self._parts = tuple(parts)
        self._dim = int(dim)
        sizes = [int(p.shape[0]) for p in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.shape = (int(self._starts[-1]), self._dim)
        #: With ``release_after`` (bytes): :meth:`release_pages` each time reads may
        #: have mapped that many bytes (:meth:`_touched`), so one long pass over every
        #: row (the one-pass build of :meth:`DedupIndex.add_store`) keeps the mapped
        #: pages in the RSS bounded, as :class:`~dedup_index.store.EmbeddingStore`
        #: bounds its own maps.
        self._release_after = release_after
        self._read = 0

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

    def release_pages(self) -> None:
        """Drop the pages reads touched through the parts' memory maps from this
        process's RSS (each part mapped again: :func:`remap`); the rows are unchanged.
        A long writer (:meth:`DedupIndex.add_store`) calls it between batches: a mapped
        page a read touched otherwise stays in the RSS as long as its map lives."""
        for part in self._parts:
            if hasattr(part, "release_pages"):
                part.release_pages()
        self._parts = tuple(remap(part) for part in self._parts)

    def with_part(self, part: Any) -> SegmentedRows:
        """A new view with ``part`` appended (this one is unchanged)."""
        return SegmentedRows([*self._parts, part], self._dim)

    def _touched(self, nbytes: int) -> None:
        """Count ``nbytes`` a read may have mapped (with ``release_after``: release the
        pages past it).  Reads through a map bring whole page-cache folios into the RSS
        (:data:`~dedup_index.store.embeddings.FOLIO_BYTES` a fault), so a gather counts
        ``FOLIO_BYTES`` a row, at most its part's size, and releases part by part: a
        gather of 131k scattered rows of a 10M-row index (a k-means sample) mapped 9.5 GB
        counted as the 256 MB it copied out."""
        self._read += nbytes  # callers count only with release_after set
        if self._read >= self._release_after:
            self.release_pages()
            self._read = 0

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
                part = self._parts[p]
                out[r - a : r - a + take] = part[r - s0 : r - s0 + take]
                r += take
                if self._release_after is not None:
                    self._touched(take * _row_bytes(part) + 2 * FOLIO_BYTES)
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
        for p in np.unique(part) if len(self._parts) > 1 else [0]:
            pos = np.flatnonzero(part == p) if len(self._parts) > 1 else slice(None)
            rows = self._parts[int(p)]
            local = idx[pos] - self._starts[p]
            out[pos] = rows[local]
            if self._release_after is not None:
                size = int(rows.shape[0]) * _row_bytes(rows)
                self._touched(min(size, local.shape[0] * (_row_bytes(rows) + FOLIO_BYTES)))
        return out


def _row_bytes(part: Any) -> int:
    return int(part.shape[1]) * np.dtype(getattr(part, "dtype", np.float32)).itemsize
