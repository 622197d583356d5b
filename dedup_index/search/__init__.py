"""Candidate search and canonical rescoring: embeddings in, exact pairs (and maxima) out.

Backends (more arrive with the scale work; each is one module here):

- ``flat``: FAISS ``IndexFlatIP`` searches, tiled; exact, bounded memory.
- ``blocked``: upper-triangle GEMM tiles (torch), half the arithmetic of ``flat``, with
  each row's best earlier and later row in the same pass; exact.
- ``dense``: the N x N oracle; small N only.
- ``auto``: picks one and logs which and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .canonical import as_unit_float32, candidate_delta, canonical_scores
from .dense import DENSE_MAX_ROWS, dense_search_all
from .flat import flat_pairs, flat_pairs_and_nearest
from .pairs import PairSet, best_pair_score

__all__ = [
    "BACKENDS",
    "DENSE_MAX_ROWS",
    "EXACT_BACKENDS",
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

BACKENDS = ("auto", "flat", "blocked", "dense")
#: Backends whose decisions equal the oracle's exactly, whatever the data.
EXACT_BACKENDS = ("flat", "blocked", "dense")


@dataclass(frozen=True)
class SearchResult:
    """Pairs at the threshold, nearest-neighbour scores (or None), and who found them.

    ``earlier`` (when the backend computes it) is ``max_{i<j} s(i, j)`` per row, -inf for
    row 0: under the reference policy row ``j`` is removed at threshold ``t`` iff
    ``earlier[j] >= t``, for every ``t`` at once.
    """

    pairs: PairSet
    nearest: np.ndarray | None
    backend: str
    earlier: np.ndarray | None = None


def choose_backend(n: int, dim: int) -> tuple[str, str]:
    """The backend ``auto`` runs for ``n`` rows of ``dim`` dimensions, and why."""
    return "flat", f"N = {n}, D = {dim}: exact FAISS flat range search with bounded memory"


def search(
    embeddings: np.ndarray,
    threshold: float,
    *,
    backend: str = "auto",
    nearest: bool = True,
    threads: int | None = None,
) -> SearchResult:
    """Run one backend over unit float32 ``embeddings`` (see :func:`as_unit_float32`)."""
    n, d = embeddings.shape
    if backend == "auto":
        backend, why = choose_backend(n, d)
        logger.info("backend='auto' picked %r (%s)", backend, why)
    if backend == "dense":
        pairs, near, earlier = dense_search_all(embeddings, threshold, nearest=nearest)
        return SearchResult(pairs, near, "dense", earlier)
    if backend == "blocked":
        from .blocked import blocked_search

        pairs, near, earlier = blocked_search(embeddings, threshold, threads=threads)
        return SearchResult(pairs, near if nearest else None, "blocked", earlier)
    if backend == "flat":
        if nearest:
            pairs, near = flat_pairs_and_nearest(embeddings, threshold, threads=threads)
            return SearchResult(pairs, near, "flat")
        return SearchResult(flat_pairs(embeddings, threshold, threads=threads), None, "flat")
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
