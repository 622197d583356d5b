"""``flat`` backend: FAISS ``IndexFlatIP`` searches over database tiles, exact.

The database is split into tiles of ``db_block`` rows, each its own ``IndexFlatIP`` (a
copy of that tile only, so memory stays ``O(db_block * D)`` beyond the embeddings), and
queries go in blocks of ``query_block`` rows.  Tiling also bounds FAISS's per-query range
search buffers (~40 bytes per query and 1024-row database block even with no hits).

Two ways through, both exact after canonical rescoring:

- pairs only (``score="pairs"``): ``range_search`` at ``threshold - delta``, skipping the
  tiles that lie wholly below the diagonal (their hits would all have ``j < i``), so the
  arithmetic is about ``(T + 1) / 2T`` of the full square for ``T`` tiles.
- pairs and nearest neighbours (``score="nearest"``): one top-``k`` pass over the full
  square gives each row its candidates and its nearest neighbours at once; the few rows
  whose top-``k`` list is all candidates (more than ``k`` near-duplicates) are completed
  with ``range_search``.  One pass instead of a range search plus a nearest search.

:func:`flat_cross_search` does the same for new rows against a base of rows (the
persistent index's ``flat`` backend): :class:`~dedup_index.search.cross.CrossResult`, the
same bits as :func:`~dedup_index.search.cross.cross_search`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .canonical import candidate_delta, canonical_scores, rows_of
from .cross import CrossResult, cross_result
from .pairs import PairSet, best_pair_score, rescore_candidates
from .tiles import NearBest

DEFAULT_QUERY_BLOCK = 4096
DEFAULT_DB_BLOCK = 8192
#: Neighbours asked of FAISS per row in the nearest-neighbour pass.
NEAREST_K = 16
#: Scratch for rows whose nearest neighbour needs a look at every row.
_FULL_ROWS_BYTES = 256 << 20


def faiss_module(threads: int | None = None):
    """The ``faiss`` module, its OpenMP thread count set to ``threads`` when given.

    FAISS is imported here, on the first search that needs it, so that ``import
    dedup_index.search`` stays light; every FAISS-backed search (flat, ivf, hnsw, the
    partitioned backend's k-means, the persistent index) gets it through this one door."""
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(threads)
    return faiss


def _db_tiles(n: int, db_block: int) -> list[tuple[int, int]]:
    return [(c, min(n, c + db_block)) for c in range(0, n, db_block)]


def _tile_index(faiss, embeddings: np.ndarray, c: int, e: int):
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings[c:e])
    return index


def _range_hits(index, queries: np.ndarray, radius: float, q0: int, c: int):
    """``(i, j)`` of all float32 scores ``> radius`` with ``j > i`` (global row numbers)."""
    lims, _, labels = index.range_search(queries, radius)
    counts = np.diff(lims.astype(np.int64))
    qi = np.repeat(np.arange(q0, q0 + queries.shape[0], dtype=np.int64), counts)
    qj = labels.astype(np.int64) + c
    upper = qj > qi
    return qi[upper], qj[upper]


