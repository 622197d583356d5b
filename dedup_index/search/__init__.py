"""Candidate search and canonical rescoring: embeddings in, exact pairs (and maxima) out.

One module per backend; each takes a unit float32 array, or anything indexable like one
(an :class:`~dedup_index.store.EmbeddingStore` streams tiles from disk):

- ``flat``: FAISS ``IndexFlatIP`` searches, tiled; exact, bounded memory.
- ``blocked``: upper-triangle GEMM tiles (torch; CUDA when asked), half the arithmetic of
  ``flat``, each row's best earlier and later row in the same pass; exact.
- ``partitioned``: spherical k-means partitions, every row in its nearest ones, exact
  tiles inside each; approximate, recall measured (:mod:`.recall`), for large N.
- ``ivf`` / ``hnsw``: FAISS approximate range search; for a few queries against a large
  index, and as comparison rows in benchmarks.
- ``dense``: the N x N oracle; small N only.
- ``auto``: picks one from N, D, memory and device, and logs which and why.

Exact backends return identical pairs, ``nearest`` and ``earlier`` bit for bit.  With an
approximate backend every reported pair is exact (its canonical score is ``>=
threshold``), some pairs may be missing, and ``nearest``/``earlier`` are lower bounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .canonical import as_unit_float32, candidate_delta, canonical_scores
from .dense import DENSE_MAX_ROWS, dense_search_all
from .flat import flat_pairs, flat_pairs_and_nearest
from .pairs import PairSet, best_pair_score

__all__ = [
    "BACKENDS",
    "DENSE_MAX_ROWS",
    "EXACT_BACKENDS",
    "APPROXIMATE_BACKENDS",
    "PairSet",
    "SearchResult",
    "as_unit_float32",
    "best_pair_score",
    "candidate_delta",
    "canonical_scores",
    "choose_backend",
    "search",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flat", "blocked", "partitioned", "ivf", "hnsw", "dense")
#: Backends whose decisions equal the oracle's exactly, whatever the data.
EXACT_BACKENDS = ("flat", "blocked", "dense")
APPROXIMATE_BACKENDS = ("partitioned", "ivf", "hnsw")

#: ``auto`` runs exact search up to this many rows on a CPU (a few minutes on 2 cores at
#: D = 512), the partitioned search above.
AUTO_EXACT_MAX_ROWS = 150_000


@dataclass(frozen=True)
class SearchResult:
    """Pairs at the threshold, nearest-neighbour scores (or None), and who found them.

    ``earlier`` (when the backend computes it) is ``max_{i<j} s(i, j)`` per row, -inf for
    row 0: under the reference policy row ``j`` is removed at threshold ``t`` iff
    ``earlier[j] >= t``, for every ``t`` at once.  ``exact`` says whether pairs and
    maxima are complete; ``info`` carries backend details (parameters, partition sizes).
    """

    pairs: PairSet
    nearest: np.ndarray | None
    backend: str
    earlier: np.ndarray | None = None
    exact: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def choose_backend(n: int, dim: int, *, device: str | None = None) -> tuple[str, str]:
    """The backend ``auto`` runs for ``n`` rows of ``dim`` dimensions, and why."""
    if device is not None and str(device).startswith("cuda") and _torch_available():
        return "blocked", f"N = {n}: exact upper-triangle GEMM tiles on {device}"
    if n <= AUTO_EXACT_MAX_ROWS:
        return "blocked", (
            f"N = {n} <= {AUTO_EXACT_MAX_ROWS}: exact upper-triangle GEMM tiles "
            "(half the arithmetic of FAISS flat range search)"
        )
    return "partitioned", (
        f"N = {n} > {AUTO_EXACT_MAX_ROWS}: k-means partitions with exact tiles inside; "
        "approximate, measure recall with dedup_index.search.recall.measure_recall"
    )


def search(
    embeddings: Any,
    threshold: float,
    *,
    backend: str = "auto",
    nearest: bool = True,
    threads: int | None = None,
    device: str | None = None,
    options: Mapping[str, Any] | None = None,
    sink: Any = None,
    progress: Callable[[int], Any] | None = None,
) -> SearchResult:
    """Run one backend over unit float32 ``embeddings`` (see :func:`as_unit_float32`).

    ``options`` are passed to the backend: ``tile`` (blocked); ``params`` or
    ``n_clusters``, ``n_probe``, ``margin``, ``max_partition``, ``sample``, ``seed``
    (partitioned); ``nlist``, ``nprobe``, ``train_size``, ``seed`` (ivf); ``m``,
    ``ef_construction``, ``ef_search`` (hnsw).  ``sink``: a
    :class:`~dedup_index.store.PairSink` that ``blocked`` and ``partitioned`` stream their
    pairs into (spilled to Parquet above its memory budget); the other backends keep
    their pairs in memory.  ``progress``, when given, is called with counts of rows done
    (they add up to N): ``flat`` (with ``nearest``) and ``partitioned`` report as they go,
    the others once at the end.
    """
    options = dict(options or {})
    n, d = embeddings.shape
    found = _search(
        embeddings, threshold, backend, nearest, threads, device, options, sink, progress
    )
    along = found.backend == "partitioned" or (found.backend == "flat" and nearest)
    if progress is not None and not along:
        progress(n)
    return found


def _search(embeddings, threshold, backend, nearest, threads, device, options, sink, progress):
    n, d = embeddings.shape
    if backend == "auto":
        backend, why = choose_backend(n, d, device=device)
        logger.info("backend='auto' picked %r (%s)", backend, why)
    if backend == "dense":
        pairs, near, earlier = dense_search_all(_in_memory(embeddings), threshold, nearest=nearest)
        return SearchResult(pairs, near, "dense", earlier)
    if backend == "blocked":
        from .blocked import blocked_search

        pairs, near, earlier = blocked_search(
            embeddings, threshold, threads=threads, device=device, sink=sink, **options
        )
        return SearchResult(pairs, near if nearest else None, "blocked", earlier)
    if backend == "flat":
        if nearest:
            pairs, near = flat_pairs_and_nearest(
                embeddings, threshold, threads=threads, progress=progress, **options
            )
            return SearchResult(pairs, near, "flat")
        pairs = flat_pairs(embeddings, threshold, threads=threads, **options)
        return SearchResult(pairs, None, "flat")
    if backend == "partitioned":
        from .partitioned import default_params, partitioned_search

        params = options.pop("params", None) or default_params(n, **options)
        pairs, near, earlier, info = partitioned_search(
            embeddings, threshold, params=params, threads=threads, sink=sink, progress=progress
        )
        return SearchResult(
            pairs,
            near if nearest else None,
            "partitioned",
            earlier,
            exact=params.exhaustive,
            info={"partitions": info, "summary": info.summary(n)},
        )
    if backend == "ivf":
        from .ivf import ivf_search

        pairs, near = ivf_search(embeddings, threshold, nearest=nearest, threads=threads, **options)
        return SearchResult(pairs, near, "ivf", exact=False, info=dict(options))
    if backend == "hnsw":
        from .hnsw import hnsw_search

        pairs, near = hnsw_search(
            embeddings, threshold, nearest=nearest, threads=threads, **options
        )
        return SearchResult(pairs, near, "hnsw", exact=False, info=dict(options))
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def _in_memory(embeddings: Any) -> np.ndarray:
    return embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings[:])
