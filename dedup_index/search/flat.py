"""``flat`` backend: FAISS ``IndexFlatIP`` range search over database tiles.

The database is split into tiles of ``db_block`` rows, each its own ``IndexFlatIP``; the
queries go in blocks of ``query_block`` rows.  Tiling both sides bounds FAISS's per-query
result buffers (it keeps ~40 bytes per query and 1024-row database block even with no
hits) and lets us skip tiles lying wholly below the diagonal, where every hit would have
``j < i``.  Scores are float32 candidates at ``threshold - delta``; decisions are taken on
the canonical rescoring (see :mod:`dedup_index.search.canonical`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .canonical import candidate_delta, canonical_scores
from .pairs import PairSet, best_pair_score, rescore_candidates

DEFAULT_QUERY_BLOCK = 4096
DEFAULT_DB_BLOCK = 262_144
#: Neighbours asked of FAISS per row when looking for the true nearest neighbour.
NEAREST_K = 16


def _faiss(threads: int | None):
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(threads)
    return faiss


def _db_tiles(n: int, db_block: int) -> list[tuple[int, int]]:
    return [(c, min(n, c + db_block)) for c in range(0, n, db_block)]


def flat_candidates(
    embeddings: np.ndarray,
    radius: float,
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
    db_block: int = DEFAULT_DB_BLOCK,
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(i, j)`` blocks of row pairs with ``i < j`` and float32 score ``> radius``."""
    faiss = _faiss(threads)
    n, d = embeddings.shape
    for c, e in _db_tiles(n, db_block):
        index = faiss.IndexFlatIP(d)
        index.add(embeddings[c:e])
        # Query rows at or beyond the tile's end can only pair with earlier rows: skip.
        for a in range(0, min(n, e), query_block):
            b = min(e, a + query_block)
            lims, _, labels = index.range_search(embeddings[a:b], radius)
            counts = np.diff(lims.astype(np.int64))
            qi = np.repeat(np.arange(a, b, dtype=np.int64), counts)
            qj = labels.astype(np.int64) + c
            upper = qj > qi
            yield qi[upper], qj[upper]
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


def flat_nearest(
    embeddings: np.ndarray,
    pairs: PairSet,
    threshold: float,
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
    db_block: int = DEFAULT_DB_BLOCK,
    threads: int | None = None,
) -> np.ndarray:
    """Exact ``max(0, max_{k != j} s(j, k))`` per row, canonical scores.

    Rows with a pair at or above the threshold already know their nearest neighbour:
    any closer row would score above ``threshold - delta`` in float32 and so be a pair
    too.  The other rows ask FAISS for their top neighbours, keep every neighbour
    within ``delta`` of the float32 best (a float32 near-tie can hide the true maximum)
    and rescore those canonically; a row whose near-ties fill the whole top-k list is
    recomputed against all rows.
    """
    n, d = embeddings.shape
    best = best_pair_score(n, pairs)
    if n < 2:
        return np.zeros(n, dtype=np.float64)
    todo = np.flatnonzero(best < threshold)
    if todo.size:
        delta = candidate_delta(d)
        k = min(n, NEAREST_K)
        faiss = _faiss(threads)
        for a in range(0, todo.size, query_block):
            rows = todo[a : a + query_block]
            scores, labels = _topk(faiss, embeddings, rows, k, db_block)
            cand_i, cand_j = _near_ties(embeddings, rows, scores, labels, delta, k == n)
            s = canonical_scores(embeddings, cand_i, cand_j)
            np.maximum.at(best, cand_i, s)
    return np.maximum(best, 0.0)


def _topk(faiss, embeddings, rows, k, db_block):
    """Top-``k`` float32 scores and labels of ``rows`` against all rows, tile by tile."""
    n, d = embeddings.shape
    queries = embeddings[rows]
    all_s, all_l = [], []
    for c, e in _db_tiles(n, db_block):
        index = faiss.IndexFlatIP(d)
        index.add(embeddings[c:e])
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


def _near_ties(embeddings, rows, scores, labels, delta, complete):
    """Candidate ``(row, neighbour)`` pairs whose float32 score is within ``delta`` of the best."""
    not_self = (labels != rows[:, None]) & (labels >= 0)
    masked = np.where(not_self, scores, -np.inf)
    best32 = masked.max(axis=1)
    keep = not_self & (scores >= (best32 - delta)[:, None])
    cand_i = [np.broadcast_to(rows[:, None], labels.shape)[keep]]
    cand_j = [labels[keep]]
    # The list may be cut short when its last entry is still a near-tie of the best.
    if not complete:
        last = scores[:, -1]
        cut = np.flatnonzero(last >= best32 - delta)
        if cut.size:
            drop = np.isin(cand_i[0], rows[cut])
            cand_i[0], cand_j[0] = cand_i[0][~drop], cand_j[0][~drop]
            for r in rows[cut]:
                full = embeddings @ embeddings[r]
                full[r] = -np.inf
                near = np.flatnonzero(full >= full.max() - delta)
                cand_i.append(np.full(near.size, r, dtype=np.int64))
                cand_j.append(near.astype(np.int64))
    return np.concatenate(cand_i), np.concatenate(cand_j)
