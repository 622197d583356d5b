"""The reference keep policy: row ``j`` goes iff some earlier row ``i`` pairs with it.

This is the upstream operator's ``i < j`` scan, kept as the default: in a chain A~B~C with
A not similar to C, both B and C are removed, because B pairs with A and C pairs with B
(C goes although the only row it duplicates was itself removed).  A removed row's
``duplicate_of`` is the earliest row it pairs with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..search.pairs import PairSet

POLICIES = ("reference",)


@dataclass(frozen=True)
class Decisions:
    """Per-row outcome: ``keep``; for removed rows, ``duplicate_of`` and its similarity."""

    keep: np.ndarray
    duplicate_of: np.ndarray
    duplicate_similarity: np.ndarray


def reference_decisions(n: int, pairs: PairSet) -> Decisions:
    """Decisions of the reference policy over ``n`` rows; memory O(n + pairs)."""
    keep = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    duplicate_similarity = np.full(n, np.nan, dtype=np.float64)
    if len(pairs):
        order = np.lexsort((pairs.i, pairs.j))  # by j, then earliest i
        j_sorted = pairs.j[order]
        first = np.ones(j_sorted.size, dtype=bool)
        first[1:] = j_sorted[1:] != j_sorted[:-1]
        pick = order[first]
        removed = pairs.j[pick]
        keep[removed] = False
        duplicate_of[removed] = pairs.i[pick]
        duplicate_similarity[removed] = pairs.s[pick]
    return Decisions(keep, duplicate_of, duplicate_similarity)


def decide(n: int, pairs: PairSet, policy: str = "reference") -> Decisions:
    """Apply the keep ``policy`` to ``pairs`` over ``n`` rows."""
    if policy == "reference":
        return reference_decisions(n, pairs)
    raise ValueError(f"policy must be one of {POLICIES}; got {policy!r}")
