"""``blocked`` backend: exact upper-triangle GEMM tiles, maxima in the same pass.

Rows are cut into blocks of ``tile`` rows; each block meets itself and every *later* row
in GEMM tiles ``S = E[a] @ E[c].T`` (numpy's BLAS into a preallocated buffer; torch on a
CUDA device when asked) — half the arithmetic of a full-square search such as FAISS's
range search, which is the physical limit for exact all-pairs similarity.  From each
tile, in the same pass:

- pair candidates: entries above ``threshold - delta`` (rescored canonically later);
- row maxima (each row's best *later* row) and column maxima (each row's best *earlier*
  row).  The best earlier row is what the reference policy needs: row ``j`` is removed at
  threshold ``t`` iff ``max_{i<j} s(i, j) >= t``, so these maxima give the exact removal
  count at every lower threshold without re-running.

Maxima are decided canonically like pairs: besides its running float32 maximum, each row
keeps every entry within ``delta`` of that maximum (a float32 near-tie can hide the true
one; a tile only adds entries when it raises or nearly ties the running maximum, so this
costs a few entries per row), and the survivors are rescored in float64 at the end.

On the CPU the row blocks are shared out to one worker thread per core, each running its
own single-threaded GEMMs (:func:`_blas_one_thread`) and scanning its own tiles in chunks
that stay in cache (:class:`_Worker`): the scan then costs about a tenth of the GEMM
instead of a third of it, which is what makes the search run near the machine's GEMM
rate (``bench/bench_exact.py``).

``precision`` picks the tile arithmetic (:mod:`.precision`): float32, or bf16/fp16 inputs
with float32 sums (oneDNN's bf16 kernel on AVX512-BF16 CPUs, tensor cores on a GPU),
gathered at the wider margin that precision's proven error bound requires.  The
rescoring is canonical whatever ran, so every result is the same bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from functools import partial

import numpy as np

from .canonical import canonical_scores
from .pairs import PairSet, rescore_candidates
from .precision import Arithmetic, arithmetic, is_tensor
from .tiles import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    DENSE_GATHER,
    NearBest,
    NumpyTiles,
    canonical_maxima,
    nonzero2d,
    tighten,
)

logger = logging.getLogger(__name__)

#: Row blocks of the threaded CPU path: one single-threaded GEMM of 1024 x 8192 runs at
#: the full per-core rate, and halves the diagonal waste of 2048-row blocks.
WORKER_ROWS = 1024
#: Columns per GEMM tile of the threaded CPU path.  1024 x 512 tiles (2 MiB: scanned
#: while still in cache) measured 5% slower end to end at N = 50k than 1024 x 8192 ones
#: scanned in chunks (more tiles, more near-best gathers); any width gives the same bits.
WORKER_COLS = 8192
#: Up to this many rows one numpy tile does it all (partitions are mostly this small).
SINGLE_TILE_ROWS = 1024
#: Bytes of tile per chunk of the CPU scan: a chunk stays in the core's L2 cache while
#: every pass (row and column maxima, the threshold test, the near-best gathers) runs.
CHUNK_BYTES = 1 << 20


def choose_tile(
    n: int, dim: int, *, memory_budget: int | None = None, workers: int = 1
) -> tuple[int, int]:
    """``(rows, cols)`` of a GEMM tile for ``n`` rows: the ``workers`` score buffers fit
    the budget (default: 1/16 of available memory, at most 512 MiB) and the diagonal
    waste stays under ~1/16 of the work (~1/32 with several workers)."""
    if memory_budget is None:
        memory_budget = min(512 << 20, _available_memory() // 16)
    memory_budget //= max(1, workers)
    if workers > 1:  # one buffer per worker (see _Worker)
        rows = max(min(512, _round64(n)), min(WORKER_ROWS, _round64(n / 32)))
        cols = max(rows, min(WORKER_COLS, _round64(n)))
    else:
        rows = max(min(512, _round64(n)), min(DEFAULT_ROWS, _round64(n / 16)))
        cols = max(rows, min(DEFAULT_COLS, _round64(n)))
    while rows * cols * 5 > memory_budget and cols > rows:
        cols //= 2
    while rows * cols * 5 > memory_budget and rows > 64:
        rows //= 2
        cols = max(rows, cols // 2)
    return rows, cols


#: GPU tile: large enough that each tile's GEMM (8192 x 65536 x D) outweighs the per-tile
#: Python and synchronisation costs of the scan; the float32 buffer is 2 GiB.
GPU_ROWS = 8192
GPU_COLS = 65536


def gpu_tile(n: int) -> tuple[int, int]:
    """``(rows, cols)`` of a GPU tile for ``n`` rows (see :data:`GPU_ROWS`)."""
    rows = min(GPU_ROWS, _round64(n))
    return rows, max(rows, min(GPU_COLS, _round64(n)))


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


def blocked_search(
    embeddings,
    threshold: float,
    *,
    tile: tuple[int, int] | int | None = None,
    threads: int | None = None,
    device: str | None = None,
    sink=None,
    engine: str | None = None,
    precision: str | Arithmetic = "auto",
    report: dict | None = None,
) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """Exact pairs, nearest-neighbour and best-earlier similarity per row.

    Returns ``(pairs, nearest, earlier)``: ``nearest[j] = max(0, max_{k != j} s(j, k))``
    and ``earlier[j] = max_{i < j} s(i, j)`` (``-inf`` for row 0), canonical scores.
    ``embeddings`` is a unit float32 array or anything indexable like one (an
    :class:`~dedup_index.store.EmbeddingStore`).  ``tile`` is ``(rows, cols)`` of a GEMM
    tile, or one int for both; by default :func:`choose_tile`.  ``threads``: CPU worker
    threads (default: the usable cores; torch's thread count on the torch path).
    ``device="cuda"`` runs the tiles in torch on the GPU; the CPU path is numpy alone
    (its BLAS) unless ``engine="torch"`` (the GPU code, run on the CPU: how the tests
    hold it).  ``sink`` (a :class:`~dedup_index.store.PairSink`) receives each tile's
    pairs as they are found and its ``finish()`` is returned as the pairs: a Parquet file
    once over its budget (its row groups then come in the order the workers finish).
    ``precision``: the tile arithmetic, a name of
    :data:`~dedup_index.search.precision.PRECISIONS` or an
    :class:`~dedup_index.search.precision.Arithmetic` (the same results whichever);
    ``report``, a dict, receives what ran (:meth:`~.precision.Arithmetic.info`).
    """
    n, d = embeddings.shape
    if n < 2:
        return PairSet.empty(), np.zeros(n), np.full(n, -np.inf)
    on_cpu = device in (None, "cpu")
    use_torch = engine == "torch" or not on_cpu
    arith = resolve_arithmetic(precision, n, d, device=device, engine=engine)
    if n <= SINGLE_TILE_ROWS and tile is None and not use_torch:
        x = np.ascontiguousarray(embeddings[:])
        pairs, nearest, earlier = _single_tile(x, threshold, arith, report)
        if sink is not None:
            sink.add(pairs)
            pairs = sink.finish()
        return pairs, nearest, earlier
    workers = 1 if use_torch else _worker_count(threads)
    if tile is None and not on_cpu:
        tile = gpu_tile(n)
    elif tile is None:
        tile = choose_tile(n, d, workers=workers)
    rows_per, cols_per = (tile, tile) if isinstance(tile, int) else tile
    # The rows the GEMMs see (rounded when low precision), and the margins for them.
    source, arith = arith.prepare(embeddings)
    if report is not None:
        report.update(arith.info())
    radius = np.float32(threshold - arith.margin)
    window = arith.window
    workers = min(workers, -(-n // rows_per))  # no idle worker: one block each at least
    logger.debug(
        "blocked: N=%d D=%d tile=%dx%d on %s, %d worker(s), %s tiles (%s)",
        n,
        d,
        rows_per,
        cols_per,
        device or "cpu",
        workers,
        arith.name,
        arith.kernel,
    )
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    lock = threading.Lock()

    def emit(found: tuple[np.ndarray, np.ndarray]) -> None:
        if sink is None:
            candidates.append(found)
            return
        rescored = rescore_candidates(embeddings, [found], threshold)  # memory: sink's budget
        with lock:
            sink.add(rescored)

    if use_torch:
        with arith.session():
            later, earlier = _search_torch(
                source, rows_per, cols_per, radius, window, device or "cpu", threads, emit, arith
            )
    else:
        with arith.session(one_thread=True):
            later, earlier = _search_numpy(
                source, rows_per, cols_per, radius, window, workers, emit, arith
            )
    del source
    pairs = rescore_candidates(embeddings, candidates, threshold) if sink is None else sink.finish()
    best_later, best_earlier = canonical_maxima(embeddings, later, earlier, workers=workers)
    nearest = np.maximum(np.maximum(best_later, best_earlier), 0.0)
    return pairs, nearest, best_earlier


def resolve_arithmetic(precision, n: int, d: int, *, device=None, engine=None) -> Arithmetic:
    """``precision`` as an :class:`~.precision.Arithmetic` for an ``n``-row search
    (``auto`` weighs the search's ``n (n - 1) / 2 * d`` multiply-adds)."""
    if isinstance(precision, Arithmetic):
        return precision
    return arithmetic(precision, d, device=device, engine=engine, work=n * (n - 1) / 2 * d)


def _search_torch(embeddings, rows_per, cols_per, radius, delta, device, threads, emit, arith):
    """The tile loop through :class:`_TorchTiles` (a GPU does whole-tile reductions
    well); ``(later, earlier)`` near-best entries."""
    n = embeddings.shape[0]
    cols_per = max(cols_per, rows_per)  # the diagonal square fits in the first tile
    ops = _TorchTiles(embeddings, rows_per, cols_per, device, threads, arith)
    later = NearBest(n, delta)  # row direction: best later row
    earlier = NearBest(n, delta)  # column direction: best earlier row
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
                emit((hit[li] + a, lj + c))
            later.update(np.arange(a, b), row_max, partial(ops.gather, s, c, False))
            earlier.update(np.arange(c, e), col_max, partial(ops.gather, s, a, True))
    return later, earlier


def _search_numpy(embeddings, rows_per, cols_per, radius, delta, workers, emit, arith):
    """The CPU tile loop: row blocks handed out in order to ``workers`` threads (the
    caller's among them), each a :class:`_Worker`; ``(later, earlier)`` near-best entries,
    merged in block order so the lists do not depend on the scheduling."""
    n = embeddings.shape[0]
    later = NearBest(n, delta)
    earlier = NearBest(n, delta)
    starts = list(range(0, n, rows_per))
    done: dict[int, tuple[list, list]] = {}
    crew = [
        _Worker(embeddings, rows_per, cols_per, radius, delta, later.best, arith)
        for _ in range(workers)
    ]
    counter = iter(range(len(starts)))
    lock = threading.Lock()
    failed = threading.Event()

    def run(worker: _Worker) -> None:
        try:
            while not failed.is_set():
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                a = starts[k]
                done[k] = worker.block(a, min(n, a + rows_per), emit)
        except BaseException:
            failed.set()
            raise

    if workers == 1:
        run(crew[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with _blas_one_thread(), ThreadPoolExecutor(workers - 1) as pool:
            jobs = [pool.submit(run, w) for w in crew[1:]]
            try:
                run(crew[0])
            finally:
                for job in jobs:
                    job.result()
    for k in range(len(starts)):
        lat, ear = done.pop(k)
        for rows, cols, vals in lat:
            later.rows.append(rows)
            later.cols.append(cols)
            later.vals.append(vals)
        for cols, rows, vals in ear:
            earlier.rows.append(cols)
            earlier.cols.append(rows)
            earlier.vals.append(vals)
    for worker in crew:
        np.maximum(earlier.best, worker.col_best, out=earlier.best)
    return later, earlier


class _Worker:
    """One CPU worker: GEMM tiles of its row blocks, each scanned while it is in cache.

    Scanning a 64 MiB tile the plain way (row maxima, column maxima, the threshold test,
    the near-best gathers: :class:`NumpyTiles`) takes five or six passes over main
    memory, a third of the GEMM's time at N = 50k.  Here a tile is scanned in chunks of
    rows of :data:`CHUNK_BYTES`, every pass over a chunk while it is in the L2 cache, by
    the worker that computed it (both cores scan).  A tile narrower than the block
    computes on the diagonal only the rows that have a later column in it.

    The near-best gathers use running lower bounds, not the tile's final maxima: a row's
    bound is its maximum so far (earlier tiles and this chunk), a column's is its maximum
    over this worker's chunks so far (``col_best``; the workers' arrays are merged at the
    end).  Every entry within ``delta`` of the final maximum is within ``delta`` of any
    lower bound, so it is gathered; the few extra entries are dropped by
    :meth:`NearBest.survivors`, which filters on the final maximum.  Same survivors, same
    bits.  Rows of a block belong to one worker, so ``later_best`` is written race-free.
    """

    def __init__(self, embeddings, rows_per, cols_per, radius, delta, later_best, arith) -> None:
        self.tiles = NumpyTiles(embeddings, rows_per, cols_per, arith)
        self.n = embeddings.shape[0]
        self.cols_per = cols_per
        self.radius = np.float32(radius)
        self.delta = np.float32(delta)
        self.later_best = later_best
        self.col_best = np.full(self.n, -np.inf, dtype=np.float32)
        self.step = max(8, CHUNK_BYTES // (4 * cols_per))
        self.masks: dict[tuple[int, int, int], np.ndarray] = {}

    def block(self, a: int, b: int, emit) -> tuple[list, list]:
        """Rows ``a:b`` against themselves and every later row; pair candidates go to
        ``emit``; returns the near-best entries ``(later, earlier)`` of the block."""
        tiles = self.tiles
        rows_a = tiles.block(a, b, second=False)
        lat: list = []
        ear: list = []
        for c in range(a, self.n, self.cols_per):
            e = min(self.n, c + self.cols_per)
            m = min(b - a, e - 1 - a)  # rows with a later column in this tile
            if m <= 0:
                continue
            s = tiles.product(rows_a[:m], tiles.block(c, e, second=True))
            found = self._scan(s, a, c, lat, ear)
            if found is not None:
                emit(found)
        return lat, ear

    def _scan(self, s: np.ndarray, a: int, c: int, lat: list, ear: list):
        """One tile (rows ``a:``, columns ``c:``), chunk by chunk; returns the pair
        candidates ``(i, j)`` above the radius, or None."""
        radius, delta = self.radius, self.delta
        ra, rc = s.shape
        run = self.col_best[c : c + rc]  # this worker's column maxima so far (a view)
        found_i, found_j = [], []
        for r0 in range(0, ra, self.step):
            r1 = min(ra, r0 + self.step)
            sub = s[r0:r1]
            reach = min(rc, a + r1 - c)  # columns c + k <= a + r: the row itself, earlier
            if reach > 0:
                np.copyto(sub[:, :reach], -np.inf, where=self._mask(r1 - r0, reach, a + r0 - c))
            row_max = sub.max(axis=1)
            hit = np.flatnonzero(row_max > radius)
            if hit.size:
                li, lj = nonzero2d(sub[hit] > radius)
                found_i.append(hit[li] + (a + r0))
                found_j.append(lj + c)
            # Row direction: entries within delta of the row's maximum so far.
            best = self.later_best[a + r0 : a + r1]
            np.maximum(best, row_max, out=best)
            bound = best - delta
            sel = np.flatnonzero((row_max >= bound) & np.isfinite(row_max))
            if sel.size:
                li, lj, vals = _gather(sub, sel, bound[sel], columns=False)
                lat.append((li + (a + r0), lj + c, vals))
            # Column direction: entries within delta of the column's maximum so far.
            col_max = sub.max(axis=0)
            np.maximum(run, col_max, out=run)
            bound = run - delta
            sel = np.flatnonzero((col_max >= bound) & np.isfinite(col_max))
            if sel.size:
                lj, li, vals = _gather(sub, sel, bound[sel], columns=True)
                ear.append((lj + c, li + (a + r0), vals))
        if not found_i:
            return None
        return np.concatenate(found_i), np.concatenate(found_j)

    def _mask(self, rows: int, cols: int, offset: int) -> np.ndarray:
        """``k <= r + offset`` over ``rows x cols`` (cached: a few shapes repeat)."""
        key = (rows, cols, offset)
        mask = self.masks.get(key)
        if mask is None:
            mask = self.masks[key] = np.tri(rows, cols, k=offset, dtype=bool)
        return mask


def _gather(sub: np.ndarray, sel: np.ndarray, lo: np.ndarray, *, columns: bool):
    """Entries ``>= lo`` of rows (or columns) ``sel`` of a chunk: ``(index along sel's
    axis, index along the other axis, float32 value)``, indices int64."""
    size = sub.shape[1] if columns else sub.shape[0]
    if sel.size > DENSE_GATHER * size:  # one compare over the chunk beats a copy
        bound = np.full(size, np.inf, dtype=np.float32)
        bound[sel] = lo
        li, lj = nonzero2d(sub >= (bound[None, :] if columns else bound[:, None]))
        vals = sub[li, lj]
        return (lj, li, vals) if columns else (li, lj, vals)
    part = sub[:, sel].T if columns else sub[sel]
    li, lj = nonzero2d(part >= lo[:, None])
    return sel[li], lj, part[li, lj]


def _worker_count(threads: int | None) -> int:
    """CPU workers: ``threads`` if given, else the usable cores (at most 16)."""
    if threads is not None:
        count = int(threads)
        if count < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
    else:
        try:
            count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            count = os.cpu_count() or 1
        count = min(count, 16)
    return count


@contextlib.contextmanager
def _blas_one_thread():
    """BLAS calls single-threaded for the duration (each worker runs its own GEMMs:
    OpenBLAS's own threads would spin against the workers)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


class _TorchTiles:
    """The same operations in torch on a CUDA device (also usable on the CPU)."""

    def __init__(self, embeddings, rows_per: int, cols_per: int, device, threads, arith) -> None:
        import torch

        self.torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.dev = torch.device(device)
        self.arith = arith
        self.buf = torch.empty(rows_per * cols_per, dtype=torch.float32, device=self.dev)
        self.lower = torch.ones(rows_per, rows_per, dtype=torch.bool, device=self.dev).tril_()
        self.resident = _Resident(embeddings, self.dev, arith.torch_dtype())

    def block(self, a: int, b: int, second: bool):
        return self.resident.block(a, b, second=second)

    def product(self, rows_a, rows_c):
        out = self.buf[: rows_a.shape[0] * rows_c.shape[0]].view(rows_a.shape[0], -1)
        return self.arith.torch_product(rows_a, rows_c, out)

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


def _single_tile(
    x: np.ndarray, threshold: float, arith: Arithmetic, report: dict | None = None
) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """The whole search in one ``n x n`` float32 tile (small ``n``), same decisions."""
    n, d = x.shape
    rounded, arith = arith.prepare(x)
    if report is not None:
        report.update(arith.info())
    delta = np.float32(arith.window)
    with arith.session():
        sim = arith.product(rounded, rounded, np.empty((n, n), dtype=np.float32))
    del rounded
    sim[np.tril_indices(n)] = -np.inf  # strict upper triangle: i < j
    ci, cj = nonzero2d(sim > np.float32(threshold - arith.margin))
    pairs = rescore_candidates(x, [(ci, cj)], threshold)
    later = sim.max(axis=1)
    earlier = sim.max(axis=0)
    li, lj = nonzero2d((sim >= (later - delta)[:, None]) & np.isfinite(later)[:, None])
    ei, ej = nonzero2d((sim >= (earlier - delta)[None, :]) & np.isfinite(earlier)[None, :])
    del sim
    # A low-precision window keeps many entries: cut them to the float32 window first.
    li, lj = tighten(x, li.astype(np.int64), lj.astype(np.int64), window=delta)
    ej, ei = tighten(x, ej.astype(np.int64), ei.astype(np.int64), window=delta)
    lo = np.concatenate([li, ei])
    hi = np.concatenate([lj, ej])
    key = np.unique(lo * n + hi)
    scores = canonical_scores(x, key // n, key % n)
    best_later = np.full(n, -np.inf)
    best_earlier = np.full(n, -np.inf)
    np.maximum.at(best_later, key // n, scores)
    np.maximum.at(best_earlier, key % n, scores)
    nearest = np.maximum(np.maximum(best_later, best_earlier), 0.0)
    return pairs, nearest, best_earlier


class _Resident:
    """Row blocks as torch tensors: zero-copy views of an in-memory array on the CPU,
    read per use from a store, or copied once to the device when it fits there."""

    def __init__(self, embeddings, dev, dtype=None) -> None:
        import torch

        self.torch = torch
        self.embeddings = embeddings
        self.dev = dev
        self.dtype = dtype or torch.float32
        self.whole = None
        if is_tensor(embeddings):  # rows prepared in torch already (bf16 on the CPU)
            self.whole = embeddings.to(dev, self.dtype)
        elif isinstance(embeddings, np.ndarray) and dev.type == "cpu":
            self.whole = torch.from_numpy(np.ascontiguousarray(embeddings)).to(self.dtype)
        elif dev.type != "cpu":
            free, _ = torch.cuda.mem_get_info(dev)
            need = embeddings.shape[0] * embeddings.shape[1] * self.dtype.itemsize
            if need < free // 2:
                self.whole = torch.empty(embeddings.shape, dtype=self.dtype, device=dev)
                step = max(1, (256 << 20) // (4 * max(1, embeddings.shape[1])))
                for a in range(0, embeddings.shape[0], step):  # bounded host memory
                    rows = np.ascontiguousarray(embeddings[a : a + step], dtype=np.float32)
                    self.whole[a : a + rows.shape[0]] = torch.from_numpy(rows).to(dev, self.dtype)
        self.cache: dict[bool, tuple[tuple[int, int], object]] = {}

    def block(self, a: int, b: int, second: bool = False):
        """Rows ``a:b``; a store keeps the last row block and the last column block."""
        if self.whole is not None:
            return self.whole[a:b]
        key, t = self.cache.get(second, (None, None))
        if key != (a, b):
            rows = self.embeddings[a:b]
            if not is_tensor(rows):
                rows = self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
            t = rows.to(self.dev, self.dtype)
            self.cache[second] = ((a, b), t)
        return t
