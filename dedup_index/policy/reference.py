"""The reference keep policy: row ``j`` goes iff some earlier row ``i`` pairs with it.

This is the upstream operator's ``i < j`` scan, kept as the default: in a chain A~B~C with
A not similar to C, both B and C are removed, because B pairs with A and C pairs with B
(C goes although the only row it duplicates was itself removed).

- ``duplicate_of[j]``: the earliest row ``j`` pairs with (smallest ``i`` over all pairs).
- ``duplicate_similarity[j]``: the score of that pair ``(duplicate_of[j], j)``.
- ``group[j]``: the kept row reached by following ``duplicate_of`` (C -> B -> A gives A),
  so the whole chain A~B~C is group A.

Memory O(n) plus one chunk of pairs: the pairs are streamed, never held all at once.
"""

from __future__ import annotations

import numpy as np

from .groups import (
    Decisions,
    EarliestPartner,
    Pairs,
    check_rows,
    follow_to_kept,
    iter_pair_chunks,
)

__all__ = ["Decisions", "reference_decisions"]


def reference_decisions(n: int, pairs: Pairs) -> Decisions:
    """Decisions of the reference policy over ``n`` rows (pairs streamed, O(n) memory)."""
    n = check_rows(n)
    earliest = EarliestPartner(n)
    for i, j, s in iter_pair_chunks(n, pairs):
        earliest.add(i, j, s)
    removed = earliest.has_partner()
    keep = ~removed
    duplicate_of = np.where(removed, earliest.first, -1)
    duplicate_similarity = np.where(removed, earliest.score, np.nan)
    return Decisions(keep, duplicate_of, duplicate_similarity, follow_to_kept(keep, duplicate_of))
