"""``partitioned`` backend: approximate all-pairs search for large N, exact inside partitions.

Spherical k-means centroids (FAISS ``Kmeans`` on a sample) cut the collection into ``C``
partitions; every row joins the partition of its nearest centroid and those of its next
``p - 1`` nearest whose similarity is within ``margin`` of the nearest, so a pair near a
boundary still shares a partition.  (Joining the ``p`` nearest unconditionally makes
"hub" centroids near the collection's mean direction — CLIP embeddings share one — the
second choice of most rows: measured on CLIP-like data, one partition held 40% of the
rows and the work was 16x that of the margin rule at the same recall.)

The centroids are balanced on the k-means sample
(:func:`~dedup_index.search.centroids.balanced_centroids`, shared with the IVF index): a
list the sample shows over twice the mean is split by a k-means of its own sampled rows,
so a Zipf-sized cluster gets as many centroids as its size asks for, and the whole
collection is assigned once.  (Before, each oversize partition was split by a k-means and
an assignment of its own rows: at 1M CLIP-like rows 572 splits, a 73k-row partition
left, and 0.049 of the exact comparisons; balanced, the largest partition holds ~16k
rows, mostly rows probing a hub, and the work is 0.005 of the exact comparisons at the
same recall.)  Partitions still grown beyond ``max_partition`` rows are split again the
old way.  Inside each partition the exact ``blocked`` search runs (upper-triangle
GEMM tiles, canonical rescoring); pairs found in more than one partition are kept once.
The cost is about ``p^2 N^2 D / C`` against ``N^2 D`` for exact search.

SemDeDup-style pipelines compare rows only within their single nearest cluster and miss
every pair split by a boundary; with ``p >= 2`` those pairs are found unless both rows'
``p`` nearest centroids are disjoint.  What is missed is measured, never assumed: see
:func:`dedup_index.search.recall.measure_recall`.  Every pair reported is exact (its score
is canonical and ``>= threshold``); a row's ``max_similarity`` below the threshold is a
lower bound (its nearest neighbour may live in a partition it did not join).  With
``n_probe = n_clusters`` every row joins every partition and the result is exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocked import HeapTrim, blocked_search, worker_count
from .centroids import SAMPLE_PER_LIST, balanced_centroids, spherical_kmeans
from .flat import faiss_module
from .pairs import PairSet, concat_pairsets
from .precision import Arithmetic, arithmetic

logger = logging.getLogger(__name__)

#: k-means training rows per centroid, at least: FAISS's own minimum (39, below which it
#: prints "please provide at least N training points" on stderr), met by sampling enough
#: rows rather than by silencing it; only a collection with fewer rows than that trains
#: on all of them.
MIN_TRAIN_PER_CENTROID = 39

#: k-means training rows per centroid when an oversize partition is split again.  The
#: split's k-means trained on the whole partition before (all of it up to ``sample``):
#: at 1M rows that was 134 s of k-means over 578 splits, more than the top level's
#: 20 s; 64 rows a centroid gave the same recall (616/620 sampled pairs) at a little more
#: tile work (0.049 against 0.047 of the exact comparisons; 0.022 against 0.016 at 200k).
SPLIT_TRAIN_PER_CENTROID = 64

#: A row joins a further partition only if its centroid is within this cosine of the
#: nearest one (see :func:`default_params`).
DEFAULT_MARGIN = 0.02

#: Near-ties (:class:`PartitionParams` ``n_ties``): a row joins further partitions whose
#: centroids are within this cosine of its nearest (scaled with D as the margin is) ...
DEFAULT_TIE_MARGIN = 0.005
#: ... up to this many beyond ``n_probe``, when the collection is cut into regions (see
#: :func:`default_params`).
REGION_TIES = 5

#: Rows a region should hold (:func:`_regions`): the size whose one-level partitioning
#: was measured (1M x 512 in 85 s at recall 0.998, bench/RESULTS.md).
REGION_ROWS = 1_000_000

#: From this many rows :func:`default_params` cuts the collection into regions of about
#: :data:`REGION_ROWS` rows (measured at 10M: bench/RESULTS.md; one level at 10M had
#: partitions of ~120k rows, ~66 min of tiles).
REGIONS_FROM_ROWS = 4_000_000

#: Sampled rows per region the regions' own k-means trains on (at least 39 a centroid,
#: the FAISS minimum; a few thousand per region place the coarse borders well).
REGION_SAMPLE_PER_LIST = 4096


@dataclass(frozen=True)
class PartitionParams:
    """``n_clusters`` (C), ``n_probe`` (p: most partitions per row), ``margin`` (a row
    joins a further partition only if its centroid is within this cosine of the
    nearest one; 2 or more means always), ``max_partition`` (rows above which a
    partition is split again), ``sample`` (k-means training rows; raised to
    :data:`MIN_TRAIN_PER_CENTROID` a centroid where the rows allow), ``niter``,
    ``n_regions`` (above 1: coarse regions first, each with ``n_clusters`` centroids
    of its own for a region of ``N / n_regions`` rows, trained on ``sample`` of its rows;
    a row is compared with the centroids of its ``n_probe`` nearest regions only; see
    :func:`_regions`), ``n_ties`` and ``tie_margin`` (beyond its ``n_probe``, a row
    joins up to ``n_ties`` more partitions whose centroids are within ``tie_margin`` of
    its nearest: near-ties, which a copy of the row may rank the other way; None:
    :meth:`tie_margin_for`)."""

    n_clusters: int
    n_probe: int
    max_partition: int
    sample: int
    seed: int = 0
    niter: int = 10
    margin: float | None = None
    n_regions: int = 1
    n_ties: int = 0
    tie_margin: float | None = None

    @property
    def exhaustive(self) -> bool:
        """Every row in every partition: the search is then exact."""
        every = self.n_probe >= max(self.n_clusters, self.n_regions)
        return every and self.margin is not None and self.margin >= 2.0

    def margin_for(self, d: int) -> float:
        """The margin at dimension ``d``: ``margin``, or when None :data:`DEFAULT_MARGIN`
        scaled by ``sqrt(512 / d)`` (how far a near-copy's offset moves its centroid
        scores: its projection on a direction shrinks as ``1 / sqrt(d)``; 0.02 at 512 is
        what the 1M measurement needed, and the same rule gives ~0.06 at d = 48, where
        0.02 missed 3% of the copies in ``tests/test_partitioned.py``)."""
        if self.margin is not None:
            return float(self.margin)
        return DEFAULT_MARGIN * math.sqrt(512 / max(1, d))

    def tie_margin_for(self, d: int) -> float:
        """The tie margin at dimension ``d``: ``tie_margin``, or when None
        :data:`DEFAULT_TIE_MARGIN` scaled as :meth:`margin_for` scales its default; never
        wider than the margin."""
        tie = self.tie_margin
        if tie is None:
            tie = DEFAULT_TIE_MARGIN * math.sqrt(512 / max(1, d))
        return min(float(tie), self.margin_for(d))


@dataclass
class PartitionInfo:
    """What the partitioning looked like: sizes and the arithmetic it implies."""

    params: PartitionParams
    partitions: int = 0
    largest: int = 0
    splits: int = 0
    pair_work: float = 0.0  # sum of m^2 / 2 over partitions: row pairs compared
    sizes: list[int] = field(default_factory=list, repr=False)
    regions: list[int] = field(default_factory=list)  # rows whose nearest region it is
    precision: dict[str, Any] = field(default_factory=dict, repr=False)
    #: With ``partitioned_search(..., keep_lists=True)``: the top-level centroids
    #: ``(C, d)`` and each row's nearest one (int32), e.g. an IVF index's coarse
    #: quantizer and lists (:meth:`dedup_index.DedupIndex.add_store`).  None otherwise,
    #: or when the collection was too small to partition.
    centroids: np.ndarray | None = field(default=None, repr=False)
    home: np.ndarray | None = field(default=None, repr=False)

    def summary(self, n: int) -> str:
        full = n * (n - 1) / 2 or 1.0
        return (
            f"C={self.params.n_clusters} p={self.params.n_probe}"
            f"{f' (+{self.params.n_ties} near-ties)' if self.params.n_ties else ''}: "
            f"{self.partitions} partitions "
            f"(largest {self.largest}, {self.splits} split), "
            f"{self.pair_work / full:.3f} of the exact pair comparisons"
        )


def default_params(
    n: int,
    *,
    n_clusters: int | None = None,
    n_probe: int | None = None,
    margin: float | None = None,
    max_partition: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    n_regions: int | None = None,
    n_ties: int | None = None,
    tie_margin: float | None = None,
) -> PartitionParams:
    """Parameters from N (``n_regions``: regions of ``N / n_regions`` rows, each with the
    centroids a collection of that size gets, :func:`_regions`; default one level below
    :data:`REGIONS_FROM_ROWS` rows, regions of about :data:`REGION_ROWS` from there).
    Per region (or the whole collection): about 128 rows per centroid (``C`` at most 2048, before
    balancing adds more), ``p = 2`` (3 above 500k rows, where ``C`` is capped and
    partitions are larger: measured at 1M, recall 0.985 with p = 2, 0.998 with p = 3)
    within a margin (``None``: :meth:`PartitionParams.margin_for`, 0.02 at D = 512),
    partitions split above 8x the mean size (at least 4096 rows), k-means on
    :data:`~.centroids.SAMPLE_PER_LIST` sampled rows per centroid (at least 10k; above
    FAISS's minimum of 39, so it has nothing to warn about).

    Margin 0.02, not 0.05: measured at 1M x 512 with balanced centroids and p = 3 (6000
    sampled rows, 647 exact pairs), margins 0.01, 0.02, 0.03 and 0.05 all found 646;
    the work was 0.0041, 0.0053, 0.0063 and 0.0083 of the exact comparisons (the
    margin feeds the hub partitions).  C = 2048 rather than 1024 at 1M: 1024 (2261
    centroids after balancing) needs 0.013 of the comparisons at the same recall, more
    than the assignment it saves.

    Why 128 rows a centroid: k-means, not the tiles, is most of the work here (41% of a
    220k-row search at 64 rows and 20 training rows a centroid).  Giving FAISS its 39
    training rows at 64 rows a centroid made the search 1.5x slower; half the centroids
    trained on the same number of rows took the time of before, with recall 1.0000
    against 0.9974 (380 sampled pairs, 220k clustered rows; bench/RESULTS.md issue 15).

    Why regions: the tile work is about ``N^2 / C`` and the assignment ``N C``, so one
    level cannot keep both linear in N; with ``C`` capped at 2048 a 10M collection's
    partitions were ~120k rows (100x the 1M tile work), and splitting them again after
    the fact lost recall (0.988 at 2M).  With ~1M-row regions, each training the
    centroids of a 1M collection, ``C`` grows with N and the training stays linear in
    N; every row is then compared with all ``C`` centroids in bf16 (:func:`assign_many`:
    at 10M rows and 49k centroids, ~12 min on 2 cores).  (Partitioning each region on
    its own, a row joining regions by the margin rule, was tried first: coarse centroids
    are about equally near most rows, so at 10M rows joined 2.9 regions each.)

    Why near-ties with regions (``n_ties`` :data:`REGION_TIES`, ``tie_margin``
    :data:`DEFAULT_TIE_MARGIN`): each region trains its own centroids near the data's
    common direction, so a row there sees ~15 near-equal centroids (within 0.001-0.002)
    from different regions, and which 3 of them it joins is a coin toss for a copy and
    its source.  Measured on the 10M store's 49,344 centroids (two 6000-row samples,
    621 and 608 exact pairs; a pair counted found when its rows share a centroid):
    p = 3 found 0.9791 / 0.9655 (2.35 memberships a row), p = 5 0.9887 / 0.9852 (3.45),
    p = 8 0.9984 / 1.0 (4.91); p = 3 plus up to 5 near-ties within 0.005 0.9984 / 1.0
    (3.96), within 0.003 0.9968 / 0.9967 (3.32).  (Merging near-identical centroids
    instead: below cosine 0.99 nothing changed; at 0.98 one merged group held 4783
    centroids.)"""
    r = n_regions or (math.ceil(n / REGION_ROWS) if n >= REGIONS_FROM_ROWS else 1)
    r = max(1, min(r, n)) if n else 1
    per = math.ceil(n / r)  # rows a region, before rows near a border join two
    c = n_clusters or max(1, min(2048, round(per / 128)))
    c = max(1, min(c, per)) if per else 1
    p = max(1, min(n_probe or (3 if n > 500_000 else 2), max(c, r)))
    mean = min(p, c) * per / c if c else per
    m = max_partition or max(4096, int(8 * mean))
    s = sample or min(per, max(SAMPLE_PER_LIST * c, 10_000))
    ties = (REGION_TIES if r > 1 else 0) if n_ties is None else n_ties
    if isinstance(ties, bool) or not isinstance(ties, int) or ties < 0:
        raise ValueError(f"n_ties must be an integer >= 0; got {n_ties!r}")
    if tie_margin is not None and not 0.0 <= float(tie_margin) <= 2.0:
        raise ValueError(f"tie_margin must be in [0, 2]; got {tie_margin!r}")
    return PartitionParams(
        c, p, m, s, seed, margin=margin, n_regions=r, n_ties=ties, tie_margin=tie_margin
    )


def exhaustive_params(n_clusters: int = 4, seed: int = 0) -> PartitionParams:
    """Every row in every partition: exact, for proving the machinery on small sets."""
    return PartitionParams(n_clusters, n_clusters, 1 << 62, 1 << 62, seed, margin=2.0)


def partitioned_search(
    embeddings,
    threshold: float,
    *,
    params: PartitionParams | None = None,
    threads: int | None = None,
    sink=None,
    progress: Callable[[int], Any] | None = None,
    precision: str | Arithmetic = "auto",
    keep_lists: bool = False,
) -> tuple[PairSet, np.ndarray, np.ndarray, PartitionInfo]:
    """Pairs (exact scores; recall measured separately), lower bounds of each row's
    nearest and best-earlier score, and how the collection was partitioned
    (``keep_lists``: with the centroids and each row's nearest, see
    :class:`PartitionInfo`).

    A pair is reported by the first partition holding both rows only, so no pair is
    reported twice; ``sink`` (a :class:`~dedup_index.store.PairSink`) receives the pairs
    partition by partition and its ``finish()`` is returned.  ``precision``: the
    arithmetic of the exact tiles inside the partitions (:mod:`.precision`; ``auto``
    weighs all partitions' work together, chosen once); ``info.precision`` records it.
    """
    n, d = embeddings.shape
    params = params or default_params(n)
    info = PartitionInfo(params)
    nearest = np.zeros(n, dtype=np.float64)
    earlier = np.full(n, -np.inf, dtype=np.float64)
    if n < 2:
        return PairSet.empty(), nearest, earlier, info
    faiss = faiss_module(threads)
    rows = np.arange(n, dtype=row_dtype(n))
    keep = info if keep_lists else None
    parts = _partition(
        faiss, embeddings, rows, params, info, 0, precision=precision, threads=threads, keep=keep
    )
    first_shared = _FirstShared(n, parts)
    # The assignment's tables are freed by now; many were small heap blocks (per-block
    # candidates, per-region row lists) that glibc keeps unless asked: the tiles run long.
    HeapTrim().maybe()
    arith = _partition_arithmetic(precision, parts, d)
    info.precision = arith.info()
    found: list[PairSet] = []
    # Progress in rows: partition k's share of all pair work, scaled to N rows in all.
    work = np.cumsum([m.size * (m.size - 1) / 2 for m in parts], dtype=np.float64)
    logger.info(
        "partitioned: %d partitions, searching them (%s)", len(parts), arith.info()["precision"]
    )
    reported = 0
    tenth = 1
    for k, members in enumerate(parts):
        m = members.size
        if work[-1] > 0 and work[k] >= tenth * work[-1] / 10:  # a long search says where it is
            logger.info("partitioned: %d%% of the tile work done", 10 * tenth)
            tenth = int(10 * work[k] / work[-1]) + 1
        if progress is not None and k and work[-1] > 0:  # partitions before k are done
            done = int(n * work[k - 1] / work[-1])
            progress(done - reported)
            reported = done
        info.sizes.append(m)
        if m < 2:
            continue
        info.pair_work += m * (m - 1) / 2
        pairs, near, early = blocked_search(
            read_rows(embeddings, members), threshold, threads=threads, precision=arith
        )
        gi = members[pairs.i].astype(np.int64)
        gj = members[pairs.j].astype(np.int64)
        mine = first_shared(gi, gj) == k
        part_pairs = PairSet(gi[mine], gj[mine], pairs.s[mine])
        if sink is None:
            found.append(part_pairs)
        else:
            sink.add(part_pairs)
        # members are distinct within a partition: plain fancy indexing, not ufunc.at
        nearest[members] = np.maximum(nearest[members], near)
        earlier[members] = np.maximum(earlier[members], early)
    if progress is not None and reported < n:
        progress(n - reported)
    info.partitions = len(parts)
    info.largest = max(info.sizes, default=0)
    logger.info("partitioned: %s", info.summary(n))
    pairs = concat_pairsets(found) if sink is None else sink.finish()
    return pairs, nearest, earlier, info


#: ``auto`` runs a low precision inside partitions only when partitions of at least this
#: many rows hold most of the work: on small tiles the per-tile overheads (a rounded
#: copy, torch calls, the wider band's extra rescoring) outweigh the faster GEMM
#: (measured at 60k rows, ~130-row partitions: bf16 took 1.5x the CPU time of fp32).
LOW_PRECISION_MIN_PARTITION = 4096


def _partition_arithmetic(precision, parts: list[np.ndarray], d: int) -> Arithmetic:
    """The arithmetic of every partition's tiles, chosen once for the whole search."""
    if isinstance(precision, Arithmetic):
        return precision
    work = [m.size * (m.size - 1) / 2 * d for m in parts]
    big = sum(w for w, m in zip(work, parts, strict=True) if m.size >= LOW_PRECISION_MIN_PARTITION)
    if precision == "auto" and big < 0.5 * sum(work):
        arith = arithmetic("fp32", d)
        arith.why = (
            f"partitions below {LOW_PRECISION_MIN_PARTITION} rows hold most of the work: "
            "float32 (small tiles gain nothing from a low precision)"
        )
        return arith
    return arithmetic(precision, d, work=sum(work))


def row_dtype(n: int) -> type:
    """The dtype of row ids among ``n`` rows: int32 below 2^31 rows (half the memory of
    the partitions' row lists at 10M rows), else int64."""
    return np.int32 if n < 2**31 else np.int64


def read_rows(embeddings, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (ascending, distinct) of an array or store as one float32 array:
    one slice read when they are contiguous, else one gather (a store's reads stay
    within its bounded memory maps).  Memory: the rows read, nothing more."""
    if rows.size and int(rows[-1]) - int(rows[0]) + 1 == rows.size:
        out = embeddings[int(rows[0]) : int(rows[-1]) + 1]
    else:
        out = embeddings[rows]
    return np.ascontiguousarray(out, dtype=np.float32)


class _FirstShared:
    """For row pairs, the lowest-numbered partition holding both rows.

    Each row's partitions are one ascending run of a flat int32 list (``offsets`` into
    ``lists``, CSR): 4 bytes a membership and 8 a row, whatever the most partitions a
    single row joined (a dense ``(N, widest)`` table was 10M x 9+ int64s at 10M rows).
    The first common entry of two sorted runs is found by a merge (numba)."""

    def __init__(self, n: int, parts: list[np.ndarray]) -> None:
        counts = np.zeros(n, dtype=np.int64)
        for members in parts:
            counts[members] += 1
        self.offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])
        del counts
        self.lists = np.empty(int(self.offsets[-1]), dtype=np.int32)
        fill = self.offsets[:-1].copy()
        for k, members in enumerate(parts):  # ascending k: each row's run is sorted
            self.lists[fill[members]] = k
            fill[members] += 1

    def __call__(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Per pair ``(i[t], j[t])``, the lowest partition holding both (int64 max if none)."""
        i = np.ascontiguousarray(i, dtype=np.int64)
        j = np.ascontiguousarray(j, dtype=np.int64)
        return _first_common_kernel()(self.offsets, self.lists, i, j)


_KERNELS: dict[str, Any] = {}


def _first_common_kernel():
    """The compiled merge of :class:`_FirstShared` (numba imported on first use only)."""
    if "first_common" not in _KERNELS:
        import numba

        @numba.njit(nogil=True, cache=True)
        def first_common(offsets, lists, i, j):  # pragma: no cover - compiled
            out = np.empty(i.shape[0], dtype=np.int64)
            big = np.iinfo(np.int64).max
            for t in range(i.shape[0]):
                a, a1 = offsets[i[t]], offsets[i[t] + 1]
                b, b1 = offsets[j[t]], offsets[j[t] + 1]
                best = big
                while a < a1 and b < b1:
                    x, y = lists[a], lists[b]
                    if x == y:
                        best = x
                        break
                    if x < y:
                        a += 1
                    else:
                        b += 1
                out[t] = best
            return out

        _KERNELS["first_common"] = first_common
    return _KERNELS["first_common"]


def _partition(
    faiss,
    embeddings,
    rows,
    params,
    info,
    depth,
    precision: str | Arithmetic = "fp32",
    threads: int | None = None,
    keep: PartitionInfo | None = None,
) -> list[np.ndarray]:
    """Row ids of each partition (ascending), oversize ones split recursively."""
    n = rows.size
    c = min(params.n_clusters, n)
    p = min(params.n_probe, c)
    margin = params.margin_for(embeddings.shape[1])
    tie = params.tie_margin_for(embeddings.shape[1])
    if params.exhaustive or (c <= 1 and params.n_regions <= 1):
        return [rows] * max(1, c if params.exhaustive else 1)
    if depth == 0 and params.n_regions > 1 and n == embeddings.shape[0]:
        centroids, assign = _regions(embeddings, params, info, margin, tie, precision, threads)
        p = min(params.n_probe, assign.shape[1])  # the splits' probes: near-ties not counted
    elif depth == 0 and n == embeddings.shape[0]:
        # The whole collection: balanced on the k-means sample, assigned once.
        per_list = max(1, -(-params.sample // c))
        centroids = balanced_centroids(
            embeddings, c, seed=params.seed, niter=params.niter, per_list=per_list
        )
        p = min(params.n_probe, centroids.shape[0])
        assign = _assign(embeddings, rows, centroids, p, margin, ties=params.n_ties, tie=tie)
    else:
        centroids = _train(faiss, embeddings, rows, c, params, depth)
        assign = _assign(embeddings, rows, centroids, p, margin)
    if keep is not None and depth == 0:
        keep.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        keep.home = np.ascontiguousarray(assign[:, 0])
    out: list[np.ndarray] = []
    for part in _groups(rows, assign, centroids.shape[0]):
        if part.size > params.max_partition and depth < 3 and part.size < n:
            info.splits += 1
            c_sub = max(2, math.ceil(2 * p * part.size / params.max_partition))
            sub = PartitionParams(
                n_clusters=c_sub,
                n_probe=p,
                max_partition=params.max_partition,
                sample=min(part.size, params.sample, SPLIT_TRAIN_PER_CENTROID * c_sub),
                seed=params.seed + depth + 1,
                niter=params.niter,
                margin=params.margin,
            )
            pieces = _partition(faiss, embeddings, part, sub, info, depth + 1)
            # A cluster too tight to split duplicates its rows instead: keep it whole.
            if sum(float(q.size) ** 2 for q in pieces) < float(part.size) ** 2:
                out.extend(pieces)
            else:
                out.append(part)
        else:
            out.append(part)
    return out


def _regions(
    embeddings, params, info, margin, tie, precision, threads=None
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of every region, and each row's nearest ones, for a collection cut into
    ``params.n_regions`` regions: ``(centroids (C, d), assign (N, p))`` as
    :func:`_assign` gives them, over all regions' centroids together.

    The regions are balanced coarse centroids; each row's nearest region is its home.
    Each region trains its own balanced centroids (``n_clusters`` for a region of the
    expected size, proportionally more or fewer) on a sample of its home rows.  Then
    every row is compared with every region's centroids (:func:`assign_many`: bf16
    products where they are the faster GEMM, the best candidates rescored in float32)
    and joins its nearest centroid and up to ``n_probe - 1`` more within ``margin``,
    whichever region they come from.  So a partition is one centroid's rows from
    anywhere in the collection, and a row joins about as many partitions as in a
    one-level search.  The regions only make the centroids' training linear in N (a
    k-means of 49k centroids on the whole collection would cost more than the search).
    ``tie``: the near-ties' margin (``params.n_ties`` of them).  ``precision``: of the
    assignment's products (``auto``/``bf16``: bf16 where fast)."""
    centroids = region_centroids(embeddings, params, info)
    n = embeddings.shape[0]
    logger.info("partitioned: assigning %d rows to %d centroids", n, centroids.shape[0])
    assign = assign_many(
        embeddings,
        centroids,
        params.n_probe,
        margin,
        precision,
        threads,
        ties=params.n_ties,
        tie=tie,
    )
    return centroids, assign


def region_centroids(embeddings, params: PartitionParams, info: PartitionInfo) -> np.ndarray:
    """The centroids of :func:`_regions`: ``params.n_regions`` balanced coarse regions,
    each row's nearest its home, and each region's own balanced centroids trained on a
    sample of its home rows, all regions' together ``(C, d)``."""
    n, d = embeddings.shape
    rows = np.arange(n, dtype=row_dtype(n))
    per_list = max(MIN_TRAIN_PER_CENTROID, min(REGION_SAMPLE_PER_LIST, n // params.n_regions))
    coarse = balanced_centroids(
        embeddings,
        params.n_regions,
        seed=params.seed + 104_729,
        niter=params.niter,
        per_list=per_list,
    )
    r = coarse.shape[0]
    home = _assign(embeddings, rows, coarse, 1, 0.0).ravel()
    sizes = np.bincount(home, minlength=r)
    info.regions = [int(s) for s in sizes]
    rows_per_centroid = max(1.0, math.ceil(n / params.n_regions) / params.n_clusters)
    per_centroid = max(1, params.sample // params.n_clusters)
    rng = np.random.default_rng(params.seed + 15_485_863)
    fine: list[np.ndarray] = []
    for k in range(r):
        if not sizes[k]:
            fine.append(np.empty((0, d), dtype=np.float32))
            continue
        mine = np.flatnonzero(home == k).astype(rows.dtype)
        c = max(1, min(int(sizes[k]), round(sizes[k] / rows_per_centroid)))
        take = min(mine.size, max(per_centroid * c, MIN_TRAIN_PER_CENTROID * c))
        pick = np.sort(rng.choice(mine, size=take, replace=False)) if take < mine.size else mine
        fine.append(
            balanced_centroids(
                read_rows(embeddings, pick),
                c,
                seed=params.seed + 1 + k,
                niter=params.niter,
                per_list=max(1, take // c),
            )
        )
    del home
    starts = np.zeros(r + 1, dtype=np.int64)
    np.cumsum([f.shape[0] for f in fine], out=starts[1:])
    logger.info(
        "partitioned: %d regions of %d-%d rows (nearest region), %d centroids in all",
        r,
        int(sizes.min()),
        int(sizes.max()),
        int(starts[-1]),
    )
    return np.concatenate(fine)


def _groups(rows, assign, c) -> list[np.ndarray]:
    """Per centroid ``0..c-1``, the ascending row ids of ``rows`` (ascending) that join
    it (``assign``: :func:`_assign`'s table for ``rows``); empty groups left out.  One
    counting pass and one filling pass (compiled), the groups views of one array: a
    sort of the flattened table held ~4x its size at once (at 10M rows joining up to 8
    partitions, ~1.3 GB)."""
    bounds, members = _group_kernel()(
        np.ascontiguousarray(rows), np.ascontiguousarray(assign, dtype=np.int32), c
    )
    return [members[bounds[k] : bounds[k + 1]] for k in np.flatnonzero(np.diff(bounds)).tolist()]


def _group_kernel():
    """The compiled passes of :func:`_groups`: ``(bounds (c + 1), members)``, group
    ``k`` being ``members[bounds[k]:bounds[k + 1]]`` (filled in row order: ascending)."""
    if "groups" not in _KERNELS:
        import numba

        @numba.njit(nogil=True, cache=True)
        def groups(rows, assign, c):  # pragma: no cover - compiled
            m, p = assign.shape
            bounds = np.zeros(c + 1, dtype=np.int64)
            for t in range(m):
                for k in range(p):
                    if assign[t, k] >= 0:
                        bounds[assign[t, k] + 1] += 1
            for k in range(c):
                bounds[k + 1] += bounds[k]
            fill = bounds[:-1].copy()
            members = np.empty(bounds[c], dtype=rows.dtype)
            for t in range(m):
                for k in range(p):
                    g = assign[t, k]
                    if g >= 0:
                        members[fill[g]] = rows[t]
                        fill[g] += 1
            return bounds, members

        _KERNELS["groups"] = groups
    return _KERNELS["groups"]


def _train(faiss, embeddings, rows, c, params, depth) -> np.ndarray:
    """Spherical k-means centroids from a seeded sample of ``rows``."""
    rng = np.random.default_rng(params.seed + 7919 * depth)
    take = min(rows.size, max(params.sample, MIN_TRAIN_PER_CENTROID * c))
    pick = np.sort(rng.choice(rows, size=take, replace=False)) if take < rows.size else rows
    sample = read_rows(embeddings, pick)
    return spherical_kmeans(
        sample,
        c,
        seed=params.seed + depth,
        niter=params.niter,
        # FAISS prints a warning to stderr below this many points per centroid; when
        # every row is already in the sample there is nothing more to give it (and the
        # partitions are searched exactly, recall measured), so ask for what there is.
        min_points=max(1, min(MIN_TRAIN_PER_CENTROID, take // c)),
        max_points=max(256, take // c + 1),
    )


def _assign(
    embeddings, rows, centroids, p, margin, block: int = 16384, ties: int = 0, tie: float = 0.0
) -> np.ndarray:
    """Each row's nearest centroid and up to ``p - 1`` more within ``margin`` of it, then
    up to ``ties`` more within ``tie`` of it, ``(len(rows), p + ties)``, -1 where a row
    does not join.

    One float32 GEMM per block and a compiled top-``p`` selection, not a FAISS
    ``IndexFlatIP`` search: the splits of oversize partitions assign hundreds of small
    sets to a few centroids each, where FAISS's per-call cost dominated (30k rows to 15
    centroids: 0.18 s, about 100x the GEMM; 578 splits at 1M rows).  Which of two
    equally near centroids wins does not matter: every partition is searched exactly."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    width = min(p + ties, centroids.shape[0])
    out = np.empty((rows.size, width), dtype=np.int32)
    merge = _top_merge_kernel()
    # products of at most 256 MiB (16384 rows x 49k regions' centroids would be 3.2 GB)
    block = max(64, min(block, (256 << 20) // (4 * max(1, centroids.shape[0]))))
    for a in range(0, rows.size, block):
        x = read_rows(embeddings, rows[a : a + block])
        m = x.shape[0]
        vals = np.full((m, width), -np.inf, dtype=np.float32)
        cols = np.full((m, width), -1, dtype=np.int32)
        merge(x @ centroids.T, 0, np.arange(m), vals, cols)
        out[a : a + m] = _within(vals, cols, margin, p, tie)
    return out


#: Candidates per row that :func:`assign_many` keeps from its bf16 products before
#: rescoring them in float32.  Measured on 4096 rows of the 10M store against 9.6k
#: balanced centroids of its first 300k rows (products centred, see :func:`assign_many`):
#: 8 candidates held the exact 3 nearest for 0.9998 of rows, 16 for all of them.
ASSIGN_CANDIDATES = 16

#: Rows per GEMM of :func:`assign_many`: products of 1024 x C bf16 (100 MB at C = 49k);
#: 512 ran ~3x slower a row (per-call costs), 2048 no faster.
ASSIGN_BLOCK = 1024


def assign_many(
    embeddings,
    centroids: np.ndarray,
    p: int,
    margin: float,
    precision: str | Arithmetic = "auto",
    threads: int | None = None,
    block: int = ASSIGN_BLOCK,
    ties: int = 0,
    tie: float = 0.0,
) -> np.ndarray:
    """:func:`_assign` of every row for many centroids (tens of thousands: the regions'):
    every row against every centroid, in bf16 where that is the faster GEMM here
    (torch's oneDNN path: AMX or AVX512-BF16; ``precision`` as for the tiles, ``auto``
    measured), keeping each row's :data:`ASSIGN_CANDIDATES` best, which are rescored in
    float32 before the top-``p`` and the margin are taken.  Elsewhere the float32
    :func:`_assign`.

    Why every centroid: at 10M rows and 49k centroids, comparing each row with the
    centroids of its nearest groups of centroids (an IVF over the centroids) found the
    nearest for at best 0.987 of rows, and the groups near the data's common direction
    held thousands of centroids (~3 min per 1M rows); each row against the centroids of
    its 3 nearest regions was ~26 min in float32.  All 49k in bf16 runs at ~840 GFLOP/s
    on 2 cores with AMX (measured: ~87 s per 1M rows)."""
    n, d = embeddings.shape
    c = centroids.shape[0]
    rows = np.arange(n, dtype=row_dtype(n))
    name = precision.name if isinstance(precision, Arithmetic) else precision
    arith = arithmetic(name if name in ("auto", "bf16") else "fp32", d, work=float(n) * c * d)
    if arith.kernel != "onednn" or n == 0:
        return _assign(embeddings, rows, centroids, p, margin, ties=ties, tie=tie)
    import torch

    flat = np.ascontiguousarray(centroids, dtype=np.float32)
    # The candidates rank x . (c - mean): the same order as x . c (x . mean is one number
    # a row), but the products are ~5x smaller, and so are the bf16 output's rounding
    # steps (0.0039 near 0.7) and the input rounding's error.  Without it, 8 candidates
    # held a row's 3 nearest of 9.6k centroids for 0.80 of rows; with it, 0.9998.
    wide = torch.from_numpy(flat - flat.mean(axis=0, dtype=np.float64).astype(np.float32))
    wide = wide.to(torch.bfloat16)
    k = min(ASSIGN_CANDIDATES, c)
    width = min(p + ties, k)
    out = np.empty((n, width), dtype=np.int32)
    sims = torch.empty((min(block, n), c), dtype=torch.bfloat16)
    select, merge = _candidates_kernel(), _top_merge_kernel()
    workers = worker_count(threads)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def run(job) -> None:  # one worker's rows of a block (kernels and BLAS free the GIL)
        bits, x, cand, vals, cols = job
        select(bits, cand)
        # the candidates rescored in float32, the top p kept (positions, then centroids)
        sims = np.matmul(x[:, None, :], flat[cand].transpose(0, 2, 1))[:, 0, :]
        at = np.full(cols.shape, -1, dtype=np.int32)
        merge(np.ascontiguousarray(sims), 0, np.arange(x.shape[0]), vals, at)
        cols[:] = np.where(at >= 0, np.take_along_axis(cand, np.maximum(at, 0), axis=1), -1)

    try:
        for a in range(0, n, block):
            x = read_rows(embeddings, rows[a : a + block])
            m = x.shape[0]
            torch.mm(torch.from_numpy(x).to(torch.bfloat16), wide.T, out=sims[:m])
            bits = sims[:m].view(torch.int16).numpy()
            cand = np.empty((m, k), dtype=np.int32)
            vals = np.full((m, width), -np.inf, dtype=np.float32)
            cols = np.full((m, width), -1, dtype=np.int32)
            cuts = np.linspace(0, m, workers + 1).astype(int)
            jobs = [
                (bits[lo:hi], x[lo:hi], cand[lo:hi], vals[lo:hi], cols[lo:hi])
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)
            ]
            list(map(run, jobs) if pool is None else pool.map(run, jobs))
            out[a : a + m] = _within(vals, cols, margin, p, tie)
            if a == 0:  # how often the nearest centroid is found, on the first block
                check = min(m, 2048)
                truth = np.argmax(x[:check] @ flat.T, axis=1)
                logger.info(
                    "partitioned: bf16 assignment to %d centroids finds the nearest for "
                    "%.4f of %d rows",
                    c,
                    float(np.mean(cols[:check, 0] == truth)),
                    check,
                )
            if a and (a // block) % 1024 == 0:
                logger.info("partitioned: %d of %d rows assigned", a, n)
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def _candidates_kernel():
    """The compiled selection of :func:`assign_many`: per row of ``bits`` (bf16 products
    as int16 bit patterns), the columns of its ``cand.shape[1]`` largest into ``cand``
    (any order among equals).  A bf16 pattern read as int16 orders like its value for
    positive values; a negative one maps to ``-(bits & 0x7FFF) - 1``."""
    if "candidates" not in _KERNELS:
        import numba

        @numba.njit(nogil=True, cache=True)
        def candidates(bits, cand):  # pragma: no cover - compiled
            m, c = bits.shape
            k = cand.shape[1]
            keys = np.empty(k, dtype=np.int32)
            for t in range(m):
                keys[:] = -(1 << 20)
                cand[t, :] = -1
                last = keys[k - 1]
                for j in range(c):
                    b = np.int32(bits[t, j])
                    v = b if b >= 0 else -(b & 0x7FFF) - 1
                    if v > last:
                        i = k - 1
                        while i > 0 and keys[i - 1] < v:
                            keys[i] = keys[i - 1]
                            cand[t, i] = cand[t, i - 1]
                            i -= 1
                        keys[i] = v
                        cand[t, i] = j
                        last = keys[k - 1]

        _KERNELS["candidates"] = candidates
    return _KERNELS["candidates"]


def _within(
    vals: np.ndarray, cols: np.ndarray, margin: float, p: int | None = None, tie: float = 0.0
) -> np.ndarray:
    """``cols`` with -1 where a row's value is below its best (column 0) minus ``margin``
    (float32, as the selection compares) or no centroid was seen; columns from ``p`` on
    (near-ties) need to be within ``min(tie, margin)`` of the best."""
    p = vals.shape[1] if p is None else p
    width = np.full(vals.shape[1], np.float32(margin), dtype=np.float32)
    width[p:] = np.float32(min(tie, margin))
    bound = vals[:, :1] - width
    return np.where((vals >= bound) & (cols >= 0), cols, np.int32(-1))


def _top_merge_kernel():
    """The compiled top-``p`` selection of :func:`_assign` (numba, imported on first use):
    rows ``sel[t]`` of the running lists ``vals``/``cols`` (largest first) take the
    columns ``offset + k`` of ``sims[t]`` that rank among their ``p`` largest (ties: the
    one seen first, i.e. the lower column).  One pass over the row with a ``p``-long
    insertion list: at 1M rows x 2k centroids the numpy ``argpartition`` + sorts it
    replaces took longer than the GEMM.  ``offset``/``sel`` let a caller offer the
    centroids a block at a time and merge the blocks."""
    if "top_merge" not in _KERNELS:
        import numba

        @numba.njit(nogil=True, cache=True)
        def top_merge(sims, offset, sel, vals, cols):  # pragma: no cover - compiled
            m, c = sims.shape
            p = vals.shape[1]
            for t in range(m):
                r = sel[t]
                last = vals[r, p - 1]
                for k in range(c):
                    v = sims[t, k]
                    if v > last:
                        i = p - 1
                        while i > 0 and vals[r, i - 1] < v:
                            vals[r, i] = vals[r, i - 1]
                            cols[r, i] = cols[r, i - 1]
                            i -= 1
                        vals[r, i] = v
                        cols[r, i] = offset + k
                        last = vals[r, p - 1]

        _KERNELS["top_merge"] = top_merge
    return _KERNELS["top_merge"]
