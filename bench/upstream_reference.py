"""The upstream DataFlow-MM ``ImageDeduplicateFilter`` algorithm, reproduced for timing only.

Do not use this: it is the algorithm the project replaces, written here (from the
description in SPEC.md, not copied) so the benchmark can time it on the same data as
``dedup_index``.  It builds the full ``N x N`` float32 similarity matrix (4 * N**2 bytes:
10 GB at N = 50k), finds every hit with ``np.where`` (diagonal and both triangles included)
and walks the hits in a Python loop.  ``max_similarity`` is filled only from duplicate pairs,
as the upstream code does (0.0 for a row with no pair at or above the threshold).
"""

from __future__ import annotations

import numpy as np


def cosine_similarity(X: np.ndarray) -> np.ndarray:
    """``cosine_similarity(X, X)`` the way scikit-learn computes it, in numpy.

    Rows are L2-normalised in the input's floating dtype (float32 stays float32, as
    scikit-learn keeps it), then ``X_n @ X_n.T``.  Zero rows are left as zeros.
    """
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms == 0] = 1
    Xn = X / norms[:, None]
    return Xn @ Xn.T


def upstream_dedup(
    embeddings: np.ndarray, threshold: float = 0.9
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The upstream algorithm reproduced for timing; do not use it.

    Returns ``(keep, max_similarities, duplicate_pairs)``: a bool mask of the rows that
    stay, the per-row similarity taken from the duplicate pairs only, and the list of
    ``{'kept_idx', 'removed_idx', 'similarity'}`` dicts.
    """
    n = embeddings.shape[0]
    S = cosine_similarity(embeddings)
    duplicates = set()
    duplicate_pairs = []
    idx = np.where(S >= threshold)
    for i, j in zip(idx[0], idx[1], strict=True):
        if i >= j:
            continue
        duplicates.add(int(j))
        duplicate_pairs.append(
            {"kept_idx": int(i), "removed_idx": int(j), "similarity": float(S[i, j])}
        )
    max_similarities = [0.0] * n
    for pair in duplicate_pairs:
        a, b, s = pair["kept_idx"], pair["removed_idx"], pair["similarity"]
        max_similarities[a] = max(max_similarities[a], s)
        max_similarities[b] = max(max_similarities[b], s)
    keep = np.array([i not in duplicates for i in range(n)], dtype=bool)
    return keep, np.asarray(max_similarities, dtype=np.float64), duplicate_pairs
