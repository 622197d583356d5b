"""``hnsw`` backend: FAISS ``IndexHNSWFlat`` (inner product) range search; approximate.

Search goes through :func:`dedup_index.search.ivf.index_search` (range search at
``threshold - delta`` with hits taken in both directions, canonical rescoring, top-``k``
near-ties for the nearest-neighbour lower bound); see that module for what is exact
whatever the settings (every reported score, precision 1) and what is not (recall).

How FAISS 1.15.1 answers an HNSW range search (read from its source and checked here):

- It is *not* a top-``efSearch`` search cut at the radius.  After the greedy descent of
  the upper layers it runs the level-0 beam search with a candidate heap of
  ``efSearch`` entries, and reports *every* node whose score it computed on the way
  that is above the radius.  So a query can get many more than ``efSearch`` results
  (a 1500-row near-copy group: ~340 results per query at efSearch 16, ~950 at 64,
  ~1385 at 256, all 1500 at 1024), but a group much larger than ``efSearch`` is only
  partly found: the beam stops once ``efSearch`` candidates are better than the next.
  Hence the default ``ef_search`` (:data:`DEFAULT_EF_SEARCH`) and the advice to raise
  it when near-duplicate groups are large.
- With ``efSearch >= N`` the stop rule never fires and the search visits every node
  reachable on level 0 from where the descent ended: exact, *unless* the graph has an
  island.  Exact (or near-exact, cosine > 0.99999) copies make islands: once a group of
  copies has more members than the level-0 degree ``2 m``, each member's neighbour list
  fills with other members (ties are never pruned), no edge leaves the group, and a
  query that lands in it never sees the rest of the index (seen here: 66 copies among
  90 rows at ``m = 32``; 200 near-copies among 500).  Worse, a row *near* the group
  (a re-encode of a copied image) descends into the island too, so pairs between such
  rows are missed even with ``efSearch >= N``.  Hence ``collapse_copies`` (default on):
  rows with identical vectors are put in the graph once, and their pairs are expanded
  afterwards (copies have bit-identical canonical scores, so nothing is approximated).
  Islands of distinct near-copies (> ``2 m`` rows above cosine ~0.99999) remain: raise
  ``m``, or use ``ivf``, which has no such failure.
- ``IndexHNSW.range_search`` splits the queries into chunks of
  ``10**8 // (max_level * d * efSearch + 1)`` (FAISS's interrupt-check period while
  Python's interrupt callback is installed, as it is on import), and the range result
  handler throws when a second chunk allocates its results: the exception escapes an
  OpenMP region and the process aborts (``terminate called ... RangeSearchResult::
  do_allocation``).  Checked exactly: d=128, efSearch=256, max_level=2 aborts at 1526
  queries and not at 1525.  Query blocks are therefore clamped to
  :func:`safe_range_block` (and default to a small 256).

Graph construction is multi-threaded, so the graph (and so recall) can differ between
runs and thread counts; reported pairs and scores never depend on it beyond which pairs
are found.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..validation import check_positive_int
from .canonical import canonical_scores, rows_of
from .flat import NEAREST_K, faiss_module
from .ivf import ADD_BLOCK, index_search
from .pairs import PairSet

__all__ = [
    "DEFAULT_EF_SEARCH",
    "build_hnsw_index",
    "copy_groups",
    "hnsw_search",
    "safe_range_block",
]

logger = logging.getLogger(__name__)

#: Beam width of a search unless told otherwise: at least 64, and 4x the neighbours
#: asked for the nearest-neighbour pass so the top of each list is reliable.
DEFAULT_EF_SEARCH = max(64, 4 * NEAREST_K)
#: FAISS's interrupt-check budget, in ``max_level * d * efSearch`` units, per chunk.
_FAISS_CHECK_FLOPS = 10**8
#: Scratch for hashing rows (their bits widened to uint64).
_HASH_BLOCK_BYTES = 32 << 20


def hnsw_search(
    embeddings: Any,
    threshold: float,
    *,
    m: int = 32,
    ef_construction: int = 200,
    ef_search: int | None = None,
    nearest: bool = True,
    threads: int | None = None,
    query_block: int = 256,
    collapse_copies: bool = True,
) -> tuple[PairSet, np.ndarray | None]:
    """Pairs ``i < j`` with canonical similarity ``>= threshold`` found by an HNSW graph.

    Args:
        embeddings: ``(N, D)`` unit float32 rows, or anything indexable like them.
        threshold: cosine similarity; ``>=`` is decided on the canonical score.
        m: graph degree (``2 m`` links per node on level 0).
        ef_construction: beam width while building the graph.
        ef_search: beam width while searching (default :data:`DEFAULT_EF_SEARCH`); it
            bounds how far a range search explores, not how many results it returns
            (module docstring).  ``ef_search >= N`` visits the whole reachable graph.
        nearest: also compute ``max(0, best canonical score to another row)`` per row, a
            lower bound of the true nearest-neighbour similarity.
        threads: FAISS (OpenMP) threads; default FAISS's own.
        query_block: query rows per FAISS call; clamped to :func:`safe_range_block`.
        collapse_copies: put rows with identical vectors in the graph once (see the
            module docstring: large groups of copies otherwise make unreachable islands).

    Returns:
        ``(pairs, nearest)``; ``nearest`` is None when ``nearest=False``.
    """
    query_block = check_positive_int(query_block, "query_block")
    ef_search = check_positive_int(ef_search, "ef_search", allow_none=True)
    ef_search = DEFAULT_EF_SEARCH if ef_search is None else ef_search
    n = embeddings.shape[0]
    if n < 2:
        return PairSet.empty(), (np.zeros(n, dtype=np.float64) if nearest else None)
    reps, group = copy_groups(embeddings) if collapse_copies else (None, None)
    if reps is None or reps.size == n:
        return _search_graph(
            embeddings, threshold, m, ef_construction, ef_search, nearest, threads, query_block
        )
    logger.debug("hnsw: %d rows, %d distinct vectors in the graph", n, reps.size)
    rep_pairs, rep_near = _search_graph(
        _Subset(embeddings, reps),
        threshold,
        m,
        ef_construction,
        ef_search,
        nearest,
        threads,
        query_block,
    )
    return _expand_copies(embeddings, threshold, reps, group, rep_pairs, rep_near)


def _search_graph(
    embeddings: Any,
    threshold: float,
    m: int,
    ef_construction: int,
    ef_search: int,
    nearest: bool,
    threads: int | None,
    query_block: int,
) -> tuple[PairSet, np.ndarray | None]:
    """Build the graph over ``embeddings`` and search it with every row."""
    n = embeddings.shape[0]
    if n < 2:
        return PairSet.empty(), (np.zeros(n, dtype=np.float64) if nearest else None)
    index = build_hnsw_index(embeddings, m=m, ef_construction=ef_construction, threads=threads)
    index.hnsw.efSearch = ef_search
    block = min(query_block, safe_range_block(index))
    logger.debug(
        "hnsw: N=%d m=%d efConstruction=%d efSearch=%d block=%d",
        n,
        m,
        ef_construction,
        ef_search,
        block,
    )
    return index_search(index, embeddings, threshold, nearest=nearest, query_block=block)


def build_hnsw_index(
    embeddings: Any, *, m: int = 32, ef_construction: int = 200, threads: int | None = None
):  # -> faiss.IndexHNSWFlat
    """An ``IndexHNSWFlat`` (inner product) holding every row, added in blocks."""
    faiss = faiss_module(check_positive_int(threads, "threads", allow_none=True))
    m = check_positive_int(m, "m")
    ef_construction = check_positive_int(ef_construction, "ef_construction")
    n, d = embeddings.shape
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    for a in range(0, n, ADD_BLOCK):
        index.add(rows_of(embeddings, a, min(n, a + ADD_BLOCK)))
    return index


def safe_range_block(index: Any) -> int:
    """Most queries one ``range_search`` call on ``index`` may take without aborting:
    FAISS's chunk size ``10**8 // (max_level * d * efSearch + 1)`` (module docstring).
    Depends on ``efSearch``: call it after setting that."""
    work = int(index.hnsw.max_level) * int(index.d) * int(index.hnsw.efSearch)
    return max(1, _FAISS_CHECK_FLOPS // (work + 1))


# ------------------------------------------------------------------------ exact copies


def copy_groups(embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows with equal vectors: ``(reps, group)``, ``reps`` the first row of each distinct
    vector (ascending) and ``group[r]`` the position in ``reps`` of row ``r``'s vector.

    Rows are hashed block by block (a random linear hash of the float32 bit patterns,
    modulo 2**64), then each row is compared with the first row of its hash: a row that
    differs (a collision) stays its own representative, so the grouping is never wrong,
    at worst incomplete.  Equality is float equality (``-0.0 == 0.0``), under which
    canonical scores are identical.  Memory ``O(N)`` beyond one block of rows.
    """
    n, d = embeddings.shape
    block = max(1, _HASH_BLOCK_BYTES // (8 * d))
    coeff = np.random.default_rng(0x5EED).integers(0, 2**63, size=d, dtype=np.uint64) * 2 + 1
    hashes = np.empty(n, dtype=np.uint64)
    for a in range(0, n, block):
        bits = rows_of(embeddings, a, min(n, a + block)).view(np.uint32).astype(np.uint64)
        hashes[a : a + block] = bits @ coeff
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rep_of = first[inverse.ravel()].astype(np.int64)
    for a in range(0, n, block):
        b = min(n, a + block)
        same = (rows_of(embeddings, a, b) == _gather(embeddings, rep_of[a:b])).all(axis=1)
        rep_of[a:b][~same] = np.arange(a, b, dtype=np.int64)[~same]
    reps = np.unique(rep_of)
    return reps, np.searchsorted(reps, rep_of)


class _Subset:
    """Rows ``reps`` of ``embeddings`` as an array-like (slices and integer arrays)."""

    def __init__(self, embeddings: Any, reps: np.ndarray) -> None:
        self.embeddings = embeddings
        self.reps = reps
        self.shape = (int(reps.size), int(embeddings.shape[1]))

    def __getitem__(self, key: Any) -> np.ndarray:
        return _gather(self.embeddings, self.reps[key])


def _gather(embeddings: Any, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(embeddings[np.asarray(rows, dtype=np.int64)], dtype=np.float32)


def _expand_copies(
    embeddings: Any,
    threshold: float,
    reps: np.ndarray,
    group: np.ndarray,
    rep_pairs: PairSet,
    rep_near: np.ndarray | None,
) -> tuple[PairSet, np.ndarray | None]:
    """Pairs and nearest scores of all rows from those of the distinct vectors.

    A pair of distinct vectors ``(a, b)`` stands for every (copy of ``a``, copy of ``b``)
    pair with the same canonical score; two copies of one vector pair at that vector's
    canonical self-score when it reaches the threshold, and it is a neighbour score of
    each copy whatever the threshold.
    """
    order = np.argsort(group, kind="stable")  # rows grouped, ascending within a group
    sizes = np.bincount(group, minlength=reps.size)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    self_s = canonical_scores(embeddings, reps, reps)

    # Cross pairs: members(a) x members(b) for each pair of distinct vectors.
    ga, gb = rep_pairs.i, rep_pairs.j
    count = sizes[ga] * sizes[gb]
    k = np.repeat(np.arange(ga.size), count)
    pos = _run_positions(count)
    ri = order[starts[ga[k]] + pos // sizes[gb[k]]]
    rj = order[starts[gb[k]] + pos % sizes[gb[k]]]
    parts_i, parts_j = [np.minimum(ri, rj)], [np.maximum(ri, rj)]
    parts_s = [rep_pairs.s[k]]

    # Pairs within a group of copies: every (p, q), p < q, of its members.
    within = np.flatnonzero((sizes > 1) & (self_s >= threshold))
    if within.size:
        g = np.repeat(within, sizes[within])  # one entry per member, in order
        local = _run_positions(sizes[within])
        member = order[starts[g] + local]
        later = sizes[g] - 1 - local  # members after this one in its group
        p = np.repeat(np.arange(g.size), later)
        step = _run_positions(later) + 1
        parts_i.append(member[p])
        parts_j.append(member[p + step])
        parts_s.append(self_s[g[p]])
    i, j, s = (np.concatenate(x) for x in (parts_i, parts_j, parts_s))
    sort = np.lexsort((j, i))
    pairs = PairSet(i[sort], j[sort], s[sort])
    if rep_near is None:
        return pairs, None
    near = rep_near[group]
    copies = sizes[group] > 1
    near[copies] = np.maximum(near[copies], self_s[group[copies]])
    return pairs, near


def _run_positions(counts: np.ndarray) -> np.ndarray:
    """``0, 1, ..., c - 1`` for each ``c`` in ``counts``, concatenated."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
