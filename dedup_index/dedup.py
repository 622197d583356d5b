"""``dedup_embeddings``: the array-level entry point (no torch, no images).

A user who already has embeddings calls this and never touches an image; the operator,
the CLI and the index are compositions of the same stages:
canonical vectors -> search (pairs, nearest) -> policy (decisions).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ._validation import check_choice, check_positive_int, check_threshold
from .policy import POLICIES, decide
from .search import BACKENDS, PairSet, as_unit_float32, best_pair_score, search

logger = logging.getLogger(__name__)

SCORES = ("nearest", "pairs")


@dataclass(frozen=True)
class DedupResult:
    """Outcome of deduplicating ``n`` rows.

    Attributes:
        keep: bool mask, True for rows that stay.
        duplicate_of: for each removed row the earliest row it duplicates, -1 for kept rows.
        duplicate_similarity: canonical similarity to ``duplicate_of``; NaN for kept rows.
        pairs: every pair ``i < j`` with canonical similarity ``>= threshold``.
        max_similarity: per row; with ``score="nearest"`` the highest similarity to any
            other row, floored at 0; with ``score="pairs"`` (upstream's value) the highest
            pair score at or above the threshold, else 0.
        threshold, backend, policy, score: what produced it (``backend`` as resolved).
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    duplicate_similarity: np.ndarray
    pairs: PairSet
    max_similarity: np.ndarray
    threshold: float
    backend: str
    policy: str
    score: str
    seconds: float = field(default=0.0, compare=False)

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

    def summary(self) -> str:
        return (
            f"{self.n} rows: {self.n - self.n_removed} kept, {self.n_removed} removed as "
            f"near-duplicates ({len(self.pairs)} pairs at >= {self.threshold:g}, "
            f"backend {self.backend}, policy {self.policy}, {self.seconds:.2f} s)"
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
) -> DedupResult:
    """Find near-duplicate rows of an ``(N, D)`` embedding matrix.

    Row ``j`` is removed iff some earlier row ``i < j`` has cosine similarity
    ``>= threshold`` with it (the reference ``i < j`` semantics).  Similarities are the
    canonical float64 scores of the float32 unit vectors, so every backend returns the
    same decisions, pairs and ``max_similarity`` bit for bit.

    Args:
        embeddings: ``(N, D)`` real array; rows are L2-normalised unless ``normalize=False``
            (then they must already be unit norm).  Zero or non-finite rows are rejected.
        threshold: cosine similarity in [0, 1]; ``>=`` means near-duplicate.
        backend: ``"auto"``, ``"flat"`` (FAISS range search) or ``"dense"`` (the oracle).
        score: ``"nearest"`` (true nearest-neighbour similarity) or ``"pairs"`` (upstream).
        policy: keep policy; ``"reference"``.
        threads: CPU threads for FAISS (default: FAISS's own).
    """
    threshold = check_threshold(threshold)
    check_choice(backend, BACKENDS, "backend")
    check_choice(score, SCORES, "score")
    check_choice(policy, POLICIES, "policy")
    threads = check_positive_int(threads, "threads", allow_none=True)
    start = time.perf_counter()
    unit = as_unit_float32(embeddings, normalize=normalize)
    n = unit.shape[0]
    found = search(unit, threshold, backend=backend, nearest=score == "nearest", threads=threads)
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
        pairs=found.pairs,
        max_similarity=max_similarity,
        threshold=threshold,
        backend=found.backend,
        policy=policy,
        score=score,
        seconds=time.perf_counter() - start,
    )
    logger.info("%s", result.summary())
    return result
