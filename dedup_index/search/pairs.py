"""Pairs of near-duplicate rows: ``(i, j, s)`` with ``i < j`` and canonical ``s >= threshold``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .canonical import canonical_scores


@dataclass(frozen=True)
class PairSet:
    """Row pairs sorted by ``(i, j)``; ``s`` is the canonical float64 similarity."""

    i: np.ndarray
    j: np.ndarray
    s: np.ndarray

    def __len__(self) -> int:
        return int(self.i.shape[0])

    @classmethod
    def empty(cls) -> PairSet:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def to_frame(self):  # -> pandas.DataFrame, imported lazily
        """The pairs as a DataFrame with columns ``i``, ``j``, ``similarity``."""
        import pandas as pd

        return pd.DataFrame({"i": self.i, "j": self.j, "similarity": self.s})

    def iter_chunks(self, rows: int = 1 << 20) -> Iterator[PairSet]:
        """The pairs in chunks of at most ``rows`` (the same interface as a spilled pair file)."""
        for a in range(0, len(self), rows):
            yield PairSet(self.i[a : a + rows], self.j[a : a + rows], self.s[a : a + rows])

    def equals(self, other: PairSet) -> bool:
        """Exact equality: same pairs, bit-identical scores."""
        return (
            np.array_equal(self.i, other.i)
            and np.array_equal(self.j, other.j)
            and np.array_equal(self.s, other.s)
        )


def rescore_candidates(
    embeddings: np.ndarray,
    candidates: Iterable[tuple[np.ndarray, np.ndarray]],
    threshold: float,
) -> PairSet:
    """Rescore candidate blocks canonically, keep ``s >= threshold``, dedupe and sort.

    ``candidates`` yields ``(i, j)`` index arrays with ``i < j``; a pair may appear in
    more than one block (overlapping tiles), and is kept once.
    """
    parts_i, parts_j, parts_s = [], [], []
    for ci, cj in candidates:
        if ci.size == 0:
            continue
        s = canonical_scores(embeddings, ci, cj)
        hit = s >= threshold
        parts_i.append(ci[hit].astype(np.int64, copy=False))
        parts_j.append(cj[hit].astype(np.int64, copy=False))
        parts_s.append(s[hit])
    return _sorted_unique(parts_i, parts_j, parts_s)


def concat_pairsets(parts: Iterable[PairSet]) -> PairSet:
    """One sorted PairSet from several, a pair found more than once kept once."""
    parts = [p for p in parts if len(p)]
    return _sorted_unique([p.i for p in parts], [p.j for p in parts], [p.s for p in parts])


def _sorted_unique(parts_i, parts_j, parts_s) -> PairSet:
    if not parts_i:
        return PairSet.empty()
    i = np.concatenate(parts_i)
    j = np.concatenate(parts_j)
    s = np.concatenate(parts_s)
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    if i.size > 1:
        first = np.ones(i.size, dtype=bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        i, j, s = i[first], j[first], s[first]
    return PairSet(i, j, s)


def best_pair_score(n: int, pairs) -> np.ndarray:
    """Per row, the highest pair score it takes part in (either side); -inf if none.

    ``pairs`` is a PairSet or a spilled pair file (anything with ``iter_chunks``).
    """
    best = np.full(n, -np.inf, dtype=np.float64)
    for chunk in pairs.iter_chunks():
        np.maximum.at(best, chunk.i, chunk.s)
        np.maximum.at(best, chunk.j, chunk.s)
    return best
