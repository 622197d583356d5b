"""Balanced coarse centroids: one implementation for the IVF index and ``partitioned``.

Plain spherical k-means on CLIP-like clustered data leaves some lists several times
fuller than the mean (Zipf-sized clusters; "hub" centroids near the data's common
direction).  An over-full list costs both users: an IVF query landing there scans its
rows, and a ``partitioned`` partition costs the square of its size.  So the dense regions
get the centroids their density asks for, decided on the k-means sample alone (cheap:
the full collection is assigned once, afterwards, by the caller).
"""

from __future__ import annotations

import numpy as np

from .canonical import rows_of
from .flat import faiss_module

#: Rounds of splitting the coarse lists that the sample shows over-full
#: (:func:`balanced_centroids`).  One round left the lists at 1M clustered rows so uneven
#: that a single-row query scanned 10x the mean list share (the "hub" lists near the
#: data's common direction are probed by a third of all queries); three rounds at 200k:
#: 2.3x fewer rows scanned at the same recall (bench/RESULTS.md, issue 15).
BALANCE_ROUNDS = 3

#: Sampled rows per requested list that :func:`balanced_centroids` trains on by default.
SAMPLE_PER_LIST = 64

#: A k-means with fewer ``rows x centroids`` than this runs FAISS on one OpenMP thread.
#: FAISS's per-iteration thread barriers cost more than such a k-means computes: 1000
#: rows x 16 centroids x 512, 10 iterations took 61 ms CPU / 129 ms wall on 2 threads,
#: 3.7 ms / 10 ms on one (loaded 2-core machine); :func:`balanced_centroids` runs
#: hundreds of these for the lists it splits (at 1M rows, 5.4 of its 8.8 CPU seconds).
ONE_THREAD_BELOW = 4_000_000


def spherical_kmeans(
    x: np.ndarray, k: int, *, seed: int, niter: int, min_points: int = 1, max_points: int = 256
) -> np.ndarray:
    """``k`` unit centroids of the float32 rows ``x`` (FAISS spherical k-means), on one
    thread when the job is small (:data:`ONE_THREAD_BELOW`; the thread count is restored
    after).  ``min_points``/``max_points``: FAISS's points per centroid (below the first
    it warns on stderr; above the second it subsamples)."""
    faiss = faiss_module()
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        spherical=True,
        seed=seed,
        verbose=False,
        min_points_per_centroid=min_points,
        max_points_per_centroid=max_points,
    )
    if x.shape[0] * k >= ONE_THREAD_BELOW:
        km.train(x)
        return km.centroids
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return km.centroids


def balanced_centroids(
    rows,
    nlist: int,
    *,
    seed: int = 0,
    niter: int = 20,
    rounds: int = BALANCE_ROUNDS,
    per_list: int = SAMPLE_PER_LIST,
) -> np.ndarray:
    """Coarse centroids whose lists are about equally full on clustered data.

    Spherical k-means with ``nlist`` centroids on a sample (``per_list`` rows a list),
    then every list holding more than twice the mean share of the sample is split by a
    k-means of its own rows into ``ceil(size / mean)`` centroids.  Plain k-means on
    CLIP-like clustered data leaves some lists 3x fuller than the mean (FAISS's imbalance
    factor 3.2 at 50k rows): a query landing there scans 3x the rows.  Splitting the dense
    regions gives them the lists their density asks for (the list count grows by the
    splits).  The split centroids take rows from their neighbours too, so the sample is
    assigned again and the check repeated, up to ``rounds`` times (until no list is over
    twice the mean).  ``rows``: an array or anything indexable like one (a store)."""
    if nlist < 1 or per_list < 1:
        raise ValueError(f"nlist and per_list must be >= 1, got {nlist} and {per_list}")
    faiss = faiss_module()
    n, d = rows.shape
    rng = np.random.default_rng(seed)
    take = min(n, per_list * nlist)
    pick = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
    sample = np.ascontiguousarray(rows[pick] if take < n else rows_of(rows, 0, n), np.float32)
    nlist = max(1, min(nlist, take))

    def kmeans(x: np.ndarray, k: int, salt: int) -> np.ndarray:
        return spherical_kmeans(
            x, k, seed=seed + salt, niter=niter, max_points=max(256, x.shape[0] // k + 1)
        )

    centroids = kmeans(sample, nlist, 0)
    mean = take / nlist
    for round_ in range(rounds):
        index = faiss.IndexFlatIP(d)
        index.add(centroids)
        _, assign = index.search(sample, 1)
        assign = assign.ravel()
        sizes = np.bincount(assign, minlength=centroids.shape[0])
        big = np.flatnonzero(sizes > 2 * mean)
        if not big.size:
            break
        out = [centroids[sizes <= 2 * mean]]
        for c in big:
            members = sample[assign == c]
            k = min(members.shape[0], int(np.ceil(members.shape[0] / mean)))
            salt = 1 + int(c) + round_ * 1_000_003
            out.append(kmeans(members, k, salt) if k > 1 else centroids[c : c + 1])
        centroids = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    return np.ascontiguousarray(centroids, dtype=np.float32)
