"""Decisions from pairs: which rows stay, which go, whom each removed row duplicates, and
which group of near-duplicates every row belongs to.

Each policy is a function ``(n, pairs) -> Decisions``.  ``pairs`` is a
:class:`~dedup_index.search.pairs.PairSet` in memory or any object with
``iter_chunks(rows)`` yielding ``PairSet`` chunks in any order, possibly repeating a pair
(a pair file spilled to disk).  ``group[j]`` is always the index of a kept row: the row
that represents ``j``'s group (itself when ``j`` is kept).

Take a chain A~B~C (rows 0, 1, 2) with A~B and B~C at or above the threshold, A and C
below it:

- ``reference`` (default; upstream's ``i < j`` scan): row ``j`` goes iff any earlier row
  pairs with it, removed or not.  Removes B and C (C -> B -> A); all three are group A.
  Memory O(n) plus one chunk of pairs.
- ``greedy``: rows in index order; ``j`` goes only if it pairs with an earlier *kept*
  row.  Removes B only; C stays (its only partner B was removed).  Groups: A, A, C.
  Kept rows are pairwise below the threshold.  Memory O(pairs).
- ``component``: one row per connected component of the pair graph, its lowest index.
  Removes B and C, all three in group A; unlike ``reference`` it also merges rows joined
  only through a later row (A~C, B~C: keeps A only).  Memory O(n) plus one chunk.
"""

from __future__ import annotations

from .component import component_decisions
from .greedy import greedy_decisions
from .groups import CHUNK_ROWS, Decisions, PairChunks, Pairs
from .reference import reference_decisions

__all__ = [
    "CHUNK_ROWS",
    "Decisions",
    "POLICIES",
    "PairChunks",
    "Pairs",
    "component_decisions",
    "decide",
    "greedy_decisions",
    "reference_decisions",
]

#: Keep policies by name; the first is the default.
POLICIES = ("reference", "greedy", "component")

_POLICY_FUNCTIONS = {
    "reference": reference_decisions,
    "greedy": greedy_decisions,
    "component": component_decisions,
}


def decide(n: int, pairs: Pairs, policy: str = "reference") -> Decisions:
    """Apply the keep ``policy`` (one of :data:`POLICIES`) to ``pairs`` over ``n`` rows."""
    function = _POLICY_FUNCTIONS.get(policy) if isinstance(policy, str) else None
    if function is None:
        options = ", ".join(repr(p) for p in POLICIES)
        raise ValueError(f"policy must be one of {options}; got {policy!r}")
    return function(n, pairs)
