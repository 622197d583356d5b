"""The tile machinery the exact searches share: ``blocked``, ``cross`` and the Ray tiles.

Every exact search cuts the similarity matrix into GEMM tiles (float32 values from
float32, bf16 or fp16 arithmetic: :mod:`.precision`), gathers pair candidates above
``threshold - margin`` and keeps, per row, every entry within ``window`` of its running
tile maximum (:class:`NearBest`); the survivors are rescored canonically
(:func:`canonical_maxima`, :func:`rescore_keys`).  The ``blocked`` backend, the persistent
index's cross search (:mod:`.cross`) and the Ray tile tasks
(:mod:`dedup_index.distributed.tiles`) all run *this* code, which is why their pairs,
nearest and best-earlier scores agree bit for bit: a second copy of any piece here would
be free to drift (a different near-tie rule, a different gather bound) and the three would
no longer give the same bits for the same rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .canonical import candidate_delta
from .precision import is_tensor

__all__ = [
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "DENSE_GATHER",
    "NearBest",
    "NumpyTiles",
    "canonical_best",
    "canonical_maxima",
    "fold_best",
    "nonzero2d",
    "prune_near",
    "rescore_keys",
    "tighten",
]

#: Rows per row block, and columns per GEMM tile (a row block meets the later rows in
#: chunks of this many): wide tiles keep the GEMM near its peak, short row blocks keep
#: the wasted lower triangle of the diagonal tiles (``N * rows / 2`` products) small.
#: The tile shape never changes a bit of the result (maxima are decided canonically).
DEFAULT_ROWS = 2048
DEFAULT_COLS = 8192
#: Above this share of relevant rows (columns), one compare over the whole tile beats
#: copying the selected rows (columns) out first (same entries either way).
DENSE_GATHER = 0.15


class NearBest:
    """Per row: its running float32 maximum and every entry within ``delta`` of it.

    Why: a float32 near-tie can hide the true (canonical) maximum, so the maximum is not
    taken on float32 values.  Each row keeps the entries within ``delta`` of its running
    maximum (a tile adds entries only when it raises or nearly ties it: a few per row);
    :meth:`survivors` filters them on the final maximum and the caller rescores them
    canonically (:func:`canonical_maxima`).  The entry holding the canonical maximum is
    always among the survivors, since ``delta`` is four times the float32 error bound.
    """

    def __init__(self, n: int, delta: float, floor: np.ndarray | None = None) -> None:
        # ``floor``: per row, a score already known to be reached (the persistent index's
        # nearest so far): only entries that may beat it are kept, so a row whose best
        # stays below it keeps nothing (and its canonical best comes back -inf).
        if floor is None:
            self.best = np.full(n, -np.inf, dtype=np.float32)
        else:
            self.best = np.asarray(floor, dtype=np.float32).copy()
        self.delta = np.float32(delta)
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def update(self, rows: np.ndarray, tile_max: np.ndarray, gather: Callable) -> None:
        """``rows``: global ids; ``tile_max``: their max in this tile; ``gather(sel, lo)``
        returns ``(local_row, other_global_id, score)`` of the entries ``>= lo`` of local
        rows ``sel``."""
        new_best = np.maximum(self.best[rows], tile_max)
        self.best[rows] = new_best
        relevant = np.flatnonzero((tile_max >= new_best - self.delta) & np.isfinite(tile_max))
        if relevant.size:
            local, other, vals = gather(relevant, new_best[relevant] - self.delta)
            self.rows.append(rows[local])
            self.cols.append(other)
            self.vals.append(vals)

    def survivors(self, values: bool = False):
        """``(row, other)`` entries within ``delta`` of the row's final float32 maximum
        (``values``: and their tile values, ``(row, other, value)``)."""
        entries = list(zip(self.rows, self.cols, self.vals, strict=True))
        kept = prune_near(entries, self.best, self.delta)
        if not kept:
            empty = np.zeros(0, np.int64)
            return (empty, empty, np.zeros(0, np.float32)) if values else (empty, empty)
        rows, other, vals = kept[0]
        found = rows.astype(np.int64), other.astype(np.int64)
        return (*found, vals) if values else found


def prune_near(entries: list, best: np.ndarray, delta: np.float32) -> list:
    """Near-best entries ``[(id, other, value), ...]`` without those below ``best[id] -
    delta``, as one tuple (order kept): :meth:`NearBest.survivors` with the final maxima.
    With any lower bound of the final maxima it drops only entries the final filter
    drops too (float32 subtraction is monotone), so a search may prune as it goes (bounded
    memory) and keep the same survivors and bits."""
    if not entries:
        return entries
    ids = np.concatenate([e[0] for e in entries])
    other = np.concatenate([e[1] for e in entries])
    vals = np.concatenate([e[2] for e in entries])
    keep = vals >= best[ids] - delta
    return [(ids[keep], other[keep], vals[keep])] if keep.any() else []


class NumpyTiles:
    """Tile operations on the CPU in numpy: row blocks, the GEMM, the diagonal mask, maxima,
    candidates above a bound and the near-best gathers of :class:`NearBest`.

    One BLAS for everything: mixing torch's OpenMP pool with numpy's OpenBLAS threads made
    both spin against each other (the same search ran 25% slower than torch alone), and
    OpenBLAS's SGEMM is 1.4-1.6x torch's MKL on the AMD CPUs measured here.  ``embeddings``
    is an array or anything indexable like one (a store: the last row block and the last
    column block are kept).  ``arith`` (an :class:`~.precision.Arithmetic`) computes the
    products (default: numpy's float32 GEMM); ``embeddings`` are then the rows it
    prepared (:meth:`~.precision.Arithmetic.prepare`)."""

    def __init__(self, embeddings, rows_per: int, cols_per: int, arith=None) -> None:
        self.embeddings = embeddings
        self.arith = arith
        self.in_memory = isinstance(embeddings, np.ndarray) or is_tensor(embeddings)
        self.buf = np.empty(rows_per * cols_per, dtype=np.float32)
        self.rows_per = rows_per
        self._lower: np.ndarray | None = None  # c <= r: the row itself and earlier rows
        self.cache: dict[bool, tuple[tuple[int, int], np.ndarray]] = {}

    def block(self, a: int, b: int, second: bool) -> np.ndarray:
        """Rows ``a:b`` as float32 (``second``: the column side, cached apart)."""
        if self.in_memory:
            return self.embeddings[a:b]
        key, rows = self.cache.get(second, (None, None))
        if key != (a, b):  # a store: keep the last row block and the last column block
            rows = self.embeddings[a:b]
            if not is_tensor(rows):  # rows prepared as torch tensors stay so
                rows = np.ascontiguousarray(rows, dtype=np.float32)
            self.cache[second] = ((a, b), rows)
        return rows

    def product(self, rows_a: np.ndarray, rows_c: np.ndarray) -> np.ndarray:
        """``rows_a @ rows_c.T`` into the preallocated buffer (overwritten by the next)."""
        out = self.buf[: rows_a.shape[0] * rows_c.shape[0]].reshape(rows_a.shape[0], -1)
        if self.arith is not None:
            return self.arith.product(rows_a, rows_c, out)
        return np.matmul(rows_a, rows_c.T, out=out)

    def mask_diagonal(self, s: np.ndarray, ra: int) -> None:
        """Set the entries ``c <= r`` of a diagonal tile to ``-inf`` (self, earlier rows)."""
        np.copyto(s[:, :ra], -np.inf, where=self.lower(0, ra))

    def lower(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1``, columns ``:r1`` of the diagonal tile's mask ``c <= r``."""
        if self._lower is None:
            self._lower = np.tri(self.rows_per, dtype=bool)
        return self._lower[r0:r1, :r1]

    def maxima(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column maxima of a tile."""
        return s.max(axis=1), s.max(axis=0)

    def above(self, s: np.ndarray, rows: np.ndarray, bound) -> tuple[np.ndarray, np.ndarray]:
        """``(index into rows, column)`` of the entries ``> bound`` of tile rows ``rows``."""
        return nonzero2d(s[rows] > bound)

    def gather(self, s, offset: int, columns: bool, sel: np.ndarray, lo: np.ndarray):
        """Entries ``>= lo`` of the selected rows (or columns) ``sel`` of tile ``s``:
        ``(row or column within the tile, other row id, float32 score)``."""
        size = s.shape[1] if columns else s.shape[0]
        if sel.size > DENSE_GATHER * size:
            bound = np.full(size, np.inf, dtype=np.float32)
            bound[sel] = lo
            li, lj = nonzero2d(s >= (bound[None, :] if columns else bound[:, None]))
            vals = s[li, lj]
            if columns:
                li, lj = lj, li
            return li, lj.astype(np.int64) + offset, vals
        sub = s[:, sel].T if columns else s[sel]
        li, lj = nonzero2d(sub >= lo[:, None])
        return sel[li], lj + offset, sub[li, lj]


def nonzero2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D mask, ~10x faster for sparse masks (flat scan, then divmod);
    the same indices in the same (row-major) order."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1])


def canonical_maxima(embeddings, later: NearBest, earlier: NearBest, *, workers: int = 1):
    """Canonical best-later and best-earlier score per row, from the near-best survivors
    (:func:`fold_best` in each direction; the rescoring shared by ``workers`` threads).
    Returns float64 arrays, ``-inf`` for a row with no later (earlier) row."""
    n = later.best.shape[0]
    best_later = np.full(n, -np.inf)
    best_earlier = np.full(n, -np.inf)
    for near, out in ((later, best_later), (earlier, best_earlier)):
        entries = list(zip(near.rows, near.cols, near.vals, strict=True))
        fold_best(embeddings, entries, near.best, near.delta, out, workers=workers)
    return best_later, best_earlier


def canonical_best(own, other, near: NearBest) -> np.ndarray:
    """Canonical best score per row of ``own`` against the rows of ``other``, from its
    near-best survivors (``near``'s partners index ``other``); ``-inf`` where none.

    The cross searches' maxima (queries against a base, each side in turn): a canonical
    score is the same bits whichever matrix is ``own``, so both sides agree."""
    out = np.full(near.best.shape[0], -np.inf)
    entries = list(zip(near.rows, near.cols, near.vals, strict=True))
    fold_best(own, entries, near.best, near.delta, out, other=other)
    return out


def fold_best(
    embeddings,
    entries: list,
    best: np.ndarray,
    window,
    out: np.ndarray,
    *,
    other=None,
    workers: int = 1,
) -> None:
    """Raise ``out[row]`` to the canonical maximum of each row's near-best entries.

    ``entries``: ``[(row, partner, tile value), ...]``, near-best entries gathered
    against lower bounds of the rows' final tile maxima; ``best``: such a lower bound
    (the final maxima, or running ones); ``partner`` indexes ``other`` (default
    ``embeddings``).  The entries within ``window`` of ``best`` survive
    (:func:`prune_near`), :func:`tighten` cuts them down, and the rest are rescored
    canonically.  Every cut drops only entries strictly below some real pair's
    canonical score of the same row, and every prune only entries below the final
    maximum minus ``window``: the entry holding a row's canonical maximum survives in
    whichever call it comes, and ``out`` only ever holds real pair scores.  So a search
    may fold a row's entries in any number of batches (as blocks finish: bounded
    memory, :func:`~.blocked.blocked_search`) and get the bits of one fold at the end;
    batches holding all of a row's entries against its final maximum rescore fewest."""
    if not entries:
        return
    second = embeddings if other is None else other
    from .rescore import fold_entries, kernel_rows

    if kernel_rows(embeddings) and kernel_rows(second):  # the same steps, compiled
        ids, partners, vals = (
            entries[0]
            if len(entries) == 1
            else (np.concatenate(c) for c in zip(*entries, strict=True))
        )
        fold_entries(
            embeddings,
            second,
            ids,
            partners,
            vals,
            best,
            window,
            candidate_delta(embeddings.shape[1]),
            out,
            workers,
        )
        return
    kept = prune_near(entries, best, np.float32(window))
    if not kept:
        return
    rows, partners, vals = kept[0]
    rows = rows.astype(np.int64, copy=False)
    partners = partners.astype(np.int64, copy=False)
    rows, partners = tighten(
        embeddings, rows, partners, vals, window=window, other=other, workers=workers
    )
    if rows.size:
        np.maximum.at(out, rows, rescore_keys(embeddings, rows, partners, workers, other=second))


#: Pairs per thread's share below which :func:`tighten` and :func:`rescore_keys` stay on
#: the calling thread (a thread's start costs more than that much compiled work).
THREAD_PAIRS = 16384


def tighten(
    embeddings,
    rows: np.ndarray,
    partners: np.ndarray,
    values: np.ndarray | None = None,
    *,
    window: float,
    other=None,
    workers: int = 1,
):
    """Near-best survivors ``(rows, partners)`` gathered with a low-precision ``window``,
    cut down to those within the float32 window of their row's best float32 score.

    Each survivor's float32 dot product (any summation order: error ``<= gamma_D R^2``,
    the float32 bound; :func:`~.rescore.dots32`) is computed, and per row only the
    entries within :func:`~.canonical.candidate_delta` (over twice that bound) of the
    row's best float32 value among its survivors stay.  The entry holding the row's
    canonical maximum is among the survivors (:mod:`.precision`), so it stays too: the
    canonical maxima are unchanged, from far fewer float64 rescorings.  With a float32
    ``window`` already (float32 tiles) the survivors come back as they are.  ``workers``
    threads share the dot products (the same values either way).

    ``values``, the survivors' low-precision tile values, allow a first cut: the
    canonical score ``c`` of each row's top entry (largest value) is computed first; the
    row's canonical maximum is at least ``c``, and an entry of value ``s`` is at most
    ``s + B`` canonically (``B < margin = window / 2``, :mod:`.precision`), so entries
    with ``s < c - window / 2`` are strictly below the row's canonical maximum and are
    dropped before the float32 products (most of them on clustered rows).  The entry
    holding the maximum always stays, and so does the top entry (``s >= c - B``), so the
    canonical maxima are unchanged."""
    from .rescore import canonical_pairs, dots32

    second = embeddings if other is None else other
    w32 = candidate_delta(embeddings.shape[1])
    if window <= w32 or rows.size == 0:
        return rows, partners
    base = int(rows.min())
    span = int(rows.max()) - base + 1  # per-row arrays over the rows' own range
    local = rows - base
    if values is not None:
        top_of = np.full(span, -np.inf, dtype=np.float32)
        np.maximum.at(top_of, local, values)
        at_top = np.flatnonzero(values == top_of[local])
        first = at_top[np.unique(local[at_top], return_index=True)[1]]  # one per row
        top = canonical_pairs(embeddings, second, rows[first], partners[first])
        cut = np.full(span, np.inf)
        cut[local[first]] = top - float(window) / 2
        keep = values.astype(np.float64) >= cut[local]
        rows, partners, local = rows[keep], partners[keep], local[keep]
    scores = np.empty(rows.size, dtype=np.float32)

    def part(lo: int, hi: int) -> None:
        scores[lo:hi] = dots32(embeddings, second, rows[lo:hi], partners[lo:hi])

    _shared(part, rows.size, workers)
    best = np.full(span, -np.inf, dtype=np.float32)
    np.maximum.at(best, local, scores)
    keep = scores >= best[local] - np.float32(w32)
    return rows[keep], partners[keep]


def rescore_keys(
    embeddings, i: np.ndarray, j: np.ndarray, workers: int = 1, *, other=None
) -> np.ndarray:
    """``canonical_scores(embeddings, i, j, other)`` (the compiled kernel,
    :func:`~.rescore.canonical_pairs`), shared by ``workers`` threads when it is worth
    it.  The same bits: each pair's score depends on that pair alone."""
    from .rescore import canonical_pairs

    second = embeddings if other is None else other
    out = np.empty(i.shape[0], dtype=np.float64)

    def part(lo: int, hi: int) -> None:
        out[lo:hi] = canonical_pairs(embeddings, second, i[lo:hi], j[lo:hi])

    _shared(part, i.shape[0], workers)
    return out


def _shared(part: Callable[[int, int], None], size: int, workers: int) -> None:
    """``part(lo, hi)`` over ``[0, size)``, cut among ``workers`` threads when each gets
    at least :data:`THREAD_PAIRS` (the compiled kernels release the GIL)."""
    workers = max(1, min(workers, size // THREAD_PAIRS))
    if workers == 1:
        part(0, size)
        return
    from concurrent.futures import ThreadPoolExecutor

    cuts = np.linspace(0, size, workers + 1).astype(np.int64)
    with ThreadPoolExecutor(workers) as pool:
        spans = zip(cuts[:-1], cuts[1:], strict=True)
        for job in [pool.submit(part, int(lo), int(hi)) for lo, hi in spans]:
            job.result()
