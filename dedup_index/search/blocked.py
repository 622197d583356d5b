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
own single-threaded GEMMs (:func:`blas_one_thread`) and scanning its own tiles in one
compiled pass (:class:`_Worker`, :mod:`.scan`: numba, GIL released), which is what makes
the search run near the machine's GEMM rate (``bench/bench_exact.py``).  A bf16 tile
stays bf16: the scan reads its bits and widens them in registers.

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
import threading

import numpy as np

from ..validation import worker_count
from .canonical import candidate_delta, canonical_scores
from .pairs import PairSet, rescore_candidates
from .precision import Arithmetic, arithmetic, is_tensor
from .tiles import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    NearBest,
    NumpyTiles,
    canonical_maxima,
    fold_best,
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
    workers = 1 if use_torch else worker_count(threads)
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
            best_later, best_earlier = _search_numpy(
                source, rows_per, cols_per, radius, window, workers, emit, arith, embeddings
            )
    del source
    pairs = rescore_candidates(embeddings, candidates, threshold) if sink is None else sink.finish()
    if use_torch:
        best_later, best_earlier = canonical_maxima(embeddings, later, earlier)
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


def _search_numpy(embeddings, rows_per, cols_per, radius, delta, workers, emit, arith, stored):
    """The CPU tile loop: row blocks handed out in order to ``workers`` threads (the
    caller's among them), each a :class:`_Worker`; returns the canonical ``(best later,
    best earlier)`` per row (float64, ``-inf`` where none), rescored from ``stored`` (the
    stored float32 rows; ``embeddings`` are the rows the tiles multiply).

    The maxima are folded as they become final, not all at the end (bounded memory: at
    1M rows the near-best entries held to the end took most of a 9.6 GiB peak): a row
    block's own rows have met every later column when the block is done, so its row
    entries are folded at once (:func:`~.tiles.fold_best`); a column's entries come from
    the blocks at or before it, so they wait in :class:`_Columns` until every such block
    is done.  Each row's (column's) fold sees all its entries, so the bits are those of
    one fold at the end, whatever the scheduling."""
    n = embeddings.shape[0]
    later32 = np.full(n, -np.inf, dtype=np.float32)  # rows' running float32 maxima
    best_later = np.full(n, -np.inf)
    best_earlier = np.full(n, -np.inf)
    starts = list(range(0, n, rows_per))
    crew = [
        _Worker(embeddings, rows_per, cols_per, radius, delta, later32, arith)
        for _ in range(workers)
    ]
    if n >= SEED_FROM:
        seed = column_seed(stored, min(SEED_ROWS, n), arith.margin)
        for worker in crew:
            np.maximum(worker.col_best, seed, out=worker.col_best)
    columns = _Columns(n, starts, crew, np.float32(delta), stored, best_earlier)
    trim = HeapTrim()
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
                lat, ear = worker.block(a, min(n, a + rows_per), emit)
                # Rows a:b have met every later column: final, folded now (disjoint rows:
                # no other thread writes these entries of best_later).
                fold_best(stored, lat, later32, delta, best_later)
                del lat
                columns.add(k, ear)
                del ear
                trim.maybe()
        except BaseException:
            failed.set()
            raise

    if workers == 1:
        run(crew[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with blas_one_thread(), ThreadPoolExecutor(workers - 1) as pool:
            jobs = [pool.submit(run, w) for w in crew[1:]]
            try:
                run(crew[0])
            finally:
                for job in jobs:
                    job.result()
    columns.finish(workers)
    return best_later, best_earlier


#: Searches of at least this many rows start the columns' running maxima from
#: :func:`column_seed` over the first :data:`SEED_ROWS` rows.
SEED_FROM = 1 << 16
SEED_ROWS = 1024


def column_seed(stored, rows: int, margin: float) -> np.ndarray:
    """Per column ``j``, a float32 value at most its final tile maximum over the earlier
    rows, from the first ``rows`` rows (``-inf`` for the columns among them).

    Why: the columns' running maxima start at ``-inf``, so the first row blocks gather
    near-best entries for every column (15M column entries a block at 1M rows, most of
    a 2.9 GiB early peak).  Started from this seed, a column gathers only entries that
    may still be near its maximum.  The seed is a lower bound: for the sample row ``i``
    with the best float32 product ``f`` (error ``<= candidate_delta`` from the canonical
    score ``c``), the tile value is ``>= c - B >= f - candidate_delta - margin``
    (``B < margin``), rounded down to float32.  A lower bound only raises the gather
    bounds towards the final ones: the same survivors and bits."""
    n, d = stored.shape
    seed = np.full(n, -np.inf, dtype=np.float32)
    if rows >= n:
        return seed
    sample = np.ascontiguousarray(stored[:rows], dtype=np.float32)
    step = max(1, (16 << 20) // (4 * max(1, d)))
    below = candidate_delta(d) + float(margin)
    for a in range(rows, n, step):
        cols = np.ascontiguousarray(stored[a : a + step], dtype=np.float32)
        best = (sample @ cols.T).max(axis=0).astype(np.float64) - below
        low = best.astype(np.float32)
        seed[a : a + cols.shape[0]] = np.where(
            low > best, np.nextafter(low, np.float32(-np.inf)), low
        )
    return seed


class HeapTrim:
    """Hands the C heap's free pages back to the OS (glibc ``malloc_trim``) at most every
    :data:`TRIM_EVERY_S` seconds: a no-op where there is no glibc.

    Why: the tile loop allocates and frees blocks of rows, tiles' gathers and entry
    arrays of a few to tens of MiB over and over from several threads.  glibc raises its
    mmap threshold each time such a block is freed, so later ones come from the heap
    arenas, whose freed pages it keeps: the RSS of a 100k-row search from a store grew
    to 1.0 GiB of anonymous memory this way, against 0.5 GiB with the threshold pinned
    (``MALLOC_MMAP_THRESHOLD_``).  Trimming gets it back without touching any process
    setting."""

    def __init__(self) -> None:
        self.last = 0.0
        self.trim = _malloc_trim()

    def maybe(self) -> None:
        import time

        if self.trim is None:
            return
        now = time.monotonic()
        if now - self.last >= TRIM_EVERY_S:
            self.last = now
            self.trim(0)


#: Seconds between two heap trims of :class:`HeapTrim` (one costs about a millisecond).
TRIM_EVERY_S = 1.0


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or no ctypes)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError, ImportError):
        return None


#: :class:`_Columns` merges its newly added entries into the pending ones once they are
#: at least this many (and at least as many as the pending ones: amortised linear work).
MERGE_ENTRIES = 1 << 20
#: Pending column entries kept after a merge, at most: above it the merge folds every
#: column, final or not (memory bounded whatever ``N``; ~12 bytes an entry).
PENDING_ENTRIES = 1 << 22


class _Columns:
    """Column (best-earlier) near-best entries of finished row blocks, held until their
    columns are final, then folded canonically into ``out``.

    Column ``j`` gets entries only from the row blocks starting at or before ``j``, so
    once the leading blocks ``0..k-1`` are done, every column below ``starts[k]`` is
    final: its float32 maximum is the maximum over the workers' ``col_best``, and all its
    entries are here.  Blocks finish out of order: newly added entries wait in ``new``;
    when they outnumber the pending ones (and :data:`MERGE_ENTRIES`), one thread merges
    them, prunes the lot against the columns' running maxima (lower bounds of the final
    ones: :func:`~.tiles.prune_near` drops only what the final filter drops), folds the
    final columns and keeps the rest, indices as int32 when ``n`` allows (12 bytes an
    entry).  Held entries: those within ``delta`` of a column's running maximum, at most
    :data:`PENDING_ENTRIES` of them (beyond it every column is folded at once), plus at
    most ``max(MERGE_ENTRIES, pending)`` not yet merged."""

    def __init__(self, n, starts, crew, delta, stored, out) -> None:
        self.n = n
        self.starts = starts
        self.crew = crew
        self.delta = delta
        self.stored = stored
        self.out = out
        self.index = np.int32 if n < 2**31 else np.int64
        self.lock = threading.Lock()
        self.new: list = []
        self.new_size = 0
        self.pending: list = []
        self.pending_size = 0
        self.done = np.zeros(len(starts), dtype=bool)
        self.frontier = 0  # the leading blocks 0..frontier-1 are done
        self.merging = False

    def add(self, k: int, ear: list) -> None:
        """Block ``k`` is done; ``ear``: its column entries ``[(col, row, value), ...]``."""
        with self.lock:
            self.new.extend(ear)
            self.new_size += sum(e[0].shape[0] for e in ear)
            self.done[k] = True
            while self.frontier < len(self.starts) and self.done[self.frontier]:
                self.frontier += 1
            if self.merging or self.new_size < max(MERGE_ENTRIES, self.pending_size):
                return
            self.merging = True
            work = self.pending + self.new
            self.new, self.new_size, self.pending = [], 0, []
            limit = self._limit()
        kept: list = []
        try:
            kept = self._merge(work, limit)
        finally:
            with self.lock:
                self.pending = kept
                self.pending_size = sum(e[0].shape[0] for e in kept)
                self.merging = False

    def finish(self, workers: int = 1) -> None:
        """Every block is done: fold every column still held."""
        work = self.pending + self.new
        self.pending, self.new = [], []
        self._merge(work, self.n, workers)

    def _limit(self) -> int:
        return self.starts[self.frontier] if self.frontier < len(self.starts) else self.n

    def _merge(self, work: list, limit: int, workers: int = 1) -> list:
        """Prune ``work`` against the columns' running maxima, fold the columns below
        ``limit`` (final), return the rest as one int32-indexed entry list."""
        bound = self.crew[0].col_best.copy()
        for worker in self.crew[1:]:  # each worker's maxima only grow: a lower bound
            np.maximum(bound, worker.col_best, out=bound)
        kept = prune_near(work, bound, self.delta)
        del work
        if not kept:
            return []
        cols, rows, vals = kept[0]
        # Over the cap, every column is folded now, final or not: a column's canonical
        # best is the max over its entries in any batches (each batch's cuts use real
        # pair scores, lower bounds of the column's best), and the entry holding it
        # survives every prune against lower bounds; folding early only rescores some
        # entries a later, higher running maximum would have pruned.
        final = cols < (limit if cols.shape[0] <= PENDING_ENTRIES else self.n)
        if final.any():
            entries = [(cols[final], rows[final], vals[final])]
            fold_best(self.stored, entries, bound, self.delta, self.out, workers=workers)
            del entries
            keep = ~final
            cols, rows, vals = cols[keep], rows[keep], vals[keep]
        if not cols.shape[0]:
            return []
        return [(cols.astype(self.index), rows.astype(self.index), vals)]


class _Worker:
    """One CPU worker: GEMM tiles of its row blocks, each scanned by the fused kernel.

    Scanning a 64 MiB tile the plain way (row maxima, column maxima, the threshold test,
    the near-best gathers: :class:`NumpyTiles`) takes five or six passes over main
    memory.  Here each tile goes through :class:`~.scan.TileScan` (one compiled pass, a
    row at a time while it is in cache, GIL released: the workers scan in parallel), by
    the worker that computed it.  A tile narrower than the block computes on the
    diagonal only the rows that have a later column in it.

    The near-best gathers use running lower bounds, not the tile's final maxima: a row's
    bound is its maximum so far (earlier tiles and this row of this tile), a column's is
    its maximum over this worker's rows so far (``col_best``; the workers' arrays are
    merged at the end).  Every entry within ``delta`` of the final maximum is within
    ``delta`` of any lower bound, so it is gathered; the extra entries are dropped by
    :meth:`NearBest.survivors`, which filters on the final maximum.  Same survivors,
    same bits.  Rows of a block belong to one worker, so ``later_best`` is written
    race-free.
    """

    def __init__(self, embeddings, rows_per, cols_per, radius, delta, later_best, arith) -> None:
        from .scan import TileScan

        self.tiles = NumpyTiles(embeddings, rows_per, cols_per, arith)
        self.n = embeddings.shape[0]
        self.cols_per = cols_per
        self.radius = np.float32(radius)
        self.delta = np.float32(delta)
        self.later_best = later_best
        self.col_best = np.full(self.n, -np.inf, dtype=np.float32)
        self.scan = TileScan(cols_per)
        # oneDNN's bf16 GEMM writes bf16: the tile stays bf16 (half the bytes) and the
        # scan reads its bits, widened in registers.
        self.raw = arith is not None and arith.kernel == "onednn"
        if self.raw:
            import torch

            self.torch = torch
            self.tile16 = torch.empty(rows_per * cols_per, dtype=torch.bfloat16)

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
            self.scan.scan(
                s,
                radius=self.radius,
                delta=self.delta,
                row_best=self.later_best[a : a + m],
                col_best=self.col_best[c:e],
                diag=a - c,  # columns c + k <= a + r: the row itself and earlier rows
                row0=a,
                col0=c,
            )
            found, near, far = self.scan.take()
            if found is not None:
                emit(found)
            if near is not None:
                lat.append(near)
            if far is not None:
                ear.append(far)
        # The block's rows have met every later column: the caller folds their entries
        # at once (fold_best prunes them against the final maxima itself); columns keep
        # what their running maxima allow until they are final.
        return lat, prune_near(ear, self.col_best, self.delta)


@contextlib.contextmanager
def blas_one_thread():
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