def flat_candidates(
    embeddings: np.ndarray,
    radius: float,
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
    db_block: int = DEFAULT_DB_BLOCK,
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(i, j)`` blocks of row pairs with ``i < j`` and float32 score ``> radius``."""
    faiss = faiss_module(threads)
    n = embeddings.shape[0]
    for c, e in _db_tiles(n, db_block):
        index = _tile_index(faiss, embeddings, c, e)
        # Query rows at or beyond the tile's end can only pair with earlier rows: skip.
        for a in range(0, e, query_block):
            b = min(e, a + query_block)
            yield _range_hits(index, embeddings[a:b], radius, a, c)
        del index


def flat_pairs(
    embeddings: np.ndarray,
    threshold: float,
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
    db_block: int = DEFAULT_DB_BLOCK,
    threads: int | None = None,
) -> PairSet:
    """All pairs ``i < j`` with canonical similarity ``>= threshold`` (exact)."""
    radius = threshold - candidate_delta(embeddings.shape[1])
    blocks = flat_candidates(
        embeddings, radius, query_block=query_block, db_block=db_block, threads=threads
    )
    return rescore_candidates(embeddings, blocks, threshold)


def flat_pairs_and_nearest(
    embeddings: np.ndarray,
    threshold: float,
    *,
    k: int = NEAREST_K,
    query_block: int = DEFAULT_QUERY_BLOCK,
    db_block: int = DEFAULT_DB_BLOCK,
    threads: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> tuple[PairSet, np.ndarray]:
    """Exact pairs and ``max(0, max_{k != j} s(j, k))`` per row, in one top-``k`` pass.

    A row's candidates are the list entries above ``threshold - delta``; when even the
    last of its ``k`` entries is above, the list may be cut short and the row is
    completed by a range search.  Its nearest neighbour is the canonical maximum over the
    entries within ``delta`` of the float32 best (a float32 near-tie can hide the true
    maximum); when those fill the list too, the row is recomputed against all rows.
    """
    n, d = embeddings.shape
    if n < 2:
        return PairSet.empty(), np.zeros(n, dtype=np.float64)
    delta = candidate_delta(d)
    radius = threshold - delta
    k = min(n, k)
    faiss = faiss_module(threads)
    tiles = _db_tiles(n, db_block)
    nearest = np.full(n, -np.inf, dtype=np.float64)
    candidate_blocks: list[tuple[np.ndarray, np.ndarray]] = []
    overflow: list[np.ndarray] = []
    unresolved: list[np.ndarray] = []
    for a in range(0, n, query_block):
        rows = np.arange(a, min(n, a + query_block), dtype=np.int64)
        scores, labels = _topk(faiss, embeddings, rows, k, tiles)
        not_self = labels != rows[:, None]
        # Candidates of each row among later rows.
        hit = not_self & (scores > radius) & (labels > rows[:, None])
        candidate_blocks.append((np.broadcast_to(rows[:, None], labels.shape)[hit], labels[hit]))
        full = k == n
        if not full:
            overflow.append(rows[scores[:, -1] > radius])
        ti, tj, cut = _near_ties(rows, scores, labels, not_self, delta, full)
        np.maximum.at(nearest, ti, canonical_scores(embeddings, ti, tj))
        unresolved.append(cut)
        if progress is not None:
            progress(rows.size)
    extra = np.concatenate(overflow) if overflow else np.zeros(0, np.int64)
    for c, e in tiles if extra.size else []:
        index = _tile_index(faiss, embeddings, c, e)
        for a in range(0, extra.size, query_block):
            rows = extra[a : a + query_block]
            lims, _, labels = index.range_search(embeddings[rows], radius)
            qi = np.repeat(rows, np.diff(lims.astype(np.int64)))
            qj = labels.astype(np.int64) + c
            candidate_blocks.append((qi[qj > qi], qj[qj > qi]))
    pairs = rescore_candidates(embeddings, candidate_blocks, threshold)
    # A row with a pair at >= threshold has its nearest neighbour among its pairs: any
    # closer row would be above threshold - delta in float32 and so a candidate too.
    nearest = np.maximum(nearest, best_pair_score(n, pairs))
    cut = np.concatenate(unresolved)
    cut = cut[nearest[cut] < threshold]
    if cut.size:
        _nearest_by_full_rows(embeddings, cut, nearest, delta, query_block, db_block)
    return pairs, np.maximum(nearest, 0.0)


def _topk(faiss, embeddings, rows, k, tiles):
    """Top-``k`` float32 scores and labels of ``rows`` against all rows, tile by tile."""
    queries = embeddings[rows]
    all_s, all_l = [], []
    for c, e in tiles:
        index = _tile_index(faiss, embeddings, c, e)
        s, lab = index.search(queries, min(k, e - c))
        all_s.append(s)
        all_l.append(lab.astype(np.int64) + c)
    scores = np.concatenate(all_s, axis=1)
    labels = np.concatenate(all_l, axis=1)
    if scores.shape[1] > k:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, top, axis=1)
        labels = np.take_along_axis(labels, top, axis=1)
    return scores, labels


def _near_ties(rows, scores, labels, not_self, delta, complete):
    """``(row, neighbour)`` pairs within ``delta`` of the row's float32 best, and the rows
    whose list is all near-ties (so may be cut short) and need a full look."""
    best32 = np.where(not_self, scores, -np.inf).max(axis=1)
    keep = not_self & (scores >= (best32 - delta)[:, None])
    cand_i = np.broadcast_to(rows[:, None], labels.shape)[keep]
    cand_j = labels[keep]
    if complete:
        return cand_i, cand_j, np.zeros(0, np.int64)
    return cand_i, cand_j, rows[scores[:, -1] >= best32 - delta]


def _nearest_by_full_rows(embeddings, rows, nearest, delta, query_block, db_block):
    """Exact nearest neighbour of ``rows`` against every row (float32 blocks, then canonical)."""
    n = embeddings.shape[0]
    step = max(1, min(query_block, _FULL_ROWS_BYTES // (4 * n)))
    for a in range(0, rows.size, step):
        block = rows[a : a + step]
        sims = np.empty((block.size, n), dtype=np.float32)
        for c, e in _db_tiles(n, db_block):
            sims[:, c:e] = embeddings[block] @ embeddings[c:e].T
        sims[np.arange(block.size), block] = -np.inf
        near = sims >= (sims.max(axis=1) - delta)[:, None]
        qi, qj = np.nonzero(near)
        qi = block[qi]
        np.maximum.at(nearest, qi, canonical_scores(embeddings, qi, qj.astype(np.int64)))


# ------------------------------------------------------------------ queries against a base


def flat_cross_search(
    queries: np.ndarray,
    base,
    threshold: float,
    *,
    base_live: np.ndarray | None = None,
    base_best: bool = True,
    k: int = NEAREST_K,
    query_block: int = DEFAULT_QUERY_BLOCK,
    db_block: int = DEFAULT_DB_BLOCK,
    threads: int | None = None,
) -> CrossResult:
    """:func:`~dedup_index.search.cross.cross_search` through FAISS ``IndexFlatIP``: all
    ``(q, b)`` with canonical ``s >= threshold`` and the best scores both ways, exact.

    The base is read in tiles of ``db_block`` rows, each its own ``IndexFlatIP`` (its live
    rows only: ``base_live`` as in ``cross_search``); the queries go through each tile
    with one top-``k`` search, which gives their candidates (entries above ``threshold -
    delta``) and their near-best entries (within ``delta`` of the tile's float32 best,
    :class:`~dedup_index.search.tiles.NearBest`) at once.  A row whose whole list is
    candidates (or near-ties) may have been cut short and is completed with a range
    search.  For the base rows' best query (``base_best``) each base tile searches an
    ``IndexFlatIP`` of the queries the same way: the full square, twice.  The pairs and
    maxima are canonical, so the result equals ``cross_search``'s bit for bit.
    """
    m, d = queries.shape
    n = base.shape[0]
    empty = np.zeros(0, np.int64)
    if m == 0 or n == 0:
        return CrossResult(empty, empty, np.zeros(0), np.full(m, -np.inf), np.full(n, -np.inf))
    faiss = faiss_module(threads)
    delta = candidate_delta(d)
    radius = np.float32(threshold - delta)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    q_near = NearBest(m, delta)
    b_near = NearBest(n, delta)
    q_index = None
    if base_best:
        q_index = faiss.IndexFlatIP(d)
        q_index.add(queries)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for c, e in _db_tiles(n, db_block):
        tile = rows_of(base, c, e)
        ids = np.arange(c, e, dtype=np.int64)
        if base_live is not None and not base_live[c:e].all():
            live = base_live[c:e]
            tile, ids = np.ascontiguousarray(tile[live]), ids[live]
        if ids.size == 0:
            continue
        index = faiss.IndexFlatIP(d)
        index.add(tile)
        for a in range(0, m, query_block):
            rows = np.arange(a, min(m, a + query_block), dtype=np.int64)
            side = _TopK(index, queries[a : a + query_block], ids, k)
            found.append(side.candidates(rows, radius))
            q_near.update(rows, side.best, side.gather)
        del index
        if q_index is not None:
            for t in range(0, ids.size, query_block):
                side = _TopK(q_index, tile[t : t + query_block], np.arange(m), k)
                b_near.update(ids[t : t + query_block], side.best, side.gather)
    q = np.concatenate([f[0] for f in found]) if found else empty
    b = np.concatenate([f[1] for f in found]) if found else empty
    key = np.unique(q * n + b)
    return cross_result(
        queries, base, threshold, key // n, key % n, q_near, b_near if base_best else None
    )


class _TopK:
    """A top-``k`` search of rows ``x`` in a flat ``index`` whose labels map to ``ids``:
    each row's float32 best, its candidates and its near-best entries, the lists that may
    have been cut short completed by a range search."""

    def __init__(self, index, x: np.ndarray, ids: np.ndarray, k: int) -> None:
        self.index, self.x, self.ids = index, x, ids
        self.k = min(k, ids.size)
        self.scores, labels = index.search(x, self.k)
        self.labels = labels.astype(np.int64)
        self.full = self.k < ids.size  # a list of k entries may leave some out
        self.best = self.scores[:, 0].copy()

    def _at_least(self, sel: np.ndarray, lo: np.ndarray):
        """``(index into sel, label, score)`` of every entry ``>= lo`` of rows ``sel``."""
        scores, labels = self.scores[sel], self.labels[sel]
        cut = (scores[:, -1] >= lo) if self.full else np.zeros(sel.size, dtype=bool)
        li, lj = np.nonzero((scores >= lo[:, None]) & ~cut[:, None])
        parts = [(li, labels[li, lj], scores[li, lj])]
        if cut.any():  # range search keeps scores > radius: just below the lowest bound
            rows = np.flatnonzero(cut)
            below = np.nextafter(np.float32(lo[rows].min()), np.float32(-np.inf))
            lims, vals, labs = self.index.range_search(self.x[sel[rows]], float(below))
            owner = np.repeat(rows, np.diff(lims.astype(np.int64)))
            ok = vals >= lo[owner]
            parts.append((owner[ok], labs.astype(np.int64)[ok], vals[ok]))
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    def candidates(self, rows: np.ndarray, radius: np.float32):
        """``(row, id)`` of the entries above ``radius`` (float32)."""
        sel = np.arange(self.x.shape[0])
        lo = np.full(sel.size, np.nextafter(radius, np.float32(np.inf)), dtype=np.float32)
        li, lab, _ = self._at_least(sel, lo)
        return rows[li], self.ids[lab]

    def gather(self, sel: np.ndarray, lo: np.ndarray):
        """The :class:`~dedup_index.search.tiles.NearBest` gather: ``(local row, id,
        float32 score)`` of the entries ``>= lo`` of local rows ``sel``."""
        li, lab, vals = self._at_least(sel, np.asarray(lo, dtype=np.float32))
        return sel[li], self.ids[lab], vals
