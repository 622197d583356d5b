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
rate (``bench/bench_exact.py``).  A bf16 tile stays bf16 until each chunk is widened
just before its scan.

On a GPU (and with ``engine="torch"`` on the CPU, how the tests hold it) the tile loop is
:class:`TorchTiles`: tiles sized from the device's free memory (:func:`gpu_tile`), the
row and column maxima kept on the device, one compacted copy of each tile's candidates
back to the host, and a store's rows streamed to the device in chunks through a pinned
buffer (:class:`DeviceRows`).

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
    prune_near,
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
#: The CPU loop drops, every this many finished row blocks, the kept near-best entries of
#: columns that the columns' running maxima have left behind (bounded memory: with a
#: wide bf16 window, keeping them all grew past 20 GB at 1M rows).
PRUNE_EVERY = 8


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


#: GPU tile, at most: large enough that each tile's GEMM (8192 x 65536 x D) outweighs the
#: per-tile Python and synchronisation costs of the scan; its float32 scores are 2 GiB.
#: ``rows * cols <= 2^29`` also keeps a tile's flat entry index (and two flag bits) in
#: the 31 bits :class:`TorchTiles` packs it into.
GPU_ROWS = 8192
GPU_COLS = 65536
#: Device bytes per tile entry: the float32 score, the float32 bound it is compared
#: with, the bool mask, the float32 product a bf16/fp16 GEMM writes before it is copied
#: into the score buffer, and room for the compacted entries (8 bytes each, plus their
#: indices' temporaries) of a tile in which a tenth of the entries are candidates.
TILE_ENTRY_BYTES = 4 + 4 + 1 + 4 + 3
#: Share of the device's free memory the tile buffers may take (the rest: the resident
#: rows, torch's allocator slack, other users of the device).
TILE_MEMORY_SHARE = 0.5
#: Rows resident on the device when they take at most this share of its free memory.
RESIDENT_SHARE = 0.5


