"""``partitioned`` backend: approximate all-pairs search for large N, exact inside partitions.

Spherical k-means centroids (FAISS ``Kmeans`` on a sample) cut the collection into ``C``
partitions; every row joins the partition of its nearest centroid and those of its next
``p - 1`` nearest whose similarity is within ``margin`` of the nearest, so a pair near a
boundary still shares a partition.  (Joining the ``p`` nearest unconditionally makes
"hub" centroids near the collection's mean direction — CLIP embeddings share one — the
second choice of most rows: measured on CLIP-like data, one partition held 40% of the
rows and the work was 16x that of the margin rule at the same recall.)

Partitions grown beyond ``max_partition`` rows are split again the same way, so the work
stays balanced.  Inside each partition the exact ``blocked`` search runs (upper-triangle
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocked import blocked_search
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


@dataclass(frozen=True)
class PartitionParams:
    """``n_clusters`` (C), ``n_probe`` (p: most partitions per row), ``margin`` (a row
    joins a further partition only if its centroid is within this cosine of the
    nearest one; 2 or more means always), ``max_partition`` (rows above which a
    partition is split again), ``sample`` (k-means training rows; raised to
    :data:`MIN_TRAIN_PER_CENTROID` a centroid where the rows allow), ``niter``."""

    n_clusters: int
    n_probe: int
    max_partition: int
    sample: int
    seed: int = 0
    niter: int = 10
    margin: float = 0.05

    @property
    def exhaustive(self) -> bool:
        """Every row in every partition: the search is then exact."""
        return self.n_probe >= self.n_clusters and self.margin >= 2.0


@dataclass
class PartitionInfo:
    """What the partitioning looked like: sizes and the arithmetic it implies."""

    params: PartitionParams
    partitions: int = 0
    largest: int = 0
    splits: int = 0
    pair_work: float = 0.0  # sum of m^2 / 2 over partitions: row pairs compared
    sizes: list[int] = field(default_factory=list, repr=False)
    precision: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self, n: int) -> str:
        full = n * (n - 1) / 2 or 1.0
        return (
            f"C={self.params.n_clusters} p={self.params.n_probe}: {self.partitions} partitions "
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
) -> PartitionParams:
    """Parameters from N: about 128 rows per centroid (``C`` at most 2048), ``p = 2``
    (3 above 500k rows, where ``C`` is capped and partitions are larger: measured at 1M
    with 64 rows a centroid, recall 0.985 with p = 2, 0.998 with p = 3) within a 0.05
    margin, partitions split above 8x the mean size (at least 4096 rows), k-means on
    :data:`MIN_TRAIN_PER_CENTROID` sampled rows per centroid (at least 10k; FAISS's
    minimum, so it has nothing to warn about).

    Why 128 rows a centroid: k-means, not the tiles, is most of the work here (41% of a
    220k-row search at 64 rows and 20 training rows a centroid).  Giving FAISS its 39
    training rows at 64 rows a centroid made the search 1.5x slower; half the centroids
    trained on the same number of rows took the time of before, with recall 1.0000
    against 0.9974 (380 sampled pairs, 220k clustered rows; bench/RESULTS.md issue 15)."""
    c = n_clusters or max(1, min(2048, round(n / 128)))
    c = max(1, min(c, n)) if n else 1
    p = max(1, min(n_probe or (3 if n > 500_000 else 2), c))
    mean = p * n / c if c else n
    m = max_partition or max(4096, int(8 * mean))
    s = sample or min(n, max(MIN_TRAIN_PER_CENTROID * c, 10_000))
    return PartitionParams(c, p, m, s, seed, margin=0.05 if margin is None else margin)


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
) -> tuple[PairSet, np.ndarray, np.ndarray, PartitionInfo]:
    """Pairs (exact scores; recall measured separately), lower bounds of each row's
    nearest and best-earlier score, and how the collection was partitioned.

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
    rows = np.arange(n, dtype=np.int64)
    parts = _partition(faiss, embeddings, rows, params, info, depth=0)
    first_shared = _FirstShared(n, parts)
    arith = _partition_arithmetic(precision, parts, d)
    info.precision = arith.info()
    found: list[PairSet] = []
    # Progress in rows: partition k's share of all pair work, scaled to N rows in all.
    work = np.cumsum([m.size * (m.size - 1) / 2 for m in parts], dtype=np.float64)
    reported = 0
    for k, members in enumerate(parts):
        m = members.size
        if progress is not None and k and work[-1] > 0:  # partitions before k are done
            done = int(n * work[k - 1] / work[-1])
            progress(done - reported)
            reported = done
        info.sizes.append(m)
        if m < 2:
            continue
        info.pair_work += m * (m - 1) / 2
        pairs, near, early = blocked_search(
            embeddings[members], threshold, threads=threads, precision=arith
        )
        gi, gj = members[pairs.i], members[pairs.j]
        mine = first_shared(gi, gj) == k
        part_pairs = PairSet(gi[mine], gj[mine], pairs.s[mine])
        if sink is None:
            found.append(part_pairs)
        else:
            sink.add(part_pairs)
        np.maximum.at(nearest, members, near)
        np.maximum.at(earlier, members, early)
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


