"""The keys of an index's rows: which key a row has, and at which row a key is.

Held as Arrow strings in row order, with a hash index built on the first lookup: 10M
path-like keys take ~0.4 GB here against ~2 GB as a Python list and ``dict`` (the
index's memory at 10M rows, issue 15 item 4).  The hash index is a few sorted runs of
``(64-bit hash, row)``: appending keys adds a run and merges runs of similar size (an
add costs what it adds, amortised), and a lookup checks each candidate row's key itself,
so a hash collision never answers with the wrong row.

Example::

    table = KeyTable.from_parts([["a.jpg", "b.jpg"], ["c.jpg"]])
    table.rows_of(["c.jpg", "x.jpg", "a.jpg"])  # array([ 2, -1,  0])
    table.take([2, 0])  # ['c.jpg', 'a.jpg']
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["KeyTable", "hash_keys", "repeated_keys"]

_KIND = pa.large_string()  # int64 offsets: a part of many long keys may pass 2 GiB


def _as_array(keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``keys`` as Arrow large strings (Arrow input as it is, cast only if need be)."""
    if isinstance(keys, pa.Array | pa.ChunkedArray):
        return keys.cast(_KIND) if keys.type != _KIND else keys
    return pa.array(list(keys), type=_KIND)


# FNV-1a 64 (basis, prime), then the splitmix64 finaliser: FNV's low bits mix poorly.
_BASIS, _PRIME = 0xCBF29CE484222325, 0x100000001B3
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK = (1 << 64) - 1

_kernel = None


def _hash_kernel():
    """FNV-1a over each key's UTF-8 bytes, then a 64-bit finaliser (numba, compiled on
    first use only: ``import dedup_index`` stays light)."""
    global _kernel
    if _kernel is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def fnv(offsets, data, out):
            basis, prime = np.uint64(_BASIS), np.uint64(_PRIME)
            m1, m2 = np.uint64(_MIX1), np.uint64(_MIX2)
            s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)
            for k in range(out.shape[0]):
                h = basis
                for p in range(offsets[k], offsets[k + 1]):
                    h = (h ^ np.uint64(data[p])) * prime
                h = (h ^ (h >> s30)) * m1
                h = (h ^ (h >> s27)) * m2
                out[k] = h ^ (h >> s31)

        _kernel = fnv
    return _kernel


#: Up to this many keys are hashed in Python: importing and loading the compiled kernel
#: costs ~2 s a process, which small indexes (and every test's child process) never repay.
PYTHON_HASH_KEYS = 20_000


def _hash_one(key: str) -> int:
    """The kernel's hash of one key, in Python (the same bits)."""
    h = _BASIS
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * _PRIME) & _MASK
    h = ((h ^ (h >> 30)) * _MIX1) & _MASK
    h = ((h ^ (h >> 27)) * _MIX2) & _MASK
    return h ^ (h >> 31)


