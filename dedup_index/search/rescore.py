"""Compiled kernels of the exact searches' end phase: canonical scores and float32 dots.

The end phase of every exact search rescores its near-best survivors and pair candidates
canonically (:func:`~.canonical.canonical_scores`) after cutting the survivors down with
float32 dot products (:func:`~.tiles.tighten`).  In numpy both gather the two rows of
every pair into float64 scratch arrays and run the pairwise tree sum as ``log2 D``
passes over them (~3.4 us a pair at D = 512); here each pair is one compiled loop over
its two rows, read in place (no gathered copies), with the GIL released.

:func:`canonical_pairs` performs *the same IEEE operations in the same order* as the
numpy definition in :mod:`.canonical`: every product ``x_k * y_k`` rounded to float64
(exact for float32 inputs), padded with zeros to the next power of two, then halved
level by level (``p[t] = p[t] + p[t + h]``, each addition rounded), ``min(s, 1)``, and
exactly 1.0 for two equal rows.  Only elementwise operations: no reassociation, and no
fused multiply-add (numba compiles without ``fastmath``, so LLVM neither reassociates
nor contracts ``x * y + z``).  Hence the same bits; the hypothesis tests in
``tests/test_rescore.py`` hold it to the numpy definition.

:func:`dots32` is a float32 dot product in any summation order (``fastmath`` lets it
vectorise; the rows are finite): the float32 bound ``gamma_D R^2`` holds for every
order, which is all :func:`~.tiles.tighten` assumes of it.

numba compiles at first use (a second or two per signature) and caches the machine code
on disk (``cache=True``); this module is imported only when a search rescores.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["GATHER_PAIRS", "canonical_pairs", "dots32"]

#: Pairs per call when the rows must be gathered first (a store, a float16 or strided
#: array): the gathered rows stay a few tens of MiB.
GATHER_PAIRS = 8192


@numba.njit(nogil=True, cache=True)
def _canonical_kernel(first, second, i, j, out):  # pragma: no cover - compiled
    d = first.shape[1]
    size = 1
    while size < d:
        size *= 2
    buf = np.zeros(size, dtype=np.float64)  # [d, size) stays zero: the padding
    for k in range(i.shape[0]):
        a = first[i[k]]
        b = second[j[k]]
        differ = 0
        for t in range(d):
            buf[t] = np.float64(a[t]) * np.float64(b[t])
            differ += a[t] != b[t]
        h = size
        while h > 1:
            h //= 2
            for t in range(h):
                buf[t] = buf[t] + buf[t + h]
        s = buf[0]
        if s > 1.0:
            s = 1.0
        if differ == 0:
            s = 1.0
        out[k] = s


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dots_kernel(first, second, i, j, out):  # pragma: no cover - compiled
    d = first.shape[1]
    for k in range(i.shape[0]):
        a = first[i[k]]
        b = second[j[k]]
        acc = np.float32(0.0)
        for t in range(d):
            acc += a[t] * b[t]
        out[k] = acc


def _kernel_rows(rows) -> bool:
    """Rows the kernels read in place: a C-contiguous float32/float64 2-D ndarray."""
    return (
        isinstance(rows, np.ndarray)
        and rows.ndim == 2
        and rows.dtype in (np.float32, np.float64)
        and rows.flags.c_contiguous
    )


def canonical_pairs(first, second, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Canonical float64 scores of the pairs ``(first[i[k]], second[j[k]])`` (the bits
    of :func:`~.canonical.canonical_scores`).  ``first``/``second``: C-contiguous float
    arrays (read in place), or anything indexable by an int array (a store: the rows of
    each call are gathered first)."""
    i = np.ascontiguousarray(i, dtype=np.int64)
    j = np.ascontiguousarray(j, dtype=np.int64)
    out = np.empty(i.shape[0], dtype=np.float64)
    if i.shape[0] == 0:
        return out
    step = i.shape[0] if _kernel_rows(first) and _kernel_rows(second) else GATHER_PAIRS
    for lo in range(0, i.shape[0], step):
        a, ii = _readable(first, i[lo : lo + step])
        b, jj = _readable(second, j[lo : lo + step])
        if a.dtype != b.dtype:  # one signature: float64 holds every float32 exactly
            a, b = a.astype(np.float64), b.astype(np.float64)
        _canonical_kernel(a, b, ii, jj, out[lo : lo + step])
    return out


def dots32(first, second, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Float32 dot products of the pairs ``(first[i[k]], second[j[k]])`` in any summation
    order (within ``gamma_D R^2`` of the exact product: the float32 bound)."""
    i = np.ascontiguousarray(i, dtype=np.int64)
    j = np.ascontiguousarray(j, dtype=np.int64)
    out = np.empty(i.shape[0], dtype=np.float32)
    if i.shape[0] == 0:
        return out
    plain = first.dtype == np.float32 if _kernel_rows(first) else False
    plain = plain and _kernel_rows(second) and second.dtype == np.float32
    step = i.shape[0] if plain else GATHER_PAIRS
    for lo in range(0, i.shape[0], step):
        a, ii = _readable(first, i[lo : lo + step], np.float32)
        b, jj = _readable(second, j[lo : lo + step], np.float32)
        _dots_kernel(a, b, ii, jj, out[lo : lo + step])
    return out


def _readable(rows, idx: np.ndarray, dtype=None):
    """``(array, index)`` the kernels can read: the rows themselves when they are a
    C-contiguous float array (of ``dtype`` when given), else the rows ``idx`` gathered
    (once each, sorted) with the index into them."""
    if _kernel_rows(rows) and (dtype is None or rows.dtype == dtype):
        return rows, idx
    if dtype is None:  # float64 rows stay float64 (the canonical products of theirs)
        dtype = np.float64 if getattr(rows, "dtype", None) == np.float64 else np.float32
    if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.shape[0] <= idx.shape[0]:
        return np.ascontiguousarray(rows, dtype=dtype), idx
    uniq, inv = np.unique(idx, return_inverse=True)
    gathered = np.ascontiguousarray(rows[uniq], dtype=dtype)
    return gathered, inv.astype(np.int64)
