"""``blocked`` backend: exact upper-triangle GEMM tiles, maxima in the same pass.

Rows are cut into blocks of ``tile`` rows; for every pair of blocks ``a <= c`` one GEMM
``S = E[a] @ E[c].T`` (torch, into a preallocated buffer; on a CUDA device when asked)
gives the scores of rows of ``a`` against *later* rows of ``c`` — half the arithmetic of
a full-square search such as FAISS's range search, which is the physical limit for
exact all-pairs similarity.  From each tile, in the same pass:

- pair candidates: entries above ``threshold - delta`` (rescored canonically later);
- row maxima (each row's best *later* row) and column maxima (each row's best *earlier*
  row).  The best earlier row is what the reference policy needs: row ``j`` is removed at
  threshold ``t`` iff ``max_{i<j} s(i, j) >= t``, so these maxima give the exact removal
  count at every lower threshold without re-running.

Maxima are decided canonically like pairs: besides its running float32 maximum, each row
keeps every entry within ``delta`` of that maximum (a float32 near-tie can hide the true
one; a tile only adds entries when it raises or nearly ties the running maximum, so this
costs a few entries per row), and the survivors are rescored in float64 at the end.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np

from .canonical import candidate_delta, canonical_scores
from .pairs import PairSet, rescore_candidates

logger = logging.getLogger(__name__)

#: Rows per row block, and columns per GEMM tile (a row block meets the later rows in
#: chunks of this many): wide tiles keep the GEMM near its peak, short row blocks keep
#: the wasted lower triangle of the diagonal tiles (``N * rows / 2`` products) small.
DEFAULT_ROWS = 2048
DEFAULT_COLS = 8192
#: Up to this many rows one numpy tile does it all (partitions are mostly this small).
SINGLE_TILE_ROWS = 1024


def choose_tile(n: int, dim: int, *, memory_budget: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a GEMM tile for ``n`` rows: the score buffer fits the budget
    (default: 1/16 of available memory, at most 512 MiB) and the diagonal waste stays
    under ~1/16 of the work."""
    if memory_budget is None:
        memory_budget = min(512 << 20, _available_memory() // 16)
    rows = max(min(512, _round64(n)), min(DEFAULT_ROWS, _round64(n / 16)))
    cols = max(rows, min(DEFAULT_COLS, _round64(n)))
    while rows * cols * 5 > memory_budget and cols > rows:
        cols //= 2
    while rows * cols * 5 > memory_budget and rows > 64:
        rows //= 2
        cols = max(rows, cols // 2)
    return rows, cols


def _round64(x: float) -> int:
    return max(64, int(-(-x // 64)) * 64)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class _NearBest:
    """Per row: running float32 maximum and the entries within ``delta`` of it."""

    def __init__(self, n: int, delta: float) -> None:
        self.best = np.full(n, -np.inf, dtype=np.float32)
        self.delta = np.float32(delta)
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def update(self, rows: np.ndarray, tile_max: np.ndarray, gather) -> None:
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

    def survivors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(row, other)`` entries within ``delta`` of the row's final float32 maximum."""
        if not self.rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = np.concatenate(self.rows).astype(np.int64)
        keep = np.concatenate(self.vals) >= self.best[rows] - self.delta
        return rows[keep], np.concatenate(self.cols).astype(np.int64)[keep]


def blocked_search(
    embeddings,
    threshold: float,
    *,
    tile: tuple[int, int] | int | None = None,
    threads: int | None = None,
    device: str | None = None,
    sink=None,
    engine: str | None = None,
) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """Exact pairs, nearest-neighbour and best-earlier similarity per row.

    Returns ``(pairs, nearest, earlier)``: ``nearest[j] = max(0, max_{k != j} s(j, k))``
    and ``earlier[j] = max_{i < j} s(i, j)`` (``-inf`` for row 0), canonical scores.
    ``embeddings`` is a unit float32 array or anything indexable like one (an
    :class:`~dedup_index.store.EmbeddingStore`).  ``tile`` is ``(rows, cols)`` of a GEMM
    tile, or one int for both; by default :func:`choose_tile`.  ``device="cuda"`` runs the
    tiles in torch on the GPU; the CPU path is numpy alone (its BLAS) unless
    ``engine="torch"`` (the GPU code, run on the CPU: how the tests hold it).  ``sink`` (a
    :class:`~dedup_index.store.PairSink`) receives each tile's pairs as they are found and
    its ``finish()`` is returned as the pairs: a Parquet file once over its budget.
    """
    n, d = embeddings.shape
    if n < 2:
        return PairSet.empty(), np.zeros(n), np.full(n, -np.inf)
    on_cpu = device in (None, "cpu")
    use_torch = engine == "torch" or not on_cpu
    if n <= SINGLE_TILE_ROWS and tile is None and not use_torch:
        pairs, nearest, earlier = _single_tile(np.ascontiguousarray(embeddings[:]), threshold)
        if sink is not None:
            sink.add(pairs)
            pairs = sink.finish()
        return pairs, nearest, earlier
    if tile is None:
        tile = choose_tile(n, d)
    rows_per, cols_per = (tile, tile) if isinstance(tile, int) else tile
    delta = candidate_delta(d)
    radius = np.float32(threshold - delta)
    ops = (
        _NumpyTiles(embeddings, rows_per, cols_per)
        if on_cpu
        else _TorchTiles(embeddings, rows_per, cols_per, device, threads)
    )
    logger.debug("blocked: N=%d D=%d tile=%dx%d on %s", n, d, rows_per, cols_per, device)
    later = _NearBest(n, delta)  # row direction: best later row
    earlier = _NearBest(n, delta)  # column direction: best earlier row
    candidates: list[tuple[np.ndarray, np.ndarray]] = []

    for a in range(0, n, rows_per):
        b = min(n, a + rows_per)
        rows_a = ops.block(a, b, second=False)
        for c in range(a, n, cols_per):
            e = min(n, c + cols_per)
            s = ops.product(rows_a, ops.block(c, e, second=True))
            if c == a:  # only the leading square holds the row itself and earlier rows
                ops.mask_diagonal(s, b - a)
            row_max, col_max = ops.maxima(s)
            hit = np.flatnonzero(row_max > radius)
            if hit.size:
                li, lj = ops.above(s, hit, radius)
                found = (hit[li] + a, lj + c)
                if sink is None:
                    candidates.append(found)
                else:  # rescore now: memory stays within the sink's budget
                    sink.add(rescore_candidates(embeddings, [found], threshold))
            later.update(np.arange(a, b), row_max, partial(ops.gather, s, c, False))
            earlier.update(np.arange(c, e), col_max, partial(ops.gather, s, a, True))

    pairs = rescore_candidates(embeddings, candidates, threshold) if sink is None else sink.finish()
    best_later, best_earlier = _canonical_maxima(embeddings, later, earlier)
    nearest = np.maximum(np.maximum(best_later, best_earlier), 0.0)
    return pairs, nearest, best_earlier


class _NumpyTiles:
    """Tile operations on the CPU in numpy.  One BLAS for everything: mixing torch's
    OpenMP pool with numpy's OpenBLAS threads made both spin against each other (the
    same search ran 25% slower than torch alone), and OpenBLAS's SGEMM is 1.4-1.6x
    torch's MKL on the AMD CPUs measured here."""

    def __init__(self, embeddings, rows_per: int, cols_per: int) -> None:
        self.embeddings = embeddings
        self.in_memory = isinstance(embeddings, np.ndarray)
        self.buf = np.empty(rows_per * cols_per, dtype=np.float32)
        self.rows_per = rows_per
        self._lower: np.ndarray | None = None  # c <= r: the row itself and earlier rows
        self.cache: dict[bool, tuple[tuple[int, int], np.ndarray]] = {}

    def block(self, a: int, b: int, second: bool) -> np.ndarray:
        if self.in_memory:
            return self.embeddings[a:b]
        key, rows = self.cache.get(second, (None, None))
        if key != (a, b):  # a store: keep the last row block and the last column block
            rows = np.ascontiguousarray(self.embeddings[a:b], dtype=np.float32)
            self.cache[second] = ((a, b), rows)
        return rows

    def product(self, rows_a: np.ndarray, rows_c: np.ndarray) -> np.ndarray:
        out = self.buf[: rows_a.shape[0] * rows_c.shape[0]].reshape(rows_a.shape[0], -1)
        return np.matmul(rows_a, rows_c.T, out=out)

    def mask_diagonal(self, s: np.ndarray, ra: int) -> None:
        if self._lower is None:
            self._lower = np.tri(self.rows_per, dtype=bool)
        np.copyto(s[:, :ra], -np.inf, where=self._lower[:ra, :ra])

    def maxima(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return s.max(axis=1), s.max(axis=0)

    def above(self, s: np.ndarray, rows: np.ndarray, bound) -> tuple[np.ndarray, np.ndarray]:
        return _nonzero2d(s[rows] > bound)

    def gather(self, s, offset: int, columns: bool, sel: np.ndarray, lo: np.ndarray):
        """Entries ``>= lo`` of the selected rows (or columns) ``sel`` of tile ``s``:
        ``(row or column within the tile, other row id, float32 score)``."""
        size = s.shape[1] if columns else s.shape[0]
        if sel.size > _DENSE_GATHER * size:
            bound = np.full(size, np.inf, dtype=np.float32)
            bound[sel] = lo
            li, lj = _nonzero2d(s >= (bound[None, :] if columns else bound[:, None]))
            vals = s[li, lj]
            if columns:
                li, lj = lj, li
            return li, lj.astype(np.int64) + offset, vals
        sub = s[:, sel].T if columns else s[sel]
        li, lj = _nonzero2d(sub >= lo[:, None])
        return sel[li], lj + offset, sub[li, lj]


def _nonzero2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D mask, ~10x faster for sparse masks (flat scan, then divmod)."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1])


class _TorchTiles:
    """The same operations in torch on a CUDA device (also usable on the CPU)."""

    def __init__(self, embeddings, rows_per: int, cols_per: int, device, threads) -> None:
        import torch

        self.torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.dev = torch.device(device)
        self.buf = torch.empty(rows_per * cols_per, dtype=torch.float32, device=self.dev)
        self.lower = torch.ones(rows_per, rows_per, dtype=torch.bool, device=self.dev).tril_()
        self.resident = _Resident(embeddings, self.dev)

    def block(self, a: int, b: int, second: bool):
        return self.resident.block(a, b, second=second)

    def product(self, rows_a, rows_c):
        out = self.buf[: rows_a.shape[0] * rows_c.shape[0]].view(rows_a.shape[0], -1)
        return self.torch.mm(rows_a, rows_c.T, out=out)

    def mask_diagonal(self, s, ra: int) -> None:
        s[:, :ra].masked_fill_(self.lower[:ra, :ra], float("-inf"))

    def maxima(self, s) -> tuple[np.ndarray, np.ndarray]:
        t = self.torch
        return t.amax(s, dim=1).cpu().numpy(), t.amax(s, dim=0).cpu().numpy()

    def above(self, s, rows: np.ndarray, bound) -> tuple[np.ndarray, np.ndarray]:
        sub = s[self.torch.from_numpy(rows).to(self.dev)]
        li, lj = self.torch.nonzero(sub > float(bound), as_tuple=True)
        return li.cpu().numpy(), lj.cpu().numpy().astype(np.int64)

    def gather(self, s, offset: int, columns: bool, sel: np.ndarray, lo: np.ndarray):
        t = self.torch
        sel_t = t.from_numpy(sel).to(self.dev)
        sub = s.index_select(1, sel_t).T if columns else s.index_select(0, sel_t)
        li, lj = t.nonzero(sub >= t.from_numpy(lo).to(self.dev)[:, None], as_tuple=True)
        vals = sub[li, lj].cpu().numpy()
        return sel[li.cpu().numpy()], lj.cpu().numpy().astype(np.int64) + offset, vals


def _single_tile(x: np.ndarray, threshold: float) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """The whole search in one ``n x n`` float32 tile (small ``n``), same decisions."""
    n, d = x.shape
    delta = np.float32(candidate_delta(d))
    sim = x @ x.T
    sim[np.tril_indices(n)] = -np.inf  # strict upper triangle: i < j
    ci, cj = _nonzero2d(sim > threshold - delta)
    pairs = rescore_candidates(x, [(ci, cj)], threshold)
    later = sim.max(axis=1)
    earlier = sim.max(axis=0)
    li, lj = _nonzero2d((sim >= (later - delta)[:, None]) & np.isfinite(later)[:, None])
    ei, ej = _nonzero2d((sim >= (earlier - delta)[None, :]) & np.isfinite(earlier)[None, :])
    lo = np.concatenate([li, ei]).astype(np.int64)
    hi = np.concatenate([lj, ej]).astype(np.int64)
    key = np.unique(lo * n + hi)
    scores = canonical_scores(x, key // n, key % n)
    best_later = np.full(n, -np.inf)
    best_earlier = np.full(n, -np.inf)
    np.maximum.at(best_later, key // n, scores)
    np.maximum.at(best_earlier, key % n, scores)
    nearest = np.maximum(np.maximum(best_later, best_earlier), 0.0)
    return pairs, nearest, best_earlier


def _canonical_maxima(embeddings, later: _NearBest, earlier: _NearBest):
    """Canonical best-later and best-earlier score per row, each pair rescored once
    (the later entry ``(i, j)`` of row ``i`` is the earlier entry of row ``j``)."""
    n = later.best.shape[0]
    li, lj = later.survivors()
    ej, ei = earlier.survivors()  # row j, its earlier partner i
    lo = np.concatenate([li, ei])
    hi = np.concatenate([lj, ej])
    key = np.unique(lo * n + hi)
    scores = canonical_scores(embeddings, key // n, key % n)
    best_later = np.full(n, -np.inf)
    best_earlier = np.full(n, -np.inf)
    np.maximum.at(best_later, li, scores[np.searchsorted(key, li * n + lj)])
    np.maximum.at(best_earlier, ej, scores[np.searchsorted(key, ei * n + ej)])
    return best_later, best_earlier


#: Above this share of relevant rows (columns), one compare over the whole tile beats
#: copying the selected rows (columns) out first.
_DENSE_GATHER = 0.15


class _Resident:
    """Row blocks as torch tensors: zero-copy views of an in-memory array on the CPU,
    read per use from a store, or copied once to the device when it fits there."""

    def __init__(self, embeddings, dev) -> None:
        import torch

        self.torch = torch
        self.embeddings = embeddings
        self.dev = dev
        self.whole = None
        if isinstance(embeddings, np.ndarray) and dev.type == "cpu":
            self.whole = torch.from_numpy(np.ascontiguousarray(embeddings))
        elif dev.type != "cpu":
            free, _ = torch.cuda.mem_get_info(dev)
            need = embeddings.shape[0] * embeddings.shape[1] * 4
            if need < free // 2:
                host = embeddings if isinstance(embeddings, np.ndarray) else embeddings[:]
                self.whole = torch.from_numpy(np.ascontiguousarray(host)).to(dev)
        self.cache: dict[bool, tuple[tuple[int, int], object]] = {}

    def block(self, a: int, b: int, second: bool = False):
        """Rows ``a:b``; a store keeps the last row block and the last column block."""
        if self.whole is not None:
            return self.whole[a:b]
        key, t = self.cache.get(second, (None, None))
        if key != (a, b):
            t = self.torch.from_numpy(np.ascontiguousarray(self.embeddings[a:b])).to(self.dev)
            self.cache[second] = ((a, b), t)
        return t