def hash_keys(keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each key (``uint64``, one per key, stable across processes)."""
    arrow = isinstance(keys, pa.Array | pa.ChunkedArray)
    if arrow and keys.null_count:
        raise ValueError("keys must be strings; got a null key")
    if len(keys) <= PYTHON_HASH_KEYS:
        listed = keys.to_pylist() if arrow else keys
        return np.array([_hash_one(k) for k in listed], dtype=np.uint64)
    arr = _as_array(keys)
    out = np.empty(len(arr), dtype=np.uint64)
    at = 0
    for chunk in arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]:
        n = len(chunk)
        if n == 0:
            continue
        buffers = chunk.buffers()
        offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1, offset=8 * chunk.offset)
        data = np.zeros(1, np.uint8) if buffers[2] is None else np.frombuffer(buffers[2], np.uint8)
        _hash_kernel()(offsets, data, out[at : at + n])
        at += n
    return out


def repeated_keys(keys: Sequence[str] | pa.Array | pa.ChunkedArray, limit: int = 3) -> list[str]:
    """Up to ``limit`` keys that occur more than once (empty: all distinct), from the
    hashes: only the rows whose hashes repeat are compared as strings."""
    arr = _as_array(keys)
    h = hash_keys(arr)
    hs = np.sort(h)
    twice = hs[1:][hs[1:] == hs[:-1]]
    if twice.size == 0:
        return []
    rows = np.flatnonzero(np.isin(h, twice))
    seen: set[str] = set()
    out: list[str] = []
    for key in arr.take(pa.array(rows)).to_pylist():
        if key in seen and key not in out:
            out.append(key)
            if len(out) >= limit:
                break
        seen.add(key)
    return out


class _Run:
    """Rows ``[start, start + len)`` of a table as hashes in ascending order, each with
    its row (rows of equal hashes in any order: a lookup orders its candidates)."""

    __slots__ = ("hashes", "rows", "start")

    def __init__(self, hashes: np.ndarray, rows: np.ndarray, start: int) -> None:
        self.hashes, self.rows, self.start = hashes, rows, start

    @classmethod
    def of(cls, hashes: np.ndarray, start: int) -> _Run:
        order = np.argsort(hashes)  # introsort: ~2x a stable sort's speed on random keys
        return cls(hashes[order], order + start, start)

    def __len__(self) -> int:
        return self.hashes.shape[0]

    def merged(self, later: _Run) -> _Run:
        """One run of this one's rows and ``later``'s (the rows right after this one's):
        a stable sort (timsort) of two sorted runs is a linear merge."""
        hashes = np.concatenate([self.hashes, later.hashes])
        order = np.argsort(hashes, kind="stable")
        return _Run(hashes[order], np.concatenate([self.rows, later.rows])[order], self.start)


class KeyTable:
    """The keys of rows ``0..len-1`` (see the module docstring).  Appending is the only
    change; a reader holding the table of an older generation passes its row count as
    ``stop`` and never sees a later key."""

    def __init__(self) -> None:
        # One tuple, replaced whole on every change: a reader in another thread sees the
        # table before or after an append, never half of it.
        self._parts: tuple[tuple[pa.Array, ...], int, tuple[_Run, ...] | None] = ((), 0, None)
        self._lock = threading.Lock()

    @classmethod
    def from_parts(cls, parts: Iterable[Sequence[str] | pa.Array]) -> KeyTable:
        table = cls()
        for part in parts:
            table.extend(part)
        return table

    def __len__(self) -> int:
        return self._parts[1]

    def extend(self, keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> None:
        """Append ``keys`` as the next rows (a key already present keeps its first row)."""
        arr = _as_array(keys)
        if len(arr) == 0:
            return
        with self._lock:
            chunks, n, runs = self._parts
            if runs is not None:  # the hash index exists: keep it current
                runs = _merge_tail([*runs, _Run.of(hash_keys(arr), n)])
            new = tuple(arr.chunks) if isinstance(arr, pa.ChunkedArray) else (arr,)
            self._parts = ((*chunks, *new), n + len(arr), runs)

    def array(self) -> pa.ChunkedArray:
        """The keys as an Arrow array (no copy)."""
        return pa.chunked_array(list(self._parts[0]), type=_KIND)

    def to_list(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Keys ``start:stop`` as a list (all: the defaults)."""
        stop = len(self) if stop is None else stop
        return self.array().slice(start, max(0, stop - start)).to_pylist()

    def take(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The keys of ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size == 0:
            return []
        n = len(self)
        if rows.min() < 0 or rows.max() >= n:
            raise IndexError(f"rows must be in [0, {n}); got {rows.min()}..{rows.max()}")
        return self.array().take(pa.array(rows)).to_pylist()

    def rows_of(self, keys: Sequence[str], stop: int | None = None) -> np.ndarray:
        """The first row ``< stop`` (all rows: None) holding each key, -1 where none."""
        keys = list(keys)
        stop = len(self) if stop is None else stop
        out = np.full(len(keys), -1, dtype=np.int64)
        if not keys or stop == 0:
            return out
        want = hash_keys(keys)
        cand_q, cand_r = [], []
        for run in self._runs():
            if run.start >= stop:
                break
            lo = np.searchsorted(run.hashes, want, side="left")
            hi = np.searchsorted(run.hashes, want, side="right")
            hit = np.flatnonzero(hi > lo)
            for q in hit.tolist():
                rows = run.rows[lo[q] : hi[q]]
                rows = rows[rows < stop]
                cand_q.append(np.full(rows.shape[0], q, dtype=np.int64))
                cand_r.append(rows)
        if not cand_q:
            return out
        qs, rs = np.concatenate(cand_q), np.concatenate(cand_r)
        order = np.lexsort((rs, qs))  # each key's candidates, earliest row first
        qs, rs = qs[order], rs[order]
        for q, r, key in zip(qs.tolist(), rs.tolist(), self.take(rs), strict=True):
            if out[q] < 0 and key == keys[q]:  # equal hashes: the key itself decides
                out[q] = r
        return out

    def _runs(self) -> tuple[_Run, ...]:
        runs = self._parts[2]
        if runs is None:
            with self._lock:
                chunks, n, runs = self._parts
                if runs is None:
                    runs = (_Run.of(hash_keys(self.array()), 0),)
                    self._parts = (chunks, n, runs)
        return runs


def _merge_tail(runs: list[_Run]) -> tuple[_Run, ...]:
    """Merge the newest runs while the newest is at least half the one before it: the
    runs' sizes then fall geometrically, so a table of N keys has O(log N) runs and each
    key is merged O(log N) times."""
    while len(runs) >= 2 and 2 * len(runs[-1]) >= len(runs[-2]):
        later = runs.pop()
        runs[-1] = runs[-1].merged(later)
    return tuple(runs)
