"""Per-block SHA-256 checksums of row files, checked lazily: the one implementation.

A file of ``N`` fixed-size rows is cut into blocks of ``block_rows`` rows (the whole number
of rows nearest below :data:`BLOCK_BYTES`, at least one) and the SHA-256 of each block is
recorded when the rows are written.  A reader hashes a block the first time a row in it is
read and compares it with the record; a block that matches is marked so it is never hashed
again, one that does not raises the caller's error (naming the file and rows) every time it
is read.  Opening a file of a million rows therefore hashes nothing, and a query pays for
the blocks it touches (about 1 ms per MiB), never for the whole file.

Both the embedding store's shards (:mod:`dedup_index.store.embeddings`) and the index's
row segments (:mod:`dedup_index.store.segments`) use these functions, so "checked" means
the same thing whichever file a row came from.  :func:`hashed_bytes` counts the bytes
hashed by checks in this process (tests assert that opening hashes nothing).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "BLOCK_BYTES",
    "HashingThread",
    "block_digests",
    "block_rows_for",
    "check_gather",
    "check_range",
    "digest",
    "hashed_bytes",
    "n_blocks",
]

#: Target size of one checksummed block: a row block is the whole number of rows nearest
#: below it (at least one row); a byte stream (a keys file) is cut at exactly this size.
BLOCK_BYTES = 1 << 20

#: A range read that finds at least this many unchecked blocks looks like a scan (an
#: exact search reads every row, tile by tile)...
SCAN_BLOCKS = 8
#: ...so the blocks after it, up to this many bytes, are checked with it: hashing then
#: runs in long stretches instead of between every two GEMM tiles, where it competes
#: with OpenBLAS threads still spinning after a tile (bench/row_checksums.py, 1M x 512,
#: exact first query on a loaded 2-core machine: 4.4 s checking tile by tile, 3.0 s with
#: 256 MiB ahead, 2.7 s with 1 GiB, as the whole-file check).  A read-ahead block that
#: fails is left unchecked, not raised: only reads of its own rows fail.
SCAN_AHEAD_BYTES = 1 << 30

#: ``(lo, hi) -> exception``: the error for a block of rows ``[lo, hi)`` that fails.
Corrupt = Callable[[int, int], Exception]

_hashed = [0]
_hashed_lock = threading.Lock()


def hashed_bytes() -> int:
    """Bytes hashed so far in this process by :func:`check_range` / :func:`check_gather`
    (a diagnostic: tests use it to show that opening a file hashes none of its rows)."""
    return _hashed[0]


def block_rows_for(row_bytes: int) -> int:
    """Rows per checksummed block for rows of ``row_bytes`` bytes (at least 1)."""
    if row_bytes < 1:
        raise ValueError(f"row_bytes must be >= 1, got {row_bytes}")
    return max(1, BLOCK_BYTES // row_bytes)


def n_blocks(n_rows: int, block_rows: int) -> int:
    """Blocks of ``block_rows`` rows covering ``n_rows`` rows (the last may be short)."""
    return -(-n_rows // block_rows)


def digest(data: Any) -> str:
    """SHA-256 hex digest of a bytes-like object (a C-contiguous array counts)."""
    return hashlib.sha256(data).hexdigest()


def block_digests(prefix: bytes, data: Any, block_bytes: int) -> list[str]:
    """SHA-256 of each ``block_bytes`` block of ``prefix + data`` (the last may be short),
    without concatenating them.  ``prefix`` is the start of a block that already holds
    bytes (an append that grows a partly filled block); ``data`` is bytes-like."""
    data = memoryview(data).cast("B")
    out = []
    pos = 0
    first = True
    while first or pos < len(data):
        h = hashlib.sha256(prefix if first else b"")
        room = block_bytes - (len(prefix) if first else 0)
        h.update(data[pos : pos + room])
        pos += room
        first = False
        out.append(h.hexdigest())
    return out


class HashingThread(threading.Thread):
    """:func:`block_digests` in a thread (hashlib releases the GIL), so hashing overlaps
    a write and its fsync; :meth:`result` joins and returns the digests or re-raises."""

    def __init__(self, prefix: bytes, data: Any, block_bytes: int) -> None:
        super().__init__(daemon=True)
        self._args = (prefix, data, block_bytes)
        self._out: list[str] | None = None
        self._err: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._out = block_digests(*self._args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller in result()
            self._err = err

    def result(self) -> list[str]:
        self.join()
        if self._err is not None:
            raise self._err
        return self._out


def check_blocks(
    rows: np.ndarray,
    blocks: Any,
    digests: list[str],
    checked: np.ndarray,
    block_rows: int,
    corrupt: Corrupt | None,
) -> None:
    """Hash blocks ``blocks`` of ``rows`` (a 2-D, usually memory-mapped, array) against
    ``digests``; mark each that matches in ``checked`` (a bool array, one per block), raise
    ``corrupt(lo, hi)`` for the first that does not (it stays unmarked; with ``corrupt``
    None, stop there without raising)."""
    n = rows.shape[0]
    source = _file_of(rows)
    fd = os.open(source[0], os.O_RDONLY) if source is not None else -1
    try:
        for b in np.asarray(blocks).tolist():
            lo = b * block_rows
            hi = min(lo + block_rows, n)
            if source is not None:  # the file's bytes, read (see _file_of)
                size = (hi - lo) * source[2]
                data: Any = os.pread(fd, size, source[1] + lo * source[2])
                ok = len(data) == size
            else:
                data = np.ascontiguousarray(rows[lo:hi]).data  # a view of a C-order map
                size, ok = data.nbytes, True
            with _hashed_lock:
                _hashed[0] += size
            if not ok or digest(data) != digests[b]:
                if corrupt is None:
                    return
                raise corrupt(lo, hi)
            checked[b] = True
    finally:
        if fd >= 0:
            os.close(fd)


def _file_of(rows: Any) -> tuple[str, int, int] | None:
    """``(path, offset of row 0, bytes a row)`` when ``rows`` is a whole memory map of a
    file (``np.memmap`` / ``np.load(mmap_mode="r")``, not a view of one): blocks are then
    hashed from ``pread``s of the file, so checking never maps pages into the process.
    (Hashed through the map, a scattered gather of 40k rows from a 10M-row index checked
    nearly every block: 9.5 GB of mapped pages in the RSS, which the reader's page
    release only drops after the read.)"""
    if (
        isinstance(rows, np.memmap)
        and isinstance(rows.base, mmap.mmap)
        and getattr(rows, "filename", None)
        and rows.ndim == 2
        and rows.flags.c_contiguous
    ):
        return str(rows.filename), int(rows.offset), int(rows.shape[1] * rows.dtype.itemsize)
    return None


def check_range(
    rows: np.ndarray,
    r0: int,
    r1: int,
    digests: list[str],
    checked: np.ndarray,
    block_rows: int,
    corrupt: Corrupt,
) -> None:
    """Check the not yet checked blocks holding rows ``[r0, r1)`` of ``rows`` (a read
    that looks like a scan checks up to :data:`SCAN_AHEAD_BYTES` after them too)."""
    if r1 <= r0:
        return
    b0, b1 = r0 // block_rows, n_blocks(r1, block_rows)
    todo = np.flatnonzero(~checked[b0:b1]) + b0
    if not todo.shape[0]:
        return
    check_blocks(rows, todo, digests, checked, block_rows, corrupt)
    if todo.shape[0] >= SCAN_BLOCKS:
        block_bytes = block_rows * rows.shape[1] * rows.dtype.itemsize
        stop = min(len(digests), b1 + max(1, SCAN_AHEAD_BYTES // block_bytes))
        ahead = np.flatnonzero(~checked[b1:stop]) + b1
        check_blocks(rows, ahead, digests, checked, block_rows, None)


def check_gather(
    rows: np.ndarray,
    idx: np.ndarray,
    digests: list[str],
    checked: np.ndarray,
    block_rows: int,
    corrupt: Corrupt,
) -> None:
    """Check the not yet checked blocks holding rows ``idx`` (non-negative ints) of ``rows``."""
    if checked.all() or idx.size == 0:
        return
    blocks = np.unique(np.asarray(idx).reshape(-1) // block_rows)
    need = blocks[~checked[blocks]]
    if need.shape[0]:
        check_blocks(rows, need, digests, checked, block_rows, corrupt)
