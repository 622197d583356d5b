"""``dense`` backend: the test oracle.

It does what the reference operator does — an ``N x N`` similarity matrix — but in
float64 and with the same canonical rescoring as every other backend, so it is the
yardstick the others are proven equal to.  Memory is ``8 * N**2`` bytes: it refuses
inputs above :data:`DENSE_MAX_ROWS` rows.
"""

from __future__ import annotations

import numpy as np

from ..errors import TooLargeForBackendError
from .canonical import candidate_delta, canonical_scores
from .pairs import PairSet, rescore_candidates

#: Largest N the oracle accepts: a 16384 x 16384 float64 matrix is 2 GiB.
DENSE_MAX_ROWS = 16_384

# BLAS float64 and the canonical sum differ by about D * 2**-53, and the canonical score
# moves an equal pair (or a score above 1) to exactly 1.0: by 1 - |row|^2, under ~1e-6 for
# unit float32 rows.  The window covers both with room.
_NEAREST_TIE = 1e-5


def check_dense_size(n: int, max_rows: int = DENSE_MAX_ROWS) -> None:
    if n > max_rows:
        gib = 8 * n * n / 2**30
        raise TooLargeForBackendError(
            f"backend='dense' builds an N x N matrix ({gib:.1f} GiB at N = {n}) and accepts "
            f"at most N = {max_rows}; use backend='flat' (exact, bounded memory) or 'auto'"
        )


def dense_search(
    embeddings: np.ndarray, threshold: float, *, nearest: bool = True
) -> tuple[PairSet, np.ndarray | None]:
    """Pairs at ``>= threshold`` and (optionally) each row's nearest-neighbour score."""
    pairs, near, _ = dense_search_all(embeddings, threshold, nearest=nearest)
    return pairs, near


def dense_search_all(
    embeddings: np.ndarray, threshold: float, *, nearest: bool = True
) -> tuple[PairSet, np.ndarray | None, np.ndarray | None]:
    """Pairs, nearest-neighbour score and best-earlier score ``max_{i<j} s(i, j)`` per row
    (``-inf`` for row 0); the last two only when ``nearest``."""
    n, d = embeddings.shape
    check_dense_size(n)
    if n < 2:
        return (
            PairSet.empty(),
            (np.zeros(n) if nearest else None),
            (np.full(n, -np.inf) if nearest else None),
        )
    e64 = embeddings.astype(np.float64)
    sim = e64 @ e64.T
    np.fill_diagonal(sim, -np.inf)
    radius = threshold - candidate_delta(d)
    ci, cj = np.nonzero(np.triu(sim >= radius, k=1))
    pairs = rescore_candidates(embeddings, [(ci, cj)], threshold)
    if not nearest:
        return pairs, None, None
    best = _canonical_row_max(embeddings, sim)
    sim[np.triu_indices(n)] = -np.inf  # keep i < j: row j against earlier rows only
    earlier = _canonical_row_max(embeddings, sim)
    return pairs, np.maximum(best, 0.0), earlier


def _canonical_row_max(embeddings: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """Canonical max per row over the finite entries of ``sim`` within a hair of the max."""
    row_max = sim.max(axis=1)
    ti, tj = np.nonzero((sim >= (row_max - _NEAREST_TIE)[:, None]) & np.isfinite(sim))
    best = np.full(sim.shape[0], -np.inf)
    np.maximum.at(best, ti, canonical_scores(embeddings, ti, tj))
    return best
