"""Canonical vectors and canonical similarity: the numbers every decision is taken on.

Float32 inner products differ between BLAS kernels, SIMD paths, block sizes and thread
counts by up to about ``D * 2**-24`` for unit vectors, so a pair sitting at the threshold
could be a duplicate on one machine and not on another.  Backends therefore only *gather
candidates* with float32 arithmetic at ``threshold - delta``; each candidate is then
rescored here as a float64 dot product of the stored float32 vectors, summed in a fixed
pairwise order made of elementwise IEEE operations.  The products of two float32 numbers
are exact in float64 and the summation tree never depends on the machine, the chunk or
the caller, so the score of a pair is the same bits everywhere and ties at the threshold
are decided identically by every backend.
"""

from __future__ import annotations

import sys

import numpy as np

#: Rows rescored per chunk: bounds the float64 scratch to ``chunk * D * 8`` bytes (2 MiB at
#: D = 512, so the tree sum's passes stay in cache: 2.5x faster than 8192-row chunks).
#: Each pair's score depends only on its own rows, so the chunk size never changes a bit.
RESCORE_CHUNK = 512


def candidate_delta(dim: int) -> float:
    """Margin below the threshold at which float32 candidates are gathered.

    Four times the worst-case float32 error of a ``dim``-term unit-vector product,
    and never below 1e-4.
    """
    return max(1e-4, 4.0 * dim * 2.0**-24)


def as_unit_float32(embeddings: object, *, normalize: bool = True) -> np.ndarray:
    """Validate an ``(N, D)`` embedding matrix and return it as C-contiguous unit float32.

    ``normalize=True`` L2-normalises every row (in float64, then rounds once to float32).
    With ``normalize=False`` rows must already have unit norm (within 1e-3).  Rows that
    are zero or non-finite are rejected with an error naming them, because they have no
    direction and so no cosine similarity.
    """
    arr = np.asarray(embeddings)
    if arr.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"embeddings must be a float array; got dtype {arr.dtype}")
    n, d = arr.shape
    if d == 0 and n > 0:
        raise ValueError("embeddings must have at least one column (D >= 1); got D = 0")
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    # Row chunks keep the float64 scratch small: the input may be most of memory.
    out = np.empty((n, d), dtype=np.float32)
    norms = np.empty(n, dtype=np.float64)
    bad_rows = []
    step = max(1, (64 << 20) // (8 * d))
    for a in range(0, n, step):
        chunk = arr[a : a + step].astype(np.float64)
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            bad_rows.append(np.flatnonzero(~finite) + a)
            chunk[~finite] = 0.0
        norms[a : a + step] = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        if normalize:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[a : a + step] = chunk / norms[a : a + step, None]
        else:
            out[a : a + step] = arr[a : a + step]
    if bad_rows:
        rows = np.concatenate(bad_rows)
        raise ValueError(
            f"embeddings contain non-finite values (NaN or inf) in {rows.size} row(s): "
            f"{_list_rows(rows)}"
        )
    zero = norms == 0
    if zero.any():
        rows = np.flatnonzero(zero)
        raise ValueError(
            f"embeddings contain {rows.size} zero-norm row(s), which have no direction: "
            f"{_list_rows(rows)}"
        )
    if not normalize:
        off = np.abs(norms - 1.0) > 1e-3
        if off.any():
            rows = np.flatnonzero(off)
            raise ValueError(
                f"normalize=False but {rows.size} row(s) are not unit norm "
                f"(|norm - 1| > 1e-3): {_list_rows(rows)}; pass normalize=True"
            )
    return out


def rows_of(embeddings: object, a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` of an array or array-like (an
    :class:`~dedup_index.store.EmbeddingStore`) as a C-contiguous float32 array: what
    FAISS and BLAS take (no copy when the rows already are one)."""
    return np.ascontiguousarray(embeddings[a:b], dtype=np.float32)


#: Below this many pairs, in a process that has not loaded the compiled kernel yet,
#: :func:`canonical_scores` runs the numpy definition (same bits) instead of loading numba.
SMALL_RESCORE = 4096


def canonical_scores(
    embeddings: np.ndarray, i: np.ndarray, j: np.ndarray, other: np.ndarray | None = None
) -> np.ndarray:
    """Canonical float64 similarity of the row pairs ``(i[k], j[k])`` of unit float32 rows
    (``j`` indexing ``other`` when given: queries against a base).  Symmetric and the
    same bits whichever matrix a vector is read from.  Never above 1.0, and exactly 1.0
    for two equal rows (the product of a unit float32 row with itself can round either
    side of 1); below 1 it is the exact float64 dot product, summed in a fixed tree.
    Computed by the compiled kernel :func:`~.rescore.canonical_pairs` (the same IEEE
    operations in the same order as :func:`canonical_scores_numpy`, ~5x faster, rows
    read in place)."""
    if len(i) < SMALL_RESCORE and "dedup_index.search.rescore" not in sys.modules:
        # A one-image query need not pay numba's start-up (1-5 s): the definition itself.
        return canonical_scores_numpy(embeddings, i, j, other)
    from .rescore import canonical_pairs  # numba: imported when a search rescores

    second = embeddings if other is None else other
    return canonical_pairs(embeddings, second, np.asarray(i), np.asarray(j))


def canonical_scores_numpy(
    embeddings: np.ndarray, i: np.ndarray, j: np.ndarray, other: np.ndarray | None = None
) -> np.ndarray:
    """:func:`canonical_scores` in plain numpy: the definition the compiled kernel
    (:func:`~.rescore.canonical_pairs`) is held to, bit for bit, by the tests."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    second = embeddings if other is None else other
    out = np.empty(i.shape[0], dtype=np.float64)
    for start in range(0, i.shape[0], RESCORE_CHUNK):
        stop = start + RESCORE_CHUNK
        a = embeddings[i[start:stop]].astype(np.float64)
        b = second[j[start:stop]].astype(np.float64)
        scores = np.minimum(_tree_sum(a * b), 1.0)
        # Equal rows are the same image: exactly 1.0, so threshold 1.0 removes every exact
        # copy (their float64 sum can round to 1 - 1e-8, a coin flip at t = 1).
        scores[(a == b).all(axis=1)] = 1.0
        out[start:stop] = scores
    return out


def _tree_sum(products: np.ndarray) -> np.ndarray:
    """Sum each row in a fixed pairwise order using only elementwise additions."""
    m, width = products.shape
    if width == 0:
        return np.zeros(m, dtype=np.float64)
    size = 1 << (width - 1).bit_length()
    if size != width:
        padded = np.zeros((m, size), dtype=np.float64)
        padded[:, :width] = products
        products = padded
    while size > 1:
        size //= 2
        products = products[:, :size] + products[:, size:]
    return products[:, 0].copy()


def _list_rows(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f", ... ({rows.size - limit} more)" if rows.size > limit else "")
