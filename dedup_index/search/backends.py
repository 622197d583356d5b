"""The backend registry: one name, one search function, one signature.

Every search backend is a function with the signature of :class:`SearchFunction`::

    fn(embeddings, threshold, *, nearest, threads, device, options, sink, progress)
        -> SearchResult

registered here under its name with the facts a caller needs (:class:`Backend`: exact or
approximate, on this machine or on a Ray cluster, the options it takes, one line of what
it does).  :func:`dedup_index.dedup_embeddings`, the recall measurement, the operator and
the CLI all go through :func:`search` (or :func:`get_backend`); nothing else maps backend
names to code.  This module imports numpy only: FAISS, torch and Ray are imported by the
search functions when they run, so the CLI builds its ``--backend`` choices from
:data:`BACKENDS` without loading them.

Example: two copies and an unrelated row, searched by an exact backend and checked against
the oracle::

    >>> import numpy as np
    >>> from dedup_index.search import as_unit_float32, get_backend, search
    >>> E = as_unit_float32(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    >>> found = search(E, 0.9, backend="blocked")
    >>> found.pairs.i.tolist(), found.pairs.j.tolist(), found.nearest.tolist()
    ([0], [1], [1.0, 1.0, 0.0])
    >>> found.pairs.equals(search(E, 0.9, backend="dense").pairs)
    True
    >>> get_backend("ray").exact, get_backend("ray").replaces
    (True, ('auto', 'blocked'))
    >>> search(E, 0.9, backend="gpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: backend must be one of 'auto', 'flat', ..., 'ray'; got 'gpu', an unknown backend
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..validation import resolve_device
from .pairs import PairSet

__all__ = [
    "APPROXIMATE_BACKENDS",
    "AUTO_EXACT_MAX_ROWS",
    "BACKENDS",
    "DISTRIBUTED_BACKENDS",
    "EXACT_BACKENDS",
    "INDEX_BACKENDS",
    "PRECISION_BACKENDS",
    "Backend",
    "SearchFunction",
    "SearchResult",
    "check_backend",
    "choose_backend",
    "get_backend",
    "search",
]

logger = logging.getLogger(__name__)

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


class SearchFunction(Protocol):
    """What every backend is: unit float32 rows (an array, or an
    :class:`~dedup_index.store.EmbeddingStore` read tile by tile) and a threshold in, a
    :class:`SearchResult` out.

    ``nearest``: also compute each row's nearest-neighbour score (else ``result.nearest``
    may be None).  ``threads``: CPU threads (None: the library's own).  ``device``:
    ``"cuda"`` for the backends that run on a GPU.  ``options``: the backend's own
    parameters (:attr:`Backend.options`).  ``sink``: a
    :class:`~dedup_index.store.PairSink` the backend may stream its pairs into (and then
    returns ``sink.finish()``), or None.  ``progress``: called with counts of rows done,
    adding up to N (as the search goes, or once at the end)."""

    def __call__(
        self,
        embeddings: Any,
        threshold: float,
        *,
        nearest: bool,
        threads: int | None,
        device: str | None,
        options: dict[str, Any],
        sink: Any,
        progress: Callable[[int], Any] | None,
    ) -> SearchResult: ...


@dataclass(frozen=True)
class Backend:
    """A registered backend and its facts.

    Attributes:
        name: what callers pass as ``backend=``.
        run: the :class:`SearchFunction`.
        exact: True when pairs, ``nearest`` and ``earlier`` equal the dense oracle's bit
            for bit whatever the data; False when pairs may be missed (every pair
            reported is still exact) and maxima are lower bounds; None when it depends
            on the input (``auto``: ``result.exact`` tells).
        description: one line: what it does.
        options: names of the backend's own parameters (``options=``); None: passed on
            unchecked to the backend it picks (``auto``).
        distributed: runs on a Ray cluster rather than in this process.
        replaces: backend choices a caller may swap this one in for, with the same
            decisions (``ray`` runs ``blocked``'s exact tiles on a cluster, so a Ray run
            takes ``backend="auto"`` or ``"blocked"`` and nothing else).
    """

    name: str
    run: SearchFunction
    exact: bool | None
    description: str
    options: tuple[str, ...] | None = ()
    distributed: bool = False
    replaces: tuple[str, ...] = ()

    def search(
        self,
        embeddings: Any,
        threshold: float,
        *,
        nearest: bool = True,
        threads: int | None = None,
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        sink: Any = None,
        progress: Callable[[int], Any] | None = None,
    ) -> SearchResult:
        """Run this backend after checking ``options`` against :attr:`options`."""
        options = dict(options or {})
        if self.options is not None:
            unknown = sorted(set(options) - set(self.options))
            if unknown:
                takes = ", ".join(self.options) or "none"
                raise TypeError(
                    f"backend {self.name!r} does not take the option(s) {unknown}; "
                    f"its options: {takes}"
                )
        return self.run(
            embeddings,
            threshold,
            nearest=nearest,
            threads=threads,
            device=device,
            options=options,
            sink=sink,
            progress=progress,
        )


def _done(progress: Callable[[int], Any] | None, n: int) -> None:
    """Report all ``n`` rows at once (backends that do not report as they go)."""
    if progress is not None:
        progress(n)


def _in_memory(embeddings: Any) -> np.ndarray:
    return embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings[:])


def _torch_available() -> bool:
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


# ------------------------------------------------------------------ the search functions


def _auto(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    n, d = embeddings.shape
    name, why = choose_backend(n, d, device=device)
    logger.info("backend='auto' picked %r (%s)", name, why)
    return search(
        embeddings,
        threshold,
        backend=name,
        nearest=nearest,
        threads=threads,
        device=device,
        options=options,
        sink=sink,
        progress=progress,
    )


def _dense(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from .dense import dense_search_all

    pairs, near, earlier = dense_search_all(_in_memory(embeddings), threshold, nearest=nearest)
    _done(progress, embeddings.shape[0])
    return SearchResult(pairs, near, "dense", earlier)


def _precision(options: dict[str, Any]) -> str:
    """Pop and check the ``precision`` option (default ``auto``)."""
    from .precision import check_precision

    return check_precision(options.pop("precision", "auto"))


def _log_precision(name: str, info: dict[str, Any]) -> None:
    if info:
        logger.info(
            "%s: %s tiles (%s kernel; margin %.3g, window %.3g): %s",
            name,
            info.get("precision"),
            info.get("kernel"),
            info.get("margin", float("nan")),
            info.get("window", float("nan")),
            info.get("why"),
        )


def _blocked(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from .blocked import blocked_search

    precision = _precision(options)
    ran: dict[str, Any] = {}
    pairs, near, earlier = blocked_search(
        embeddings,
        threshold,
        threads=threads,
        device=device,
        sink=sink,
        precision=precision,
        report=ran,
        **options,
    )
    _log_precision("blocked", ran)
    _done(progress, embeddings.shape[0])
    info = {"precision": ran} if ran else {}
    return SearchResult(pairs, near if nearest else None, "blocked", earlier, info=info)


def _flat(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from .flat import flat_pairs, flat_pairs_and_nearest

    if nearest:
        pairs, near = flat_pairs_and_nearest(
            embeddings, threshold, threads=threads, progress=progress, **options
        )
        return SearchResult(pairs, near, "flat")
    options.pop("k", None)  # neighbours per row of the nearest pass: none here
    pairs = flat_pairs(embeddings, threshold, threads=threads, **options)
    _done(progress, embeddings.shape[0])
    return SearchResult(pairs, None, "flat")


def _partitioned(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from .partitioned import default_params, partitioned_search

    n = embeddings.shape[0]
    precision = _precision(options)
    params = options.pop("params", None) or default_params(n, **options)
    pairs, near, earlier, info = partitioned_search(
        embeddings,
        threshold,
        params=params,
        threads=threads,
        sink=sink,
        progress=progress,
        precision=precision,
    )
    _log_precision("partitioned", info.precision)
    return SearchResult(
        pairs,
        near if nearest else None,
        "partitioned",
        earlier,
        exact=params.exhaustive,
        info={"partitions": info, "summary": info.summary(n), "precision": info.precision},
    )


def _ivf(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from .ivf import ivf_search

    pairs, near = ivf_search(embeddings, threshold, nearest=nearest, threads=threads, **options)
    _done(progress, embeddings.shape[0])
    return SearchResult(pairs, near, "ivf", exact=False, info=dict(options))


def _hnsw(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from .hnsw import hnsw_search

    pairs, near = hnsw_search(embeddings, threshold, nearest=nearest, threads=threads, **options)
    _done(progress, embeddings.shape[0])
    return SearchResult(pairs, near, "hnsw", exact=False, info=dict(options))


def _ray(embeddings, threshold, *, nearest, threads, device, options, sink, progress):
    from ..distributed.search import ray_search  # imports ray when it runs

    return ray_search(
        embeddings,
        threshold,
        nearest=nearest,
        threads=threads,
        device=device,
        options=options,
        sink=sink,
        progress=progress,
    )


_REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "auto",
            _auto,
            None,
            f"blocked up to {AUTO_EXACT_MAX_ROWS} rows (or on a GPU), partitioned above; "
            "logs its pick",
            options=None,
        ),
        Backend(
            "flat",
            _flat,
            True,
            "FAISS IndexFlatIP searches over database tiles: the full square",
            options=("query_block", "db_block", "k"),
        ),
        Backend(
            "blocked",
            _blocked,
            True,
            "upper-triangle GEMM tiles (numpy, or torch on a GPU), best-earlier scores too",
            options=("tile", "engine", "precision"),
        ),
        Backend(
            "partitioned",
            _partitioned,
            False,
            "spherical k-means partitions, each row in its nearest ones, exact tiles inside",
            options=(
                "params",
                "n_clusters",
                "n_probe",
                "margin",
                "max_partition",
                "sample",
                "seed",
                "n_regions",
                "n_ties",
                "tie_margin",
                "precision",
            ),
        ),
        Backend(
            "ivf",
            _ivf,
            False,
            "FAISS IndexIVFFlat range search (exact with nprobe = nlist)",
            options=("nlist", "nprobe", "train_size", "seed", "query_block"),
        ),
        Backend(
            "hnsw",
            _hnsw,
            False,
            "FAISS IndexHNSWFlat range search, copies collapsed",
            options=("m", "ef_construction", "ef_search", "query_block", "collapse_copies"),
        ),
        Backend(
            "dense",
            _dense,
            True,
            "the N x N float64 oracle; small N only",
        ),
        Backend(
            "ray",
            _ray,
            True,
            "blocked's exact tiles as Ray tasks, resumable from a shared work_dir",
            options=(
                "address",
                "work_dir",
                "tile_rows",
                "threads_per_task",
                "max_retries",
                "precision",
                "gpus_per_task",
                "engine",
            ),
            distributed=True,
            replaces=("auto", "blocked"),
        ),
    )
}

#: Every backend name, ``auto`` first.
BACKENDS = tuple(_REGISTRY)
#: Backends that run in this process and whose decisions equal the oracle's exactly,
#: whatever the data (what the equivalence harness compares by default).
EXACT_BACKENDS = tuple(
    name for name, b in _REGISTRY.items() if b.exact is True and not b.distributed
)
#: Backends that may miss pairs (every pair they report is exact).
APPROXIMATE_BACKENDS = tuple(name for name, b in _REGISTRY.items() if b.exact is False)
#: Backends that run on a Ray cluster (exact: the same results as ``blocked``).
DISTRIBUTED_BACKENDS = tuple(name for name, b in _REGISTRY.items() if b.distributed)
#: Backends whose exact tiles take ``precision`` (the others search in float32 only).
PRECISION_BACKENDS = tuple(
    name for name, b in _REGISTRY.items() if b.options is None or "precision" in b.options
)
#: Backends the persistent :class:`~dedup_index.index.DedupIndex` adds and queries with,
#: each meaning what it means here: ``blocked`` (numpy tiles) and ``flat`` (FAISS flat),
#: exact; ``ivf`` and ``hnsw`` (a FAISS index kept with it), approximate.
INDEX_BACKENDS = ("blocked", "flat", "ivf", "hnsw")


def check_backend(name: Any) -> str:
    """Return ``name`` if it is a registered backend; else ``ValueError`` naming it and
    every allowed name."""
    if not isinstance(name, str) or name not in _REGISTRY:
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"backend must be one of {allowed}; got {name!r}, an unknown backend")
    return name


def get_backend(name: str) -> Backend:
    """The registered :class:`Backend` called ``name`` (``ValueError`` if none)."""
    return _REGISTRY[check_backend(name)]


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
    """Run ``backend`` over unit float32 ``embeddings`` (see
    :func:`~dedup_index.search.canonical.as_unit_float32`).

    ``options`` are the backend's own parameters (:attr:`Backend.options`): ``tile``,
    ``engine`` (blocked); ``precision`` (blocked, partitioned, ray: the tile arithmetic,
    :data:`~dedup_index.search.precision.PRECISIONS`, the same results whichever);
    ``query_block``, ``db_block``, ``k`` (flat); ``params`` or
    ``n_clusters``, ``n_probe``, ``margin``, ``max_partition``, ``sample``, ``seed``,
    ``n_regions``, ``n_ties``, ``tie_margin`` (partitioned); ``nlist``, ``nprobe``,
    ``train_size``, ``seed`` (ivf); ``m``,
    ``ef_construction``, ``ef_search`` (hnsw); ``address``, ``work_dir``, ``tile_rows``,
    ``threads_per_task``, ``max_retries``, ``gpus_per_task``, ``engine`` (ray).  ``device``:
    None, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` of this process
    (:func:`~dedup_index.validation.resolve_device`); for ``ray``, the devices of the
    cluster's workers (:func:`~dedup_index.distributed.search.ray_search`).  ``sink``: a
    :class:`~dedup_index.store.PairSink` that ``blocked``, ``partitioned`` and ``ray``
    stream their pairs into (spilled to Parquet above its memory budget); the other
    backends keep their pairs in memory.  ``progress``, when given, is called with counts
    of rows done adding up to N: ``flat`` (with ``nearest``), ``partitioned`` and ``ray``
    report as they go, the others once at the end.
    """
    chosen = get_backend(backend)
    if not chosen.distributed:  # a cluster's devices are the cluster's: ray_search decides
        device = resolve_device(device, what="searching")
    return chosen.search(
        embeddings,
        threshold,
        nearest=nearest,
        threads=threads,
        device=device,
        options=options,
        sink=sink,
        progress=progress,
    )