def gpu_tile(n: int, free_bytes: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a device tile for ``n`` rows: at most :data:`GPU_ROWS` x
    :data:`GPU_COLS`, its buffers (:data:`TILE_ENTRY_BYTES` per entry) within
    :data:`TILE_MEMORY_SHARE` of ``free_bytes`` (the device's free memory, after the
    resident rows; None: no limit)."""
    rows = min(GPU_ROWS, _round64(n))
    cols = max(rows, min(GPU_COLS, _round64(n)))
    if free_bytes is not None:
        entries = int(free_bytes * TILE_MEMORY_SHARE) // TILE_ENTRY_BYTES
        while rows * rows > entries and rows > 64:  # the diagonal square must fit
            rows = max(64, _round64(rows // 2))
        if rows * rows > entries:
            raise MemoryError(
                f"device has {free_bytes} bytes free: not enough for the smallest tile "
                f"(64 x 64, {64 * 64 * TILE_ENTRY_BYTES} bytes)"
            )
        cols = min(cols, max(rows, entries // rows // 64 * 64))  # as wide as fits
    return rows, cols


def device_free_memory(device) -> int | None:
    """Free bytes on a CUDA ``device`` (``torch.cuda.mem_get_info``); None on the CPU
    (the tiles there are sized from host memory by :func:`choose_tile`)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


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
    resident: bool | None = None,
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
    On the torch path the tile is by default :func:`gpu_tile` of the device's free
    memory (on the CPU :func:`choose_tile`), and a store's rows are streamed to the
    device in chunks (:class:`DeviceRows`; ``resident``: force them resident on the
    device or streamed block by block, default by free device memory).
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
    if tile is None and not use_torch:
        tile = choose_tile(n, d, workers=workers)
    # The rows the GEMMs see (rounded when low precision), and the margins for them.
    source, arith = arith.prepare(embeddings)
    if report is not None:
        report.update(arith.info())
    radius = np.float32(threshold - arith.margin)
    window = arith.window
    if not use_torch:
        rows_per, cols_per = (tile, tile) if isinstance(tile, int) else tile
        workers = min(workers, -(-n // rows_per))  # no idle worker: one block each at least
        logger.debug(
            "blocked: N=%d D=%d tile=%dx%d, %d worker(s), %s tiles (%s)",
            n,
            d,
            rows_per,
            cols_per,
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
        with arith.session(torch_tiles=True):
            later, earlier = _search_torch(
                source,
                tile,
                radius,
                window,
                device or "cpu",
                threads,
                emit,
                arith,
                resident,
                report,
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


def _search_torch(
    embeddings, tile, radius, delta, device, threads, emit, arith, resident, report=None
):
    """The torch tile loop (:class:`TorchTiles`: a CUDA device, or the CPU for the
    tests); ``(later, earlier)`` near-best entries, ``later.best``/``earlier.best`` the
    float32 maxima kept on the device and copied back once at the end.  ``report``
    receives ``device_tiles``: the tile, whether the rows were resident or streamed, the
    number of tiles, copies each way and blocking waits (:class:`Transfers`)."""
    import torch

    n, d = embeddings.shape
    dev = torch.device(device)
    rows = DeviceRows(embeddings, dev, arith.torch_dtype(), resident=resident)
    if tile is None:
        if dev.type == "cpu":
            tile = choose_tile(n, d)
        else:
            tile = gpu_tile(n, device_free_memory(dev))
    rows_per, cols_per = (tile, tile) if isinstance(tile, int) else tile
    cols_per = max(cols_per, rows_per)  # the diagonal square fits in the first tile
    logger.debug(
        "blocked torch: tile %dx%d on %s, rows %s",
        rows_per,
        cols_per,
        dev,
        "resident" if rows.whole is not None else "streamed",
    )
    ops = TorchTiles(rows, n, rows_per, cols_per, radius, delta, threads, arith)
    later = NearBest(n, delta)  # row direction: best later row
    earlier = NearBest(n, delta)  # column direction: best earlier row
    tiles = 0
    for a in range(0, n, rows_per):
        b = min(n, a + rows_per)
        rows_a = rows.block(a, b, second=False)
        for c in range(a, n, cols_per):
            e = min(n, c + cols_per)
            ops.tile(rows_a, rows.block(c, e, second=True), a, c, emit, later, earlier)
            tiles += 1
    later.best, earlier.best = ops.maxima()
    if report is not None:
        moved = rows.transfers
        report["device_tiles"] = {
            "device": str(dev),
            "tile": [rows_per, cols_per],
            "rows": "resident" if rows.whole is not None else "streamed",
            "largest_read": rows.largest_read,
            "tiles": tiles,
            "to_host": moved.to_host_calls,
            "to_device": moved.to_device_calls,
            "syncs": moved.syncs,
        }
    return later, earlier


class Transfers:
    """Counts of the copies between host and device and of the blocking waits of one
    torch tile loop: every copy goes through :meth:`to_host` / :meth:`to_device`, so a
    test can hold the loop to one compacted copy back per tile."""

    def __init__(self) -> None:
        self.to_host_calls = 0
        self.to_device_calls = 0
        self.syncs = 0

    def to_host(self, t) -> np.ndarray:
        """``t`` as a numpy array on the host (one copy, which waits for ``t``)."""
        self.to_host_calls += 1
        if t.device.type != "cpu":
            self.syncs += 1
        return t.cpu().numpy()

    def to_device(self, dst, src, *, non_blocking: bool = False) -> None:
        """``dst.copy_(src)`` from the host."""
        self.to_device_calls += 1
        dst.copy_(src, non_blocking=non_blocking)

    def synced(self) -> None:
        """A blocking wait that is not a copy (``nonzero``'s count)."""
        self.syncs += 1


class TorchTiles:
    """One tile at a time on the torch device, with one copy back to the host per tile.

    Per tile: the GEMM into a preallocated float32 buffer, the diagonal mask, row and
    column maxima folded into running maxima *on the device* (``best_row``,
    ``best_col``), then one mask of every entry the host needs: pair candidates (``>
    radius``) and near-best entries (``>=`` the row's or the column's running maximum
    minus ``delta``: lower bounds of the final maxima, so every entry within ``delta``
    of a final maximum is among them; :meth:`NearBest.survivors` drops the rest, as
    :class:`_Worker` does on the CPU).  ``nonzero`` compacts the mask (its count is the
    one wait per tile); the entries' flat indices, two flags (row-near-best,
    column-near-best) and float32 bits are packed in one int64 each and copied back in
    one transfer.  Before, each tile made eight copies back, four to the device and two
    or three blocking waits.  The maxima come back once, at the end.

    The same tiles serve a rectangular search, queries against a base (the index's
    cross search, :func:`~.cross.cross_search`): ``n`` rows and ``n_cols`` columns,
    ``square=False`` (no diagonal to mask), ``col_floor`` (per column, a score it already
    has: its near-best entries start from there, as :class:`NearBest`'s ``floor``),
    ``columns=False`` (no column near-best entries wanted) and ``dead`` columns per tile
    (left out, as if absent)."""

    def __init__(
        self,
        rows: DeviceRows,
        n: int,
        rows_per: int,
        cols_per: int,
        radius,
        delta,
        threads,
        arith,
        *,
        n_cols: int | None = None,
        col_floor: np.ndarray | None = None,
        square: bool = True,
        columns: bool = True,
    ) -> None:
        import torch

        self.torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        dev = rows.dev
        self.dev = dev
        self.arith = arith
        self.transfers = rows.transfers
        self.radius = np.float32(radius)
        size = rows_per * cols_per
        if size > 1 << 29:
            raise ValueError(f"tile {rows_per} x {cols_per} exceeds 2^29 entries")
        self.buf = torch.empty(size, dtype=torch.float32, device=dev)
        self.bound = torch.empty(size if columns else 0, dtype=torch.float32, device=dev)
        self.mask = torch.empty(size, dtype=torch.bool, device=dev)
        self.square = square
        self.columns = columns
        self.lower = (
            torch.ones(rows_per, rows_per, dtype=torch.bool, device=dev).tril_() if square else None
        )
        self.best_row = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        if col_floor is None:
            n_cols = n if n_cols is None else n_cols
            self.best_col = torch.full((n_cols,), float("-inf"), dtype=torch.float32, device=dev)
        else:  # a copy: the running maxima are written in place
            floor = np.array(col_floor, dtype=np.float32)
            self.best_col = torch.from_numpy(floor).to(dev)
        # Scalars as float32 device tensors: the device arithmetic is float32 like the
        # host's (``best - delta`` on both sides gives the same bits).
        self.delta = torch.tensor(np.float32(delta), device=dev)
        self.inf = torch.tensor(np.float32(np.inf), device=dev)
        # ``s > radius`` is ``s >= next float32 above radius``: one ``>=`` for all three.
        self.above = float(np.nextafter(self.radius, np.float32(np.inf)))

    def tile(
        self,
        rows_a,
        rows_c,
        a: int,
        c: int,
        emit,
        later: NearBest,
        earlier: NearBest | None,
        dead=None,
    ):
        """Rows ``a:`` against columns ``c:``; pairs to ``emit``, near-best entries to
        ``later``/``earlier`` (their running maxima stay on the device; ``earlier`` None
        when ``columns=False``).  ``dead``: None, or a bool device tensor over the tile's
        columns, True for those left out (their scores are ``-inf``)."""
        t = self.torch
        ra, rc = rows_a.shape[0], rows_c.shape[0]
        s = self.buf[: ra * rc].view(ra, rc)
        self.arith.torch_product(rows_a, rows_c, s)
        if self.square and c == a:  # only the leading square holds the row and earlier rows
            s[:, :ra].masked_fill_(self.lower[:ra, :ra], float("-inf"))
        if dead is not None:
            s.masked_fill_(dead[None, :], float("-inf"))
        best_r = self.best_row[a : a + ra]
        t.maximum(best_r, t.amax(s, dim=1), out=best_r)
        lo_r = t.where(t.isfinite(best_r), best_r - self.delta, self.inf)
        mask = self.mask[: ra * rc].view(ra, rc)
        if self.columns:
            best_c = self.best_col[c : c + rc]
            t.maximum(best_c, t.amax(s, dim=0), out=best_c)
            lo_c = t.where(t.isfinite(best_c), best_c - self.delta, self.inf)
            bound = self.bound[: ra * rc].view(ra, rc)
            t.minimum(lo_r.clamp(max=self.above)[:, None], lo_c[None, :], out=bound)
            t.ge(s, bound, out=mask)
        else:
            lo_c = self.inf.expand(rc)  # no column entries: the flag is never set
            t.ge(s, lo_r.clamp(max=self.above)[:, None], out=mask)
        flat = t.nonzero(mask.view(-1)).squeeze(1)
        if self.dev.type != "cpu":
            self.transfers.synced()  # nonzero waits for its count
        if flat.numel() == 0:
            return
        vals = s.view(-1)[flat]
        r = flat // rc
        flags = (vals >= lo_r[r]).to(t.int64) | ((vals >= lo_c[flat - r * rc]).to(t.int64) << 1)
        bits = vals.view(t.int32).to(t.int64) & 0xFFFFFFFF
        packed = self.transfers.to_host((((flat << 2) | flags) << 32) | bits)
        head = packed >> 32
        flat_h = head >> 2
        vals_h = (packed & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        li, lj = np.divmod(flat_h, rc)
        pair = vals_h > self.radius
        if pair.any():
            emit((li[pair] + a, lj[pair] + c))
        row = (head & 1).astype(bool)
        if row.any():
            later.rows.append(li[row] + a)
            later.cols.append(lj[row] + c)
            later.vals.append(vals_h[row])
        col = (head & 2).astype(bool)
        if earlier is not None and col.any():
            earlier.rows.append(lj[col] + c)
            earlier.cols.append(li[col] + a)
            earlier.vals.append(vals_h[col])

    def maxima(self) -> tuple[np.ndarray, np.ndarray]:
        """The running float32 maxima ``(best later, best earlier)`` (per row, per
        column), one copy back."""
        both = self.transfers.to_host(self.torch.cat([self.best_row, self.best_col]))
        n = self.best_row.shape[0]
        return both[:n].copy(), both[n:].copy()


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
    finished = [0]

    def run(worker: _Worker) -> None:
        try:
            while not failed.is_set():
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                a = starts[k]
                found = worker.block(a, min(n, a + rows_per), emit)
                with lock:
                    done[k] = found
                    finished[0] += 1
                    if finished[0] % PRUNE_EVERY == 0:
                        _prune_done(done, crew)
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


def _prune_done(done: dict, crew: list) -> None:
    """Prune the finished blocks' column entries against the columns' running maxima
    over every worker (each worker's array only grows: any read is a lower bound)."""
    bound = crew[0].col_best.copy()
    for worker in crew[1:]:
        np.maximum(bound, worker.col_best, out=bound)
    delta = crew[0].delta
    for k, (lat, ear) in done.items():
        done[k] = (lat, prune_near(ear, bound, delta))


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
        # oneDNN's bf16 GEMM writes bf16: the tile stays bf16 (half the bytes) and each
        # chunk is widened to float32 into a cache-sized buffer just before its scan,
        # instead of widening the whole tile through main memory first.
        self.raw = arith is not None and arith.kernel == "onednn"
        if self.raw:
            import torch

            self.torch = torch
            self.tile16 = torch.empty(rows_per * cols_per, dtype=torch.bfloat16)
            self.chunk = np.empty(self.step * cols_per, dtype=np.float32)

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
            cols = tiles.block(c, e, second=True)
            if self.raw:  # bf16 out, into a buffer reused tile after tile
                out = self.tile16[: m * (e - c)].view(m, e - c)
                s = self.torch.mm(rows_a[:m], cols.T, out=out)
            else:
                s = tiles.product(rows_a[:m], cols)
            found = self._scan(s, a, c, lat, ear)
            if found is not None:
                emit(found)
        # The block's rows have met every later column: their maxima are final, so only
        # their survivors need keeping; columns keep what their running maxima allow.
        rows_kept = prune_near(lat, self.later_best, self.delta)
        return rows_kept, prune_near(ear, self.col_best, self.delta)

    def _scan(self, s, a: int, c: int, lat: list, ear: list):
        """One tile (rows ``a:``, columns ``c:``; float32 numpy, or a bf16 tensor widened
        chunk by chunk), chunk by chunk; returns the pair candidates ``(i, j)`` above the
        radius, or None."""
        radius, delta = self.radius, self.delta
        ra, rc = s.shape
        run = self.col_best[c : c + rc]  # this worker's column maxima so far (a view)
        found_i, found_j = [], []
        for r0 in range(0, ra, self.step):
            r1 = min(ra, r0 + self.step)
            if self.raw:
                sub = self.chunk[: (r1 - r0) * rc].reshape(r1 - r0, rc)
                self.torch.from_numpy(sub).copy_(s[r0:r1])  # exact: bf16 -> float32
            else:
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


#: Bytes of rows per staging chunk on their way to the device (pinned on CUDA).
STAGING_BYTES = 64 << 20


class DeviceRows:
    """The search's rows as torch tensors on ``dev``, read from the host in chunks.

    - On the CPU, rows in memory already (an array, or torch rows
      :meth:`Arithmetic.prepare` made) are used as they are (zero-copy where the dtype
      allows).
    - A store (or a memmap, or rows rounded as read) is never read whole into host RAM.
      On a CUDA device any rows are made resident when they take at most
      :data:`RESIDENT_SHARE` of its free memory (``resident=None``; True/False forces
      it), filled chunk by chunk through one pinned staging buffer of
      :data:`STAGING_BYTES`; otherwise each row block is streamed through it when the
      loop asks for it.  On the CPU (``engine="torch"``) the rows are read block by block
      (the last row block and the last column block are kept), or, with
      ``resident=True``, copied whole into torch memory chunk by chunk (the CUDA fill,
      without pinning: how the tests hold it).

    The host then holds one staging chunk (or one block) beyond the pairs."""

    def __init__(self, embeddings, dev, dtype=None, *, resident: bool | None = None) -> None:
        import torch

        self.torch = torch
        self.embeddings = embeddings
        self.dev = dev
        self.dtype = dtype or torch.float32
        self.transfers = Transfers()
        self.whole = None
        self.staging = None
        self.copied = None  # the event after which the staging buffer is free again
        self.largest_read = 0  # rows in the largest single read of ``embeddings``
        n, d = embeddings.shape
        self.chunk = max(1, STAGING_BYTES // (4 * max(1, d)))
        if dev.type == "cpu":
            plain = _in_memory_rows(embeddings)
            if plain is not None:
                self.whole = plain.to(self.dtype)  # a view when it is float32 already
            elif resident:
                self.whole = torch.empty((n, d), dtype=self.dtype)
                self._fill(self.whole, 0, n)
        else:
            if resident is None:
                need = n * d * self.dtype.itemsize
                resident = need <= RESIDENT_SHARE * (device_free_memory(dev) or 0)
            if resident and is_tensor(embeddings):
                self.whole = embeddings.to(dev, self.dtype)
            elif resident:
                self.whole = torch.empty((n, d), dtype=self.dtype, device=dev)
                self._fill(self.whole, 0, n)
        self.cache: dict[bool, tuple[tuple[int, int], object]] = {}

    def _read(self, a: int, b: int):
        """Rows ``a:b`` from the source, as a CPU float32 array or tensor."""
        self.largest_read = max(self.largest_read, b - a)
        rows = self.embeddings[a:b]
        if is_tensor(rows):
            return rows
        return self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))

    def _fill(self, dst, a: int, b: int) -> None:
        """Rows ``a:b`` into the device tensor ``dst`` (``b - a`` rows), a staging chunk
        at a time: the pinned buffer is refilled once the previous copy from it is done."""
        torch = self.torch
        if self.staging is None:
            d = self.embeddings.shape[1]
            pin = self.dev.type == "cuda"
            self.staging = torch.empty((self.chunk, d), dtype=torch.float32, pin_memory=pin)
        for k in range(a, b, self.chunk):
            stop = min(b, k + self.chunk)
            if self.copied is not None:
                self.copied.synchronize()
                self.transfers.synced()
            part = self.staging[: stop - k]
            part.copy_(self._read(k, stop))
            self.transfers.to_device(dst[k - a : stop - a], part, non_blocking=True)
            if self.dev.type == "cuda":
                self.copied = torch.cuda.Event()
                self.copied.record(torch.cuda.current_stream(self.dev))

    def block(self, a: int, b: int, second: bool = False):
        """Rows ``a:b`` on the device; streamed rows keep the last row block and the last
        column block."""
        if self.whole is not None:
            return self.whole[a:b]
        key, t = self.cache.get(second, (None, None))
        if key != (a, b):
            self.cache.pop(second, None)  # free the old block before reading the new
            if self.dev.type == "cpu":
                t = self._read(a, b).to(self.dtype)
            else:
                t = self.torch.empty(
                    (b - a, self.embeddings.shape[1]), dtype=self.dtype, device=self.dev
                )
                self._fill(t, a, b)
            self.cache[second] = ((a, b), t)
        return t


def _in_memory_rows(embeddings):
    """``embeddings`` as a CPU tensor when they are in memory already (a torch tensor,
    or an in-memory numpy array of any float dtype: zero-copy when float32), else None
    (a store, a memmap, rows rounded as read: read in chunks)."""
    import torch

    if is_tensor(embeddings):
        return embeddings
    if isinstance(embeddings, np.ndarray) and not isinstance(embeddings, np.memmap):
        if embeddings.dtype != np.float32:  # float64 input: float32 rows (the stored ones)
            embeddings = embeddings.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(embeddings))
    return None
