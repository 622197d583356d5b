"""``ivf`` backend: FAISS ``IndexIVFFlat`` (inner product) range search; approximate.

The rows are clustered into ``nlist`` inverted lists (spherical k-means on a seeded
random sample); a query scans only the ``nprobe`` lists whose centroids are nearest to
it.  A pair is missed when neither row's probes reach the other's list, so recall is
below 1 by an amount that depends on the data; measure it with
:func:`dedup_index.search.recall.measure_recall`, never assume it.  With
``nprobe = nlist`` every list is scanned and the result equals the exact backends'.

What *is* exact, whatever the settings: every pair reported has its canonical score
(:mod:`~dedup_index.search.canonical`) and passed ``>= threshold`` on that score, so
precision is 1; and ``max_similarity`` is a canonical score of a real neighbour, so it
is a *lower bound* of the true nearest-neighbour similarity (equal to it when the
search is exhaustive).

The search driver :func:`index_search` works on any FAISS index that has
``range_search`` and ``search`` over the same rows (the ``hnsw`` backend uses it too):

- pairs: ``range_search`` at ``threshold - delta`` query block by query block.  A hit
  ``(q, h)`` is kept in *both* directions as the pair ``(min, max)``: an approximate
  index can find ``h`` from ``q`` and not ``q`` from ``h``, and either is enough.
  Candidates are then rescored canonically.
- nearest neighbours: a top-``k`` search per row; the non-self entries within ``delta``
  of the float32 best are rescored canonically (a float32 near-tie can hide the true
  maximum) and credited to both rows of each entry; merged with the pair scores.  Rows
  whose list is *all* near-ties (more than ``k`` rows tie for nearest, e.g. exact copies
  below the threshold) are searched again with ``k`` doubled, up to ``N``, so the
  exhaustive setting stays exact.

Cost note (DESIGN.md): FAISS scans inverted lists query by query, off the BLAS path, so
for all-pairs over a large N this is slower than the exact ``blocked`` tiles; it is
meant for a few queries against a large index and for recall studies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..validation import check_positive_int
from .canonical import candidate_delta, canonical_scores, rows_of
from .flat import NEAREST_K, faiss_module
from .pairs import PairSet, best_pair_score, rescore_candidates

__all__ = [
    "DEFAULT_NPROBE",
    "build_ivf_index",
    "default_nlist",
    "default_train_size",
    "index_search",
    "ivf_search",
    "trained_ivf_index",
]

logger = logging.getLogger(__name__)

#: Lists scanned per query unless told otherwise (clamped to ``nlist``).
DEFAULT_NPROBE = 16
#: FAISS's k-means warns below this many training points per centroid.
MIN_TRAIN_PER_LIST = 39
#: Training points per list by default: well above FAISS's minimum, well below its
#: subsampling limit (256 per list), so k-means sees every sampled point.
TRAIN_PER_LIST = 64
#: Rows added to an index per call (bounds the float32 copy of a store-backed input).
ADD_BLOCK = 65_536
#: Bound on ``rows x k`` of one top-``k`` call while completing near-tie rows
#: (12 bytes an entry: 48 MiB).
_TOPK_ENTRIES = 1 << 22


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` rows: ``round(4 * sqrt(n))``, at most ``n // 39`` (so
    k-means has FAISS's minimum of 39 training points per list), at least 1."""
    return max(1, min(round(4.0 * math.sqrt(n)), n // MIN_TRAIN_PER_LIST))


def default_train_size(n: int, nlist: int) -> int:
    """Training sample for ``nlist`` lists: ``64 * nlist`` rows (all rows if fewer)."""
    return min(n, TRAIN_PER_LIST * nlist)


def ivf_search(
    embeddings: Any,
    threshold: float,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    nearest: bool = True,
    train_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    query_block: int = 4096,
) -> tuple[PairSet, np.ndarray | None]:
    """Pairs ``i < j`` with canonical similarity ``>= threshold`` found by an IVF index.

    Args:
        embeddings: ``(N, D)`` unit float32 rows, or anything indexable like them (an
            :class:`~dedup_index.store.EmbeddingStore`).
        threshold: cosine similarity; ``>=`` is decided on the canonical score.
        nlist: inverted lists (default :func:`default_nlist`, and at most
            ``train_size // 39`` when ``train_size`` is given); more than the training
            rows is clamped to them.
        nprobe: lists scanned per query (default 16, clamped to ``nlist``);
            ``nprobe = nlist`` is exhaustive and exact.
        nearest: also compute ``max(0, best canonical score to another row)`` per row, a
            lower bound of the true nearest-neighbour similarity (exact when exhaustive).
        train_size: rows sampled (without replacement, seeded) to train k-means
            (default :func:`default_train_size`); clamped to N, at least ``nlist``.
        seed: seeds the training sample and FAISS's k-means.
        threads: FAISS (OpenMP) threads; default FAISS's own.
        query_block: query rows per FAISS call (bounds the result buffers).

    Returns:
        ``(pairs, nearest)``; ``nearest`` is None when ``nearest=False``.
    """
    query_block = check_positive_int(query_block, "query_block")
    nprobe = check_positive_int(nprobe, "nprobe", allow_none=True)
    n = embeddings.shape[0]
    if n < 2:
        return PairSet.empty(), (np.zeros(n, dtype=np.float64) if nearest else None)
    index = build_ivf_index(
        embeddings, nlist=nlist, train_size=train_size, seed=seed, threads=threads
    )
    index.nprobe = min(index.nlist, DEFAULT_NPROBE if nprobe is None else nprobe)
    logger.debug("ivf: N=%d nlist=%d nprobe=%d", n, index.nlist, index.nprobe)
    return index_search(index, embeddings, threshold, nearest=nearest, query_block=query_block)


def build_ivf_index(
    embeddings: Any,
    *,
    nlist: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
):  # -> faiss.IndexIVFFlat
    """A trained ``IndexIVFFlat`` (inner product, flat quantizer) holding every row
    (:func:`trained_ivf_index`, then the rows added in blocks of :data:`ADD_BLOCK`)."""
    index = trained_ivf_index(
        embeddings, nlist=nlist, train_size=train_size, seed=seed, threads=threads
    )
    n = embeddings.shape[0]
    for a in range(0, n, ADD_BLOCK):
        index.add(rows_of(embeddings, a, min(n, a + ADD_BLOCK)))
    return index


def trained_ivf_index(
    embeddings: Any,
    *,
    nlist: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
):  # -> faiss.IndexIVFFlat
    """An empty ``IndexIVFFlat`` (inner product, flat quantizer) trained on ``embeddings``.

    Training: spherical k-means (centroids on the unit sphere, where inner product is
    cosine) on ``train_size`` rows drawn without replacement with ``seed``.  With one
    list there is nothing to learn, so k-means is skipped (FAISS would warn about too
    few points on tiny inputs): the first row is the one centroid.
    """
    faiss = faiss_module(check_positive_int(threads, "threads", allow_none=True))
    n, d = embeddings.shape
    if n < 1:
        raise ValueError("an IVF index needs at least one row")
    if train_size is None:
        nlist = default_nlist(n) if nlist is None else check_positive_int(nlist, "nlist")
        train_n = default_train_size(n, nlist)
    else:
        train_n = min(n, check_positive_int(train_size, "train_size"))
        if nlist is None:  # as many lists as the sample trains well
            nlist = min(default_nlist(n), max(1, train_n // MIN_TRAIN_PER_LIST))
        nlist = check_positive_int(nlist, "nlist")
    if nlist > train_n:
        logger.info("ivf: nlist=%d > %d training rows; using nlist=%d", nlist, train_n, train_n)
        nlist = train_n

    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    if nlist == 1:
        quantizer.add(rows_of(embeddings, 0, 1))
        index.is_trained = True
    else:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=train_n, replace=False))
        train = np.ascontiguousarray(embeddings[sample], dtype=np.float32)
        cp = index.cp
        cp.seed = int(seed) % (2**31)
        cp.spherical = True
        cp.max_points_per_centroid = max(cp.max_points_per_centroid, -(-train_n // nlist))
        if train_n < MIN_TRAIN_PER_LIST * nlist:
            logger.warning(
                "ivf: %d training rows for %d lists (< %d per list): centroids will be poor",
                train_n,
                nlist,
                MIN_TRAIN_PER_LIST,
            )
            cp.min_points_per_centroid = 1  # said once here instead of on stderr
        index.train(train)
    return index


def index_search(
    index: Any,
    embeddings: Any,
    threshold: float,
    *,
    nearest: bool = True,
    query_block: int = 4096,
    k: int = NEAREST_K,
) -> tuple[PairSet, np.ndarray | None]:
    """Pairs (and nearest-neighbour lower bounds) of ``embeddings`` through ``index``.

    ``index`` is a FAISS inner-product index holding exactly the rows of ``embeddings``
    in order (label = row number) with ``range_search`` and ``search``; its own search
    parameters (``nprobe``, ``efSearch``) are used as set.  See the module docstring.
    """
    n, d = embeddings.shape
    if n < 2:
        return PairSet.empty(), (np.zeros(n, dtype=np.float64) if nearest else None)
    delta = candidate_delta(d)
    blocks = _range_candidates(index, embeddings, threshold - delta, query_block)
    pairs = rescore_candidates(embeddings, blocks, threshold)
    if not nearest:
        return pairs, None
    return pairs, _nearest_lower_bound(
        index, embeddings, threshold, pairs, delta, query_block, min(n, k)
    )


def _range_candidates(
    index: Any, embeddings: Any, radius: float, query_block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(i, j)`` blocks, ``i < j``, of every hit of a range search at ``radius``, taken in
    both directions (a hit ``(q, h)`` gives the pair ``(min, max)``)."""
    n = embeddings.shape[0]
    for a in range(0, n, query_block):
        b = min(n, a + query_block)
        lims, _, labels = index.range_search(rows_of(embeddings, a, b), radius)
        qi = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(lims.astype(np.int64)))
        yield _undirected(qi, labels.astype(np.int64), n)


def _undirected(qi: np.ndarray, qj: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hits ``(qi, qj)`` as distinct pairs ``(lo, hi)``, ``lo < hi``; self and ``-1`` dropped."""
    ok = (qj >= 0) & (qj != qi)
    qi, qj = qi[ok], qj[ok]
    key = np.unique(np.minimum(qi, qj) * n + np.maximum(qi, qj))
    return key // n, key % n


def _nearest_lower_bound(
    index: Any,
    embeddings: Any,
    threshold: float,
    pairs: PairSet,
    delta: float,
    query_block: int,
    k: int,
) -> np.ndarray:
    """``max(0, max canonical score over the neighbours found)`` per row (see module doc)."""
    n = embeddings.shape[0]
    nearest = np.full(n, -np.inf, dtype=np.float64)
    pending = []
    for a in range(0, n, query_block):
        rows = np.arange(a, min(n, a + query_block), dtype=np.int64)
        pending.append(_credit_ties(index, embeddings, rows, k, delta, nearest))
    # A row with a pair at >= threshold has its nearest neighbour among its pairs as far
    # as the range search reached (a closer row is a candidate too): no need to look on.
    nearest = np.maximum(nearest, best_pair_score(n, pairs))
    todo = np.concatenate(pending)
    while todo.size and k < n:
        todo = todo[nearest[todo] < threshold]
        k = min(n, 2 * k)
        step = max(1, min(query_block, _TOPK_ENTRIES // k))
        pending = [
            _credit_ties(index, embeddings, todo[a : a + step], k, delta, nearest)
            for a in range(0, todo.size, step)
        ]
        todo = np.concatenate(pending) if pending else np.zeros(0, np.int64)
    return np.maximum(nearest, 0.0)


def _credit_ties(
    index: Any, embeddings: Any, rows: np.ndarray, k: int, delta: float, nearest: np.ndarray
) -> np.ndarray:
    """Top-``k`` search of ``rows``; raise ``nearest`` of both rows of every near-tie entry
    to its canonical score; return the rows whose full list is all near-ties."""
    n = embeddings.shape[0]
    if rows.size == 0:
        return rows
    queries = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    scores, labels = index.search(queries, k)
    ti, tj, cut = _near_ties(rows, scores, labels.astype(np.int64), delta, complete=k >= n)
    s = canonical_scores(embeddings, ti, tj)
    np.maximum.at(nearest, ti, s)
    np.maximum.at(nearest, tj, s)
    return cut


def _near_ties(
    rows: np.ndarray, scores: np.ndarray, labels: np.ndarray, delta: float, *, complete: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries within ``delta`` of each row's float32 best (self and ``-1`` padding
    excluded), and the rows whose list is full and all near-ties, so may be cut short.

    Like :func:`dedup_index.search.flat._near_ties`, but an approximate index can return
    fewer than ``k`` neighbours (label ``-1``): such a list is complete as far as the
    index reaches, and a row with no neighbour at all is not a near-tie row.
    """
    valid = (labels >= 0) & (labels != rows[:, None])
    best = np.where(valid, scores, -np.inf).max(axis=1)
    keep = valid & (scores >= (best - delta)[:, None])
    ti = np.broadcast_to(rows[:, None], labels.shape)[keep]
    tj = labels[keep]
    if complete:
        return ti, tj, np.zeros(0, np.int64)
    cut = (labels >= 0).all(axis=1) & np.isfinite(best) & (scores[:, -1] >= best - delta)
    return ti, tj, rows[cut]
