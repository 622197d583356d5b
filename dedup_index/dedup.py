"""``dedup_embeddings``: the array-level entry point (no torch, no images).

A user who already has embeddings calls this and never touches an image; the operator,
the CLI and the index are compositions of the same stages:
canonical vectors -> search (pairs, nearest) -> policy (decisions).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .policy import POLICIES, decide
from .progress import progress as progress_bar
from .search import PairSet, as_unit_float32, best_pair_score, check_backend, search
from .search.backends import PRECISION_BACKENDS
from .search.precision import check_precision
from .store import EmbeddingStore, PairSink, open_or_array
from .store.pairs_file import DEFAULT_MEMORY_BUDGET
from .validation import check_choice, check_positive_int, check_threshold

logger = logging.getLogger(__name__)

SCORES = ("nearest", "pairs")


@dataclass(frozen=True)
class DedupResult:
    """Outcome of deduplicating ``n`` rows.

    Attributes:
        keep: bool mask, True for rows that stay.
        duplicate_of: for each removed row the earliest row it duplicates (under ``greedy``
            the earliest kept one, under ``component`` its component's lowest row), -1 for
            kept rows.
        duplicate_similarity: canonical similarity to ``duplicate_of`` (under ``component``
            when that pair exists; see :mod:`dedup_index.policy.component`); NaN for kept
            rows.
        group: for each row the index of the kept row representing its duplicate group;
            the row itself for kept rows (how a removed row maps to it depends on the
            policy: see :mod:`dedup_index.policy`).
        pairs: every pair ``i < j`` with canonical similarity ``>= threshold``.
        max_similarity: per row; with ``score="nearest"`` the highest similarity to any
            other row, floored at 0; with ``score="pairs"`` (upstream's value) the highest
            pair score at or above the threshold, else 0.
        threshold, backend, policy, score: what produced it (``backend`` as resolved).
        exact: False when an approximate backend produced it: every pair reported is
            exact, but pairs may be missing and ``max_similarity`` below the threshold is
            a lower bound.
        max_earlier_similarity: ``max_{i<j} s(i, j)`` per row (-inf for row 0) when the
            backend computes it (``blocked``, ``dense``, ``partitioned`` as a lower
            bound), else None.  Under the reference policy row ``j`` is removed at any
            threshold ``t`` iff this is ``>= t``: see :meth:`removed_at`.
        info: backend details (partition sizes, parameters, recall notes).
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    duplicate_similarity: np.ndarray
    group: np.ndarray
    pairs: PairSet
    max_similarity: np.ndarray
    threshold: float
    backend: str
    policy: str
    score: str
    seconds: float = field(default=0.0, compare=False)
    exact: bool = True
    max_earlier_similarity: np.ndarray | None = field(default=None, compare=False)
    info: dict = field(default_factory=dict, compare=False)

    @property
    def n(self) -> int:
        return int(self.keep.shape[0])

    @property
    def removed(self) -> np.ndarray:
        """Indices of removed rows, ascending."""
        return np.flatnonzero(~self.keep)

    @property
    def kept(self) -> np.ndarray:
        """Indices of kept rows, ascending."""
        return np.flatnonzero(self.keep)

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())

    def removed_at(self, thresholds) -> np.ndarray:
        """Rows the reference policy removes at each of ``thresholds``, without re-running.

        Exact for any threshold when the backend was exact (from the best-earlier score
        of every row); a lower bound with an approximate backend.
        """
        if self.max_earlier_similarity is None:
            raise ValueError(
                f"backend {self.backend!r} does not compute the best-earlier score; "
                "use backend='blocked' or 'partitioned'"
            )
        t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        earlier = np.sort(self.max_earlier_similarity)
        return earlier.size - np.searchsorted(earlier, t, side="left")

    def summary(self) -> str:
        kind = "" if self.exact else ", approximate"
        return (
            f"{self.n} rows: {self.n - self.n_removed} kept, {self.n_removed} removed as "
            f"near-duplicates ({len(self.pairs)} pairs at >= {self.threshold:g}, "
            f"backend {self.backend}{kind}, policy {self.policy}, {self.seconds:.2f} s)"
        )


def dedup_embeddings(
    embeddings: np.ndarray,
    threshold: float = 0.9,
    backend: str = "auto",
    score: str = "nearest",
    *,
    policy: str = "reference",
    normalize: bool = True,
    threads: int | None = None,
    device: str | None = None,
    backend_options: Mapping[str, Any] | None = None,
    pairs_memory_budget: int = DEFAULT_MEMORY_BUDGET,
    pairs_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> DedupResult:
    """Find near-duplicate rows of an ``(N, D)`` embedding matrix.

    Row ``j`` is removed iff some earlier row ``i < j`` has cosine similarity
    ``>= threshold`` with it (the reference ``i < j`` semantics).  Similarities are the
    canonical float64 scores of the float32 unit vectors, so every backend returns the
    same decisions, pairs and ``max_similarity`` bit for bit.

    Args:
        embeddings: ``(N, D)`` real array; rows are L2-normalised unless ``normalize=False``
            (then they must already be unit norm).  Zero or non-finite rows are rejected.
            Or an :class:`~dedup_index.store.EmbeddingStore` (or its directory): its rows
            are unit float32 already and stream from disk tile by tile.
        threshold: cosine similarity in [0, 1]; ``>=`` means near-duplicate.
        backend: ``"auto"`` (logs its pick), exact ``"blocked"`` (GEMM tiles), ``"flat"``
            (FAISS), approximate ``"partitioned"``, ``"ivf"``, ``"hnsw"``, ``"dense"``
            (the oracle) or ``"ray"`` (``blocked``'s tiles on a Ray cluster); the names
            and their facts are in :mod:`dedup_index.search.backends`.
        score: ``"nearest"`` (true nearest-neighbour similarity) or ``"pairs"`` (upstream).
        policy: keep policy: ``"reference"`` (the ``i < j`` semantics above),
            ``"greedy"`` or ``"component"``; see :mod:`dedup_index.policy`.
        threads: CPU threads for FAISS and torch (default: their own).
        device: ``"cuda"`` runs the ``blocked`` backend's GEMM tiles on the GPU.
        backend_options: extra parameters of the backend (tile sizes, partitions,
            nprobe, a Ray ``address`` and ``work_dir``, ...): see
            :func:`dedup_index.search.search`.
        pairs_memory_budget, pairs_path: ``blocked``, ``partitioned`` and ``ray`` stream
            pairs into memory up to this many bytes (24 a pair), then into a Parquet file
            at ``pairs_path`` (a temporary file if None); ``result.pairs`` is then a
            :class:`~dedup_index.store.PairFile` read in chunks, and the policies run over
            it with memory O(N).
        progress: a rows/s progress bar of the search on stderr: ``None`` (default) when
            stderr is a terminal and ``DEDUP_INDEX_PROGRESS`` is not ``0``; True/False
            force it on or off.
        precision: the arithmetic of the candidate search's GEMM tiles: ``"auto"``
            (default: times each available kernel once on this machine and runs the
            fastest; ``fp32`` for small searches or without a fast path), ``"fp32"``,
            ``"bf16"`` or ``"fp16"``.  Candidates are gathered at the margin that
            precision's proven error bound requires and rescored canonically, so every
            decision, pair, ``duplicate_of``, ``max_similarity`` and best-earlier score
            is bit-identical whichever runs (:mod:`dedup_index.search.precision`); only
            the speed differs.  ``result.info["precision"]`` says what ran and why.
            Applies to the exact tiles of ``blocked``, ``partitioned`` and ``ray``;
            the FAISS backends and ``dense`` search in float32 (``"auto"``/``"fp32"``
            only).
    """
    threshold = check_threshold(threshold)
    check_backend(backend)
    check_choice(score, SCORES, "score")
    check_choice(policy, POLICIES, "policy")
    threads = check_positive_int(threads, "threads", allow_none=True)
    check_precision(precision)
    options = dict(backend_options or {})
    if backend in PRECISION_BACKENDS:
        options.setdefault("precision", precision)
    elif precision not in ("auto", "fp32"):
        raise ValueError(
            f"precision={precision!r} applies to the exact tiles of "
            f"{', '.join(repr(b) for b in PRECISION_BACKENDS if b != 'auto')}; "
            f"backend {backend!r} searches in float32 (use precision='auto' or 'fp32')"
        )
    start = time.perf_counter()
    source = open_or_array(embeddings)
    if isinstance(source, EmbeddingStore):
        unit = source  # validated and normalised once, when appended
    else:
        unit = as_unit_float32(source, normalize=normalize)
    n = unit.shape[0]
    sink = PairSink(pairs_path, memory_budget=pairs_memory_budget)
    with progress_bar(n, "search", unit="rows", enabled=progress) as bar:
        found = search(
            unit,
            threshold,
            backend=backend,
            nearest=score == "nearest",
            threads=threads,
            device=device,
            options=options,
            sink=sink,
            progress=bar.update,
        )
    if score == "nearest":
        max_similarity = found.nearest
    else:
        best = best_pair_score(n, found.pairs)
        max_similarity = np.where(np.isfinite(best), best, 0.0)
    decisions = decide(n, found.pairs, policy)
    result = DedupResult(
        keep=decisions.keep,
        duplicate_of=decisions.duplicate_of,
        duplicate_similarity=decisions.duplicate_similarity,
        group=decisions.group,
        pairs=found.pairs,
        max_similarity=max_similarity,
        threshold=threshold,
        backend=found.backend,
        policy=policy,
        score=score,
        seconds=time.perf_counter() - start,
        exact=found.exact,
        max_earlier_similarity=found.earlier,
        info=dict(found.info),
    )
    logger.info("%s", result.summary())
    return result