class _FirstShared:
    """For row pairs, the lowest-numbered partition holding both rows."""

    def __init__(self, n: int, parts: list[np.ndarray]) -> None:
        counts = np.zeros(n, dtype=np.int64)
        for members in parts:
            counts[members] += 1
        width = max(1, int(counts.max(initial=1)))
        self.table = np.full((n, width), -1, dtype=np.int64)
        fill = np.zeros(n, dtype=np.int64)
        for k, members in enumerate(parts):  # ascending k: each row's list is sorted
            self.table[members, fill[members]] = k
            fill[members] += 1

    def __call__(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        a = self.table[i][:, :, None]
        b = self.table[j][:, None, :]
        shared = (a == b) & (a >= 0)
        big = np.iinfo(np.int64).max
        return np.where(shared, a, big).min(axis=(1, 2))


def _partition(faiss, embeddings, rows, params, info, depth) -> list[np.ndarray]:
    """Row ids of each partition (ascending), oversize ones split recursively."""
    n = rows.size
    c = min(params.n_clusters, n)
    p = min(params.n_probe, c)
    if c <= 1 or params.exhaustive:
        return [rows] * max(1, c if params.exhaustive else 1)
    centroids = _train(faiss, embeddings, rows, c, params, depth)
    assign = _assign(faiss, embeddings, rows, centroids, p, params.margin)
    flat = assign.ravel()
    joined = flat >= 0
    order = np.argsort(flat[joined], kind="stable")
    members = np.repeat(rows, p)[joined][order]
    bounds = np.searchsorted(flat[joined][order], np.arange(c + 1))
    out: list[np.ndarray] = []
    for k in range(c):
        part = np.sort(members[bounds[k] : bounds[k + 1]])
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
        elif part.size:
            out.append(part)
    return out


def _train(faiss, embeddings, rows, c, params, depth) -> np.ndarray:
    """Spherical k-means centroids from a seeded sample of ``rows``."""
    rng = np.random.default_rng(params.seed + 7919 * depth)
    take = min(rows.size, max(params.sample, MIN_TRAIN_PER_CENTROID * c))
    pick = np.sort(rng.choice(rows, size=take, replace=False)) if take < rows.size else rows
    sample = np.ascontiguousarray(embeddings[pick], dtype=np.float32)
    km = faiss.Kmeans(
        sample.shape[1],
        c,
        niter=params.niter,
        spherical=True,
        seed=params.seed + depth,
        verbose=False,
        # FAISS prints a warning to stderr below this many points per centroid; when
        # every row is already in the sample there is nothing more to give it (and the
        # partitions are searched exactly, recall measured), so ask for what there is.
        min_points_per_centroid=max(1, min(MIN_TRAIN_PER_CENTROID, take // c)),
        max_points_per_centroid=max(256, take // c + 1),
    )
    km.train(sample)
    return km.centroids


def _assign(faiss, embeddings, rows, centroids, p, margin, block: int = 16384) -> np.ndarray:
    """Each row's nearest centroid and up to ``p - 1`` more within ``margin`` of it,
    ``(len(rows), p)``, -1 where a row does not join.

    One float32 GEMM per block and a top-``p`` selection in numpy, not a FAISS
    ``IndexFlatIP`` search: the splits of oversize partitions assign hundreds of small
    sets to a few centroids each, where FAISS's per-call cost dominated (30k rows to 15
    centroids: 0.18 s, about 100x the GEMM; 578 splits at 1M rows).  Which of two
    equally near centroids wins does not matter: every partition is searched exactly."""
    del faiss  # the signature stays the trainer's; the selection is numpy's
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    c = centroids.shape[0]
    out = np.empty((rows.size, p), dtype=np.int64)
    for a in range(0, rows.size, block):
        x = np.ascontiguousarray(embeddings[rows[a : a + block]], dtype=np.float32)
        sims = x @ centroids.T
        if p < c:
            top = np.argpartition(-sims, p - 1, axis=1)[:, :p]
        else:
            top = np.broadcast_to(np.arange(c), (x.shape[0], c)).copy()
        vals = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        labels = np.take_along_axis(top, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        labels[vals < vals[:, :1] - margin] = -1
        out[a : a + block] = labels
    return out
