"""What every keep policy shares: the ``Decisions`` record, pair streaming, group ids.

Policies read pairs through :func:`iter_pair_chunks`, so the same code serves a
:class:`~dedup_index.search.pairs.PairSet` held in memory and a pair file spilled to disk:
both offer ``iter_chunks(rows)``.  A spilled file's chunks may come in any order and may
repeat a pair, so nothing here relies on order or uniqueness; where a repeated pair carries
different scores (it should not: scores are canonical), the highest one is used, which keeps
every result independent of the chunk order.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..search.pairs import PairSet

#: Pairs read per chunk when streaming: bounds a policy's scratch memory beyond O(n).
CHUNK_ROWS = 1 << 20


class PairChunks(Protocol):
    """Anything that yields its pairs as :class:`PairSet` chunks (in any order)."""

    def iter_chunks(self, rows: int = ...) -> Iterator[PairSet]: ...


#: What a policy accepts: a sorted in-memory ``PairSet`` or a chunked pair source.
Pairs = PairSet | PairChunks


@dataclass(frozen=True)
class Decisions:
    """Per-row outcome of a keep policy over ``n`` rows.

    Attributes:
        keep: bool, True for rows that stay.
        duplicate_of: int64; for a removed row the row it is recorded as duplicating
            (each policy says which), -1 for kept rows.
        duplicate_similarity: float64; for a removed row a score of one of its pairs (each
            policy says which), NaN for kept rows.
        group: int64; for every row the index of the kept row that represents its group of
            near-duplicates, the row itself for kept rows.
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    duplicate_similarity: np.ndarray
    group: np.ndarray


def check_rows(n: object) -> int:
    """Return ``n`` as an int >= 0, or raise: the row count every policy is given."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n (the number of rows) must be an integer >= 0; got {n!r}")
    return int(n)


def iter_pair_chunks(
    n: int, pairs: Pairs, rows: int = CHUNK_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(i, j, s)`` arrays (int64, int64, float64) chunk by chunk, checked.

    Raises ``TypeError`` for an object without ``iter_chunks`` and ``ValueError`` for a pair
    that is not ``0 <= i < j < n``: a policy given such a pair would index the wrong row.
    """
    chunks = getattr(pairs, "iter_chunks", None)
    if chunks is None:
        raise TypeError(
            "pairs must be a PairSet or an object with iter_chunks(rows) yielding PairSets; "
            f"got {type(pairs).__name__}"
        )
    for chunk in chunks(rows):
        i = np.asarray(chunk.i, dtype=np.int64)
        j = np.asarray(chunk.j, dtype=np.int64)
        s = np.asarray(chunk.s, dtype=np.float64)
        if not i.shape == j.shape == s.shape or i.ndim != 1:
            raise ValueError(
                f"a pair chunk has arrays of different shapes: i {i.shape}, j {j.shape}, "
                f"s {s.shape}"
            )
        if i.size == 0:
            continue
        bad = (i < 0) | (i >= j) | (j >= n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"pairs must satisfy 0 <= i < j < n = {n}; got (i, j) = ({i[k]}, {j[k]}) "
                f"and {int(bad.sum()) - 1} more such pair(s)"
            )
        yield i, j, s


class EarliestPartner:
    """Streamed, O(n): each row's earliest partner (smallest ``i`` pairing with it) and score.

    Rows without an earlier partner keep the sentinel ``n`` in :attr:`first` and NaN in
    :attr:`score`.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.first = np.full(n, n, dtype=np.int64)
        self.score = np.full(n, np.nan, dtype=np.float64)

    def add(self, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> None:
        """Fold one chunk of pairs in (any order, repeats allowed)."""
        if i.size == 0:
            return
        order = np.lexsort((-s, i, j))  # by j, then smallest i, then highest score
        js = j[order]
        head = np.ones(js.size, dtype=bool)
        head[1:] = js[1:] != js[:-1]
        pick = order[head]
        cj, ci, cs = j[pick], i[pick], s[pick]  # cj unique: plain fancy assignment is safe
        current = self.first[cj]
        better = ci < current
        self.first[cj[better]] = ci[better]
        self.score[cj[better]] = cs[better]
        same = ci == current
        self.score[cj[same]] = np.fmax(self.score[cj[same]], cs[same])

    def has_partner(self) -> np.ndarray:
        """Bool mask of rows with at least one earlier partner."""
        return self.first < self.n


def follow_to_kept(keep: np.ndarray, duplicate_of: np.ndarray) -> np.ndarray:
    """Group ids: follow ``duplicate_of`` from every row until a kept row is reached.

    Needs ``duplicate_of[j] < j`` for removed rows (true of every policy here), so each
    chain ends at a kept row.  Pointer jumping: O(n log depth), vectorised.
    """
    group = np.where(keep, np.arange(keep.size, dtype=np.int64), duplicate_of)
    while True:
        jumped = group[group]
        if np.array_equal(jumped, group):
            return group
        group = jumped


def materialize_by_later(n: int, pairs: Pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs in memory, unique, sorted by ``(j, i)``: O(pairs) memory.

    A repeated pair keeps its highest score (see the module docstring).
    """
    parts = list(iter_pair_chunks(n, pairs))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    i = np.concatenate([p[0] for p in parts])
    j = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    del parts
    order = np.lexsort((-s, i, j))
    i, j, s = i[order], j[order], s[order]
    head = np.ones(i.size, dtype=bool)
    head[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[head], j[head], s[head]


def no_pairs(n: int) -> Decisions:
    """Decisions when nothing pairs: every row kept, each its own group."""
    return Decisions(
        keep=np.ones(n, dtype=bool),
        duplicate_of=np.full(n, -1, dtype=np.int64),
        duplicate_similarity=np.full(n, np.nan, dtype=np.float64),
        group=np.arange(n, dtype=np.int64),
    )
