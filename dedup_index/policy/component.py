"""The component keep policy: one row per connected component of the pair graph.

Rows are nodes, pairs are edges; each connected component keeps its lowest index and loses
every other member, whether or not that member pairs with the kept row directly.  In a chain
A~B~C with A not similar to C, B and C are removed and all three are group A (the same rows
as ``reference`` here; they differ when a component's members are joined only through
later rows, e.g. A~C and B~C with A not similar to B: ``reference`` keeps A and B,
``component`` keeps A only).

- ``duplicate_of[j]`` and ``group[j]``: the lowest index of ``j``'s component (``group`` is
  that for kept rows too, i.e. the row itself).
- ``duplicate_similarity[j]``, by the first rule that applies:
  1. the score of the pair ``(duplicate_of[j], j)`` if that pair exists;
  2. else the highest score among ``j``'s pairs with earlier rows ``(i, j)``, ``i < j``;
  3. else (``j`` pairs only with later rows) the highest score among all its pairs.
  A removed row always has a pair, so this is never NaN for removed rows.

Memory O(n) plus one chunk: a union-find over streamed chunks, vectorised per chunk.
"""

from __future__ import annotations

import numpy as np

from .groups import Decisions, EarliestPartner, Pairs, check_rows, iter_pair_chunks

__all__ = ["component_decisions"]


def component_decisions(n: int, pairs: Pairs) -> Decisions:
    """Decisions of the component policy over ``n`` rows (pairs streamed, O(n) memory)."""
    n = check_rows(n)
    parent = np.arange(n, dtype=np.int64)  # parent[x] <= x always: roots are minima
    earliest = EarliestPartner(n)
    best_earlier = np.full(n, -np.inf)  # per row, best score of a pair (i, row)
    best_later = np.full(n, -np.inf)  # per row, best score of a pair (row, j)
    for i, j, s in iter_pair_chunks(n, pairs):
        _union(parent, i, j)
        earliest.add(i, j, s)
        np.maximum.at(best_earlier, j, s)
        np.maximum.at(best_later, i, s)
    root = _compress(parent)
    rows = np.arange(n, dtype=np.int64)
    keep = root == rows
    removed = ~keep
    duplicate_of = np.where(keep, -1, root)
    direct = removed & (earliest.first == root)
    earlier = removed & ~direct & earliest.has_partner()
    later = removed & ~direct & ~earlier
    duplicate_similarity = np.full(n, np.nan)
    duplicate_similarity[direct] = earliest.score[direct]
    duplicate_similarity[earlier] = best_earlier[earlier]
    duplicate_similarity[later] = best_later[later]
    return Decisions(keep, duplicate_of, duplicate_similarity, root)


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The current root of each of ``x`` (follows ``parent`` until it stops moving)."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def _compress(parent: np.ndarray) -> np.ndarray:
    """Every row's root, by pointer jumping over the whole array: O(n log depth)."""
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            return parent
        parent = jumped


def _union(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Merge the components joined by the edges ``(i, j)`` into ``parent``, in place.

    The chunk's distinct roots are relabelled ``0..m-1`` (in index order), their components
    found by min-label hooking and pointer jumping on that small array, and each root is
    then pointed at its local component's lowest root.  Parents only ever point to smaller
    indices, so no cycle can form and a component's root is its lowest index.
    """
    ri, rj = _roots(parent, i), _roots(parent, j)
    apart = ri != rj
    if apart.any():
        nodes, inverse = np.unique(np.concatenate([ri[apart], rj[apart]]), return_inverse=True)
        m = int(apart.sum())
        label = _local_components(nodes.size, inverse[:m], inverse[m:])
        parent[nodes] = nodes[label]
    # Path compression for the endpoints keeps later root look-ups short.
    parent[i] = _roots(parent, i)
    parent[j] = _roots(parent, j)


def _local_components(m: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Lowest node of each node's component in a graph of ``m`` nodes and edges ``(a, b)``.

    Each round hooks every root that touches a lower root onto the lowest such root, then
    jumps pointers until every node points at a root.  The number of roots falls every
    round, and it stops when every edge lies within one label; on paths, stars and random
    graphs that takes a handful of rounds.
    """
    label = np.arange(m, dtype=np.int64)
    while True:
        la, lb = label[a], label[b]
        if np.array_equal(la, lb):
            return label
        low = np.minimum(la, lb)
        np.minimum.at(label, la, low)
        np.minimum.at(label, lb, low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
