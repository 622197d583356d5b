"""Exact search of new rows (queries) against a base of rows: the incremental step.

``cross_search(queries, base, threshold)`` tiles ``queries @ base.T`` with the ``blocked``
backend's tile machinery (:mod:`.tiles`: numpy GEMM tiles, canonical rescoring of
candidates at ``threshold - delta``) and returns, in one pass, the pairs at or above the
threshold, each query's best base row and each base row's best query.  With the queries'
own ``blocked`` search this gives exactly what a one-shot search of ``base + queries``
gives for every pair involving a query, and the update every old row's nearest neighbour
needs.  ``precision`` picks the tile arithmetic (:mod:`.precision`); the results are the
same bits whichever runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .canonical import canonical_scores
from .precision import Arithmetic, arithmetic
from .tiles import DEFAULT_COLS, DEFAULT_ROWS, NearBest, NumpyTiles, canonical_best


@dataclass(frozen=True)
class CrossResult:
    """Pairs ``(query q, base row b, s)`` with canonical ``s >= threshold`` (sorted by
    ``(b, q)``), each query's canonical best base score and each base row's canonical
    best query score (``-inf`` where none)."""

    q: np.ndarray
    b: np.ndarray
    s: np.ndarray
    query_best: np.ndarray
    base_best: np.ndarray


def cross_search(
    queries: np.ndarray,
    base,
    threshold: float,
    *,
    rows: int | None = None,
    cols: int | None = None,
    base_live: np.ndarray | None = None,
    base_best: bool = True,
    base_floor: np.ndarray | None = None,
    precision: str | Arithmetic = "auto",
    device: str | None = None,
    engine: str | None = None,
) -> CrossResult:
    """All ``(q, b)`` with ``s >= threshold``, and best scores both ways (exact).

    ``base_live`` (bool per base row) leaves out the base rows marked False, as if they
    were not there: the index's removed keys.  ``base_best=False`` skips the base rows'
    best scores (a read-only query needs only the pairs).  ``precision``: the tile
    arithmetic (:data:`~.precision.PRECISIONS`; ``auto`` weighs the ``m n D``
    multiply-adds).  ``base_floor`` (per base row, a score it already has: the index's
    nearest so far) asks for a base row's best only where a query may beat it:
    ``base_best`` is ``-inf`` elsewhere, and the near-best gathers and canonical
    rescorings of the rows it cannot change (most of them, for a batch) are skipped.
    ``device``: ``"cuda"`` (or ``"cuda:N"``) runs the tiles in torch on that GPU, the
    ``blocked`` backend's device tile loop (:class:`~.blocked.TorchTiles`, rows through
    :class:`~.blocked.DeviceRows`); the CPU path is numpy unless ``engine="torch"`` (the
    GPU code on the CPU: how the tests hold it).  The device is taken as given: callers
    resolve it once (:func:`~dedup_index.validation.resolve_device`).  ``rows``/``cols``:
    the tile (default: :data:`~.tiles.DEFAULT_ROWS` x :data:`~.tiles.DEFAULT_COLS`; on a
    GPU :func:`~.blocked.gpu_tile` of its free memory).  Same bits on every path."""
    m, d = queries.shape
    n = base.shape[0]
    empty = np.zeros(0, np.int64)
    if m == 0 or n == 0:
        return CrossResult(empty, empty, np.zeros(0), np.full(m, -np.inf), np.full(n, -np.inf))
    use_torch = engine == "torch" or device not in (None, "cpu")
    arith = (
        precision
        if isinstance(precision, Arithmetic)
        else arithmetic(precision, d, device=device, engine=engine, work=float(m) * n * d)
    )
    # The rows the GEMMs see: queries rounded once, base rows rounded as each column
    # block is read (a large base is not copied for a few queries).
    q_rows, arith = arith.prepare(queries)
    b_rows, arith = arith.prepare(_Unmeasured(base) if arith.rounds else base)
    delta = arith.window
    radius = np.float32(threshold - arith.margin)
    q_near = NearBest(m, delta)
    b_near = NearBest(n, delta, floor=base_floor)
    found_q: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    if use_torch:
        with arith.session(torch_tiles=True):
            _cross_torch(
                q_rows,
                b_rows,
                (rows, cols),
                radius,
                device or "cpu",
                arith,
                base_live,
                base_floor,
                base_best,
                q_near,
                b_near,
                found_q,
                found_b,
            )
    else:
        rows = DEFAULT_ROWS if rows is None else rows
        cols = DEFAULT_COLS if cols is None else cols
        rows, cols = min(rows, m), min(cols, n)  # a single query: a 1 x n tile, not more
        _cross_tiles(
            q_rows,
            b_rows,
            arith,
            m,
            n,
            rows,
            cols,
            radius,
            base_live,
            base_best,
            q_near,
            b_near,
            found_q,
            found_b,
        )
    q = np.concatenate(found_q) if found_q else empty
    b = np.concatenate(found_b) if found_b else empty
    return cross_result(queries, base, threshold, q, b, q_near, b_near)


class _Unmeasured:
    """A base read block by block (rounded as read): no whole rounded copy of it."""

    def __init__(self, rows) -> None:
        self.rows = rows
        self.shape = rows.shape

    def __getitem__(self, key):
        return self.rows[key]


#: The CPU cross search uses one worker per core only when it has at least this many
#: multiply-adds per worker (a single query's tile is not worth a thread).
THREADED_WORK = 2e8
#: Below this many multiply-adds (~0.1 s of float32 GEMM) a cross search in a process that
#: has not loaded the compiled scan yet uses numpy's tile operations instead: starting
#: numba (import, loading the cached kernel) costs 0.3-1 s, a one-image query ~1 ms.
SCAN_MIN_WORK = 2e10


def _cross_tiles(
    q_rows,
    b_rows,
    arith,
    m,
    n,
    rows,
    cols,
    radius,
    base_live,
    base_best,
    q_near,
    b_near,
    found_q,
    found_b,
):
    """The CPU tile loop of :func:`cross_search`: the ``(query block, base block)`` tiles
    handed out in order to one worker per core (each with its own single-threaded GEMM,
    its own buffers and its own running maxima, merged at the end: :class:`_CrossWorker`),
    or run in this thread for a small search."""
    import sys

    from .blocked import blas_one_thread, worker_count

    d = q_rows.shape[1]
    if float(m) * n * d < SCAN_MIN_WORK and "dedup_index.search.scan" not in sys.modules:
        with arith.session():
            _cross_numpy(
                q_rows,
                b_rows,
                arith,
                m,
                n,
                rows,
                cols,
                radius,
                base_live,
                base_best,
                q_near,
                b_near,
                found_q,
                found_b,
            )
        return
    tasks = [(a, c) for a in range(0, m, rows) for c in range(0, n, cols)]
    workers = min(worker_count(None), len(tasks), max(1, int(float(m) * n * d // THREADED_WORK)))
    args = (q_rows, b_rows, arith, m, n, rows, cols, radius, base_live, base_best, q_near, b_near)
    crew = [_CrossWorker(*args) for _ in range(workers)]
    if workers == 1:
        with arith.session():
            crew[0].run(iter(tasks))
    else:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        lock = threading.Lock()
        todo = iter(tasks)

        def next_task():
            with lock:
                return next(todo, None)

        with arith.session(one_thread=True), blas_one_thread():
            with ThreadPoolExecutor(workers - 1) as pool:
                jobs = [pool.submit(w.run, next_task) for w in crew[1:]]
                try:
                    crew[0].run(next_task)
                finally:
                    for job in jobs:
                        job.result()
    for w in crew:  # merged in worker order; nothing downstream depends on the order
        np.maximum(q_near.best, w.q_best, out=q_near.best)
        found_q.extend(w.found_q)
        found_b.extend(w.found_b)
        q_near.rows.extend(w.q_lists[0])
        q_near.cols.extend(w.q_lists[1])
        q_near.vals.extend(w.q_lists[2])
        if base_best:
            np.maximum(b_near.best, w.b_best, out=b_near.best)
            b_near.rows.extend(w.b_lists[0])
            b_near.cols.extend(w.b_lists[1])
            b_near.vals.extend(w.b_lists[2])


def _cross_numpy(
    q_rows,
    b_rows,
    arith,
    m,
    n,
    rows,
    cols,
    radius,
    base_live,
    base_best,
    q_near,
    b_near,
    found_q,
    found_b,
):
    """The small-search tile loop: :class:`~.tiles.NumpyTiles`'s maxima, threshold test
    and gathers into :meth:`~.tiles.NearBest.update` (the same candidates and survivors
    as the compiled scan: tested to give the same bits)."""
    from functools import partial

    q_tiles = NumpyTiles(q_rows, rows, cols, arith)
    b_tiles = NumpyTiles(b_rows, rows, cols, arith)
    for a in range(0, m, rows):
        e_a = min(m, a + rows)
        qa = q_tiles.block(a, e_a, second=False)
        for c in range(0, n, cols):
            e_c = min(n, c + cols)
            s = q_tiles.product(qa, b_tiles.block(c, e_c, second=True))
            if base_live is not None and not base_live[c:e_c].all():
                s[:, ~base_live[c:e_c]] = -np.inf
            row_max, col_max = q_tiles.maxima(s)
            hit = np.flatnonzero(row_max > radius)
            if hit.size:
                li, lj = q_tiles.above(s, hit, radius)
                found_q.append(hit[li] + a)
                found_b.append(lj + c)
            q_near.update(np.arange(a, e_a), row_max, partial(q_tiles.gather, s, c, False))
            if base_best:
                b_near.update(np.arange(c, e_c), col_max, partial(q_tiles.gather, s, a, True))


class _CrossWorker:
    """One worker of the CPU cross search: tiles scanned in one compiled pass each
    (:class:`~.scan.TileScan`: candidates, the queries' and the base rows' running maxima
    and near-best entries, gathered against running lower bounds as
    :class:`~.tiles.NearBest` keeps them).  Its running maxima start from the trackers'
    (``base_floor`` included) and are its own: each is a lower bound of the final maximum,
    so every entry :meth:`~.tiles.NearBest.survivors` keeps is gathered, and the
    survivors (filtered on the merged maxima) are the same bits.  A bf16 GEMM (oneDNN)
    writes a bf16 tile that is scanned as it is."""

    def __init__(
        self, q_rows, b_rows, arith, m, n, rows, cols, radius, base_live, base_best, q_near, b_near
    ) -> None:
        from .scan import TileScan

        self.q_tiles = NumpyTiles(q_rows, rows, cols, arith)
        self.b_tiles = NumpyTiles(b_rows, rows, cols, arith)
        self.scan = TileScan(cols)
        self.m, self.n, self.rows, self.cols = m, n, rows, cols
        self.radius = radius
        self.delta = q_near.delta
        self.base_live = base_live
        self.base_best = base_best
        self.q_best = q_near.best.copy()
        self.b_best = b_near.best.copy() if base_best else None
        self.found_q: list[np.ndarray] = []
        self.found_b: list[np.ndarray] = []
        self.q_lists: tuple[list, list, list] = ([], [], [])
        self.b_lists: tuple[list, list, list] = ([], [], [])
        self.tile16 = None
        if arith is not None and arith.kernel == "onednn":
            import torch

            self.torch = torch
            self.tile16 = torch.empty(rows * cols, dtype=torch.bfloat16)

    def run(self, next_task) -> None:
        """Tiles ``(a, c)`` from ``next_task()`` (an iterator's ``__next__`` or a callable
        returning None when done)."""
        if not callable(next_task):
            todo = next_task

            def next_task():
                return next(todo, None)

        last_a, qa = None, None
        while (task := next_task()) is not None:
            a, c = task
            e_a, e_c = min(self.m, a + self.rows), min(self.n, c + self.cols)
            if a != last_a:
                qa, last_a = self.q_tiles.block(a, e_a, second=False), a
            block = self.b_tiles.block(c, e_c, second=True)
            if self.tile16 is not None:
                out = self.tile16[: (e_a - a) * (e_c - c)].view(e_a - a, e_c - c)
                s = self.torch.mm(qa, block.T, out=out)
            else:
                s = self.q_tiles.product(qa, block)
            live = self.base_live
            if live is not None and not live[c:e_c].all():
                gone = np.flatnonzero(~live[c:e_c])
                if self.tile16 is not None:
                    gone = self.torch.from_numpy(gone)
                s[:, gone] = -np.inf  # left out: as if absent
            self.scan.scan(
                s,
                radius=self.radius,
                delta=self.delta,
                row_best=self.q_best[a:e_a],
                col_best=self.b_best[c:e_c] if self.base_best else None,
                row0=a,
                col0=c,
            )
            found, near, far = self.scan.take()
            if found is not None:
                self.found_q.append(found[0])
                self.found_b.append(found[1])
            for lists, got in ((self.q_lists, near), (self.b_lists, far)):
                if got is not None:
                    for part, arr in zip(lists, got, strict=True):
                        part.append(arr)


def _cross_torch(
    q_rows,
    b_rows,
    tile,
    radius,
    device,
    arith,
    base_live,
    base_floor,
    base_best,
    q_near,
    b_near,
    found_q,
    found_b,
):
    """The torch tile loop of :func:`cross_search`: query blocks against base blocks,
    each tile by :class:`~.blocked.TorchTiles` (the ``blocked`` device tiles, rectangular
    here), the rows on the device through :class:`~.blocked.DeviceRows` (a store base is
    streamed in chunks or made resident by free device memory); the running maxima come
    back once, into ``q_near.best``/``b_near.best``."""
    import torch

    from .blocked import DeviceRows, TorchTiles, device_free_memory, gpu_tile

    m, n = q_rows.shape[0], b_rows.shape[0]
    dev = torch.device(device)
    dtype = arith.torch_dtype()
    q_dev = DeviceRows(q_rows, dev, dtype)
    b_dev = DeviceRows(b_rows, dev, dtype)
    rows, cols = tile
    if rows is None or cols is None:
        if dev.type == "cpu":
            auto = (DEFAULT_ROWS, DEFAULT_COLS)
        else:  # sized from what the resident rows left free
            auto = gpu_tile(max(m, n), device_free_memory(dev))
        rows = auto[0] if rows is None else rows
        cols = auto[1] if cols is None else cols
    rows, cols = min(rows, m), min(cols, n)
    ops = TorchTiles(
        q_dev,
        m,
        rows,
        cols,
        radius,
        q_near.delta,
        None,
        arith,
        n_cols=n,
        col_floor=base_floor,
        square=False,
        columns=base_best,
    )
    dead = None
    if base_live is not None and not base_live.all():
        dead = torch.from_numpy(~np.asarray(base_live, dtype=bool)).to(dev)

    def emit(found: tuple[np.ndarray, np.ndarray]) -> None:
        found_q.append(found[0])
        found_b.append(found[1])

    for a in range(0, m, rows):
        rows_a = q_dev.block(a, min(m, a + rows), second=False)
        for c in range(0, n, cols):
            e_c = min(n, c + cols)
            gone = None
            if dead is not None and not base_live[c:e_c].all():
                gone = dead[c:e_c]
            block = b_dev.block(c, e_c, second=True)
            ops.tile(rows_a, block, a, c, emit, q_near, b_near if base_best else None, gone)
    q_near.best, best_col = ops.maxima()
    if base_best:
        b_near.best = best_col


def cross_result(
    queries, base, threshold: float, q: np.ndarray, b: np.ndarray, q_near, b_near
) -> CrossResult:
    """The one assembly of a cross search (tiles here, FAISS in ``flat``): candidates
    ``(q, b)`` rescored canonically, those ``>= threshold`` sorted by ``(b, q)``, and the
    canonical best scores from the :class:`~.tiles.NearBest` trackers (``b_near=None``:
    base rows' bests not wanted, all -inf)."""
    scores = canonical_scores(queries, q, b, other=base)
    keep = scores >= threshold
    q, b, scores = q[keep], b[keep], scores[keep]
    order = np.lexsort((q, b))
    return CrossResult(
        q[order],
        b[order],
        scores[order],
        canonical_best(queries, base, q_near),
        canonical_best(base, queries, b_near)
        if b_near is not None
        else np.full(base.shape[0], -np.inf),
    )
