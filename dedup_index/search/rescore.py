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

__all__ = ["GATHER_PAIRS", "canonical_pairs", "dots32", "fold_entries", "kernel_rows"]

#: Pairs per call when the rows must be gathered first (a store, a float16 or strided
#: array): the gathered rows stay a few tens of MiB.
GATHER_PAIRS = 8192


@numba.njit(nogil=True, cache=True)
def _padded(d):  # pragma: no cover - compiled
    """A float64 scratch row of the next power of two >= ``d``, zero beyond ``d``."""
    size = 1
    while size < d:
        size *= 2
    return np.zeros(size, dtype=np.float64)


@numba.njit(nogil=True, cache=True)
def _canonical_one(a, b, buf):  # pragma: no cover - compiled
    """The canonical score of rows ``a``, ``b`` (``buf``: :func:`_padded` scratch)."""
    d = a.shape[0]
    differ = 0
    for t in range(d):
        buf[t] = np.float64(a[t]) * np.float64(b[t])
        differ += a[t] != b[t]
    h = buf.shape[0]
    while h > 1:
        h //= 2
        for t in range(h):
            buf[t] = buf[t] + buf[t + h]
    s = buf[0]
    if s > 1.0:
        s = 1.0
    if differ == 0:
        s = 1.0
    return s


@numba.njit(nogil=True, cache=True)
def _canonical_kernel(first, second, i, j, out):  # pragma: no cover - compiled
    buf = _padded(first.shape[1])
    for k in range(i.shape[0]):
        out[k] = _canonical_one(first[i[k]], second[j[k]], buf)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot32(a, b):  # pragma: no cover - compiled
    acc = np.float32(0.0)
    for t in range(a.shape[0]):
        acc += np.float32(a[t]) * np.float32(b[t])
    return acc


@numba.njit(nogil=True, cache=True)
def _dots_kernel(first, second, i, j, out):  # pragma: no cover - compiled
    for k in range(i.shape[0]):
        out[k] = _dot32(first[i[k]], second[j[k]])


@numba.njit(nogil=True, cache=True)
def _fold_kernel(
    first, second, ids, partners, vals, best, window, w32, tighten, out
):  # pragma: no cover - compiled
    """:func:`fold_entries` for entries of ids in ``[lo, hi)``; see there."""
    m = ids.shape[0]
    if m == 0:
        return
    lo = ids[0]
    hi = ids[0]
    for t in range(m):
        lo = min(lo, ids[t])
        hi = max(hi, ids[t])
    span = hi - lo + 1
    neg = np.float32(-np.inf)
    alive = np.zeros(m, dtype=np.bool_)
    top_val = np.full(span, neg, dtype=np.float32)
    top_at = np.full(span, -1, dtype=np.int64)
    # 1. prune against the bounds (prune_near's float32 test); each id's first top entry
    for t in range(m):
        r = ids[t]
        v = vals[t]
        if v >= best[r] - window:
            alive[t] = True
            if v > top_val[r - lo]:
                top_val[r - lo] = v
                top_at[r - lo] = t
    buf = _padded(first.shape[1])
    if tighten:
        # 2. first cut: below the top entry's canonical score minus window / 2
        cut = np.full(span, np.inf)
        half = np.float64(window) / 2
        for k in range(span):
            t = top_at[k]
            if t >= 0:
                cut[k] = _canonical_one(first[lo + k], second[partners[t]], buf) - half
        # 3. float32 products of the rest; the id's best of them
        s32 = np.empty(m, dtype=np.float32)
        best32 = np.full(span, neg, dtype=np.float32)
        for t in range(m):
            if alive[t]:
                k = ids[t] - lo
                if np.float64(vals[t]) >= cut[k]:
                    s = _dot32(first[ids[t]], second[partners[t]])
                    s32[t] = s
                    if s > best32[k]:
                        best32[k] = s
                else:
                    alive[t] = False
        for t in range(m):
            if alive[t] and s32[t] < best32[ids[t] - lo] - w32:
                alive[t] = False
    # 4. canonical scores of the survivors, folded into out
    for t in range(m):
        if alive[t]:
            r = ids[t]
            c = _canonical_one(first[r], second[partners[t]], buf)
            if c > out[r]:
                out[r] = c


def fold_entries(
    first, second, ids, partners, vals, best, window: float, w32: float, out, workers: int = 1
) -> None:
    """:func:`~.tiles.fold_best` compiled, for rows the kernels read in place
    (:func:`kernel_rows`): the same steps, the same survivors, so the same bits.

    Per entry ``(id, partner, value)``: kept if ``value >= best[id] - window`` (float32,
    as :func:`~.tiles.prune_near`); when ``window`` is wider than the float32 window
    ``w32`` (a low precision), :func:`~.tiles.tighten`'s cuts (below the id's top
    entry's canonical score minus ``window / 2``; then below the id's best float32
    product minus ``w32``); the survivors' canonical scores raise ``out[id]``.  One pass
    per step over the entries, no temporary arrays per step, per-id state over the ids'
    own range.  ``workers`` threads take disjoint id ranges (each id's entries stay in
    one thread)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    partners = np.ascontiguousarray(partners, dtype=np.int64)
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    if first.dtype != second.dtype:  # one signature: float64 holds every float32 exactly
        first, second = first.astype(np.float64), second.astype(np.float64)
    args = (best, np.float32(window), np.float32(w32), bool(window > w32), out)
    if workers <= 1 or ids.shape[0] < 2 * FOLD_THREAD_ENTRIES:
        _fold_kernel(first, second, ids, partners, vals, *args)
        return
    from concurrent.futures import ThreadPoolExecutor

    cuts = np.quantile(ids, np.linspace(0, 1, workers + 1)[1:-1]).astype(np.int64)
    part = np.searchsorted(cuts, ids, side="right")  # id ranges: an id's entries together
    with ThreadPoolExecutor(workers) as pool:
        jobs = []
        for k in range(workers):
            sel = np.flatnonzero(part == k)
            jobs.append(
                pool.submit(_fold_kernel, first, second, ids[sel], partners[sel], vals[sel], *args)
            )
        for job in jobs:
            job.result()


#: Entries per thread below which :func:`fold_entries` stays on the calling thread.
FOLD_THREAD_ENTRIES = 1 << 16


def kernel_rows(rows) -> bool:
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
    step = i.shape[0] if kernel_rows(first) and kernel_rows(second) else GATHER_PAIRS
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
    plain = first.dtype == np.float32 if kernel_rows(first) else False
    plain = plain and kernel_rows(second) and second.dtype == np.float32
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
    if kernel_rows(rows) and (dtype is None or rows.dtype == dtype):
        return rows, idx
    if dtype is None:  # float64 rows stay float64 (the canonical products of theirs)
        dtype = np.float64 if getattr(rows, "dtype", None) == np.float64 else np.float32
    if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.shape[0] <= idx.shape[0]:
        return np.ascontiguousarray(rows, dtype=dtype), idx
    uniq, inv = np.unique(idx, return_inverse=True)
    gathered = np.ascontiguousarray(rows[uniq], dtype=dtype)
    return gathered, inv.astype(np.int64)
