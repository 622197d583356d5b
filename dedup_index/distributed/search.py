"""The ``ray`` backend: the exact upper-triangle tile search as Ray tasks, merged on the driver.

The rows (an :class:`~dedup_index.store.EmbeddingStore` on shared storage, or an array
put into the object store block by block) are cut into blocks of ``tile_rows``; each tile
``(a, c)``, ``a <= c``, is one Ray task that reads its two blocks, computes the GEMM tile,
rescores its candidates canonically and writes its pairs and partial row/column maxima to
``work_dir/tiles/<a>_<c>.npz`` atomically (:mod:`.tiles`).  The driver submits the tiles
whose files do not exist yet and merges every tile exactly once (union of pairs,
elementwise maxima): :func:`ray_search`, registered as the backend ``"ray"`` in
:mod:`dedup_index.search.backends`.  Policies and the result are
:func:`~dedup_index.dedup_embeddings`'s, as for every backend: :func:`dedup_store` is
``dedup_embeddings(E, t, backend="ray", backend_options=...)`` with Ray's options spelled
out.

The result equals ``dedup_embeddings(E, threshold, backend="blocked")`` bit for bit:
keep mask, ``duplicate_of``, groups, pairs, ``max_similarity`` and
``max_earlier_similarity`` (see :mod:`.tiles` for why the maxima are exact).

Fault tolerance: a task whose worker dies is retried by Ray (``max_retries``); since a
tile's file appears only complete (temp file + rename) and a tile is merged from its file
once, a retried or re-executed task neither loses nor duplicates pairs.  Rerunning with
the same ``work_dir`` after a crash of the driver recomputes only the missing tiles.

Cost: ``T = B (B + 1) / 2`` tasks for ``B = ceil(N / b)`` blocks, each ``b^2 D``
multiply-adds, so ``~N^2 D / (2 W)`` per worker on ``W`` workers, plus reading
``2 b D`` floats per task (``~N^2 D / b`` floats in all: larger tiles read less).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..dedup import DedupResult, dedup_embeddings
from ..search import SearchResult
from ..search.precision import check_precision
from ..store import EmbeddingStore, PairSink
from ..store.pairs_file import DEFAULT_MEMORY_BUDGET
from ..validation import check_choice, check_positive_int
from . import tiles as tl
from .cluster import cluster_cpus, connect

logger = logging.getLogger(__name__)

#: Largest default tile side: a 4096 x 4096 float32 tile is 64 MiB per task.
MAX_TILE_ROWS = 4096
#: Smallest default tile side (smaller tiles are all overhead).
MIN_TILE_ROWS = 256


def choose_tile_rows(n: int, workers: int) -> int:
    """Default block size: about 8 tiles per worker (load balance), within
    [:data:`MIN_TILE_ROWS`, :data:`MAX_TILE_ROWS`], a multiple of 64."""
    # T ~ (n / b)^2 / 2 tiles; aim for T ~ 8 W  ->  b ~ n / sqrt(16 W)
    b = n / max(1.0, (16 * workers) ** 0.5)
    b = int(-(-b // 64)) * 64
    return int(min(MAX_TILE_ROWS, max(MIN_TILE_ROWS, b)))


def dedup_store(
    embeddings: Any,
    threshold: float = 0.9,
    *,
    policy: str = "reference",
    score: str = "nearest",
    tile_rows: int | None = None,
    address: str | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    threads_per_task: int = 1,
    max_retries: int = 3,
    normalize: bool = True,
    pairs_memory_budget: int = DEFAULT_MEMORY_BUDGET,
    pairs_path: str | os.PathLike | None = None,
    precision: str = "auto",
    device: str | None = None,
    gpus_per_task: float | None = None,
) -> DedupResult:
    """Exact near-duplicate search on a Ray cluster; same result as one machine's ``blocked``.

    ``dedup_embeddings(embeddings, threshold, backend="ray", backend_options={...})``
    with the options of the ``ray`` backend (:func:`ray_search`) as arguments.

    Args:
        embeddings: an :class:`~dedup_index.store.EmbeddingStore`, its directory (which
            every node must see at the same path: shared storage), or an ``(N, D)`` array
            (normalised like ``dedup_embeddings`` and put into the object store in blocks).
        threshold, policy, score, normalize: as in :func:`~dedup_index.dedup_embeddings`.
        tile_rows: rows per block (a task is one block against another); default from N
            and the cluster's CPUs (:func:`choose_tile_rows`).
        address: Ray cluster to use (see :func:`~dedup_index.distributed.connect`); an
            already initialised Ray is used as it is.
        work_dir: where tile outputs go (every node must see it: shared storage).  A rerun
            with the same ``work_dir`` skips the tiles already there.  Default: a temporary
            directory on the driver, removed at the end (fine for a one-machine cluster).
        progress: a rows/s progress bar of the search (None: when stderr is a terminal).
        threads_per_task: CPUs (and BLAS threads) per task.
        max_retries: how often Ray retries a task whose worker died.
        pairs_memory_budget, pairs_path: as in ``dedup_embeddings`` (pairs spill to Parquet).
        precision: the tiles' candidate arithmetic, as in ``dedup_embeddings`` (``auto``
            is resolved by each task on its node; the results are the same bits).
        device: None or ``"cpu"`` (numpy tiles on the workers' CPUs), ``"cuda"`` or
            ``"cuda:N"`` (each task computes its tile on the GPU Ray assigned it; a cluster
            without GPUs warns and runs on its CPUs), as in :func:`ray_search`.
        gpus_per_task: GPUs per tile task with a CUDA device (default 1; fractions share).

    ``result.backend`` is ``"ray"``; ``result.info`` holds the tile counts.
    """
    return dedup_embeddings(
        embeddings,
        threshold,
        backend="ray",
        score=score,
        policy=policy,
        normalize=normalize,
        backend_options={
            "tile_rows": tile_rows,
            "address": address,
            "work_dir": work_dir,
            "threads_per_task": threads_per_task,
            "max_retries": max_retries,
            "gpus_per_task": gpus_per_task,
        },
        pairs_memory_budget=pairs_memory_budget,
        pairs_path=pairs_path,
        progress=progress,
        precision=precision,
        device=device,
    )


def ray_search(
    embeddings: Any,
    threshold: float,
    *,
    nearest: bool = True,
    threads: int | None = None,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    sink: Any = None,
    progress: Callable[[int], Any] | None = None,
) -> SearchResult:
    """The ``ray`` backend (:class:`~dedup_index.search.backends.SearchFunction`).

    ``embeddings``: unit float32 rows, an array or an
    :class:`~dedup_index.store.EmbeddingStore` (whose directory every node must see).
    ``options``: ``address``, ``work_dir``, ``tile_rows``, ``threads_per_task``,
    ``max_retries`` as in :func:`dedup_store`; ``gpus_per_task`` (GPUs Ray gives each
    tile task; default 1 with a CUDA ``device``, else 0; a fraction shares a GPU between
    tasks) and ``engine`` (``"torch"``: the GPU tile code on the workers' CPUs, how the
    tests hold it).  ``threads`` is not used (each task runs ``threads_per_task`` BLAS
    threads).  ``device``: None or ``"cpu"``, numpy tiles on the workers' CPUs;
    ``"cuda"`` (``"cuda:N"``: the N-th of each task's GPUs), each tile on the GPU Ray
    assigned its task (:func:`~dedup_index.distributed.embed.actor_device`), computed by
    the ``blocked`` backend's device tile code; CUDA asked for on a cluster without GPUs
    warns and runs on its CPUs (the rule of
    :func:`~dedup_index.validation.resolve_device`), a cluster with fewer GPUs than one
    task needs is an error at once (Ray would wait for ever).  The same bits on every
    device.  ``progress`` gets rows in proportion to the tiles done.  ``earlier`` is
    always computed, as by ``blocked``; ``info`` holds ``tile_rows``, ``work_dir``,
    ``device``, ``gpus_per_task`` and the counts ``tiles``, ``tiles_computed``,
    ``tiles_reused``.
    """
    options = dict(options or {})
    address = options.pop("address", None)
    work_dir = options.pop("work_dir", None)
    tile_rows = check_positive_int(options.pop("tile_rows", None), "tile_rows", allow_none=True)
    threads_per_task = check_positive_int(options.pop("threads_per_task", 1), "threads_per_task")
    max_retries = options.pop("max_retries", 3)
    precision = check_precision(options.pop("precision", "auto"))
    engine = check_choice(options.pop("engine", None), (None, "numpy", "torch"), "engine")
    gpus_per_task = options.pop("gpus_per_task", None)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0; got {max_retries!r}")
    if options:
        raise TypeError(f"backend 'ray' does not take the option(s) {sorted(options)}")
    device, gpus_per_task = check_task_device(device, gpus_per_task)
    if isinstance(embeddings, EmbeddingStore):
        unit, store_path = embeddings, str(Path(embeddings.path).resolve())
    else:
        unit = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings[:])
        store_path = None
    n, d = unit.shape
    sink = sink if sink is not None else PairSink()
    if n < 2:  # nothing to distribute
        if progress is not None:
            progress(n)
        return SearchResult(
            sink.finish(),
            np.zeros(n) if nearest else None,
            "ray",
            np.full(n, -np.inf),
            info={
                "tile_rows": tile_rows,
                "work_dir": None,
                "tiles": 0,
                "tiles_computed": 0,
                "tiles_reused": 0,
            },
        )
    ray = connect(address)
    device, gpus_per_task = _on_cluster(ray, device, gpus_per_task)
    if tile_rows is None:
        tile_rows = choose_tile_rows(n, max(1, cluster_cpus(ray) // threads_per_task))
    description = {
        "n": n,
        "d": d,
        "threshold": threshold,
        "tile_rows": tile_rows,
        "source": _fingerprint(unit, store_path),
    }
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="dedup-ray-")) if temporary else Path(work_dir)
    try:
        jid = tl.claim_job(work, description)
        best_later, best_earlier, counts = _run_tiles(
            ray,
            unit,
            store_path,
            threshold,
            tile_rows,
            work,
            jid,
            threads_per_task=threads_per_task,
            max_retries=max_retries,
            progress=progress,
            sink=sink,
            precision=precision,
            device=device,
            gpus_per_task=gpus_per_task,
            engine=engine,
        )
        pairs = sink.finish()
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    near = np.maximum(np.maximum(best_later, best_earlier), 0.0) if nearest else None
    return SearchResult(
        pairs,
        near,
        "ray",
        best_earlier,
        info={
            "tile_rows": tile_rows,
            "work_dir": None if temporary else str(work),
            "precision": {"precision": precision, "why": "resolved by each task on its node"},
            "device": device or "cpu",
            "gpus_per_task": gpus_per_task,
            **counts,
        },
    )


def check_task_device(device: Any, gpus_per_task: Any) -> tuple[str | None, float]:
    """``device`` and ``gpus_per_task`` of the tile tasks, checked before Ray starts:
    ``(device, gpus per task)``.  ``device``: None/``"cpu"`` or a CUDA device
    (``"cuda:N"``: the N-th of a task's own GPUs, so ``N`` must be below
    ``ceil(gpus_per_task)``); ``gpus_per_task``: a number >= 0, > 0 with CUDA (a task
    without a GPU of its own would use GPU 0 of its node, shared and unseen by Ray),
    default 1 with CUDA, else 0."""
    from ..encode.runtime import cuda_index, is_cuda
    from .embed import check_gpus_per_actor  # the actors' rule: a number >= 0 or None

    try:
        check_gpus_per_actor(gpus_per_task)
    except ValueError:
        raise ValueError(
            f"gpus_per_task must be a number >= 0 or None; got {gpus_per_task!r}"
        ) from None
    text = None if device is None else str(device)
    if text not in (None, "cpu") and not is_cuda(text):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if text in (None, "cpu"):
        return text, float(gpus_per_task or 0)
    gpus = 1.0 if gpus_per_task is None else float(gpus_per_task)
    if gpus == 0:
        raise ValueError(
            f"device={text!r} needs a GPU per tile task: gpus_per_task must be > 0 (1: a "
            "GPU each; 0.5: two tasks share one); tasks without one would all use GPU 0"
        )
    own = max(1, int(np.ceil(gpus)))
    index = cuda_index(text)
    if index is not None and index >= own:
        raise ValueError(
            f"device={text!r}: each tile task has {own} GPU(s) (gpus_per_task={gpus:g}), "
            f"cuda:0 to cuda:{own - 1} as it numbers them"
        )
    return text, gpus


def _on_cluster(ray: Any, device: str | None, gpus: float) -> tuple[str | None, float]:
    """The tasks' device on this cluster: CUDA where it has no GPU at all warns and runs
    on the CPUs (as everywhere: :func:`~dedup_index.validation.resolve_device`); fewer
    GPUs than one task needs is a ``ValueError`` at once, not a hang."""
    have = float(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        return device, 0.0
    if have == 0 and device is not None and device != "cpu":
        logger.warning(
            "device=%r asked for but the Ray cluster has no GPU: searching on its CPUs", device
        )
        return "cpu", 0.0
    if have < gpus:
        raise ValueError(
            f"gpus_per_task={gpus:g} but the Ray cluster has {have:g} GPU(s); pass "
            "gpus_per_task=1 or less, device='cpu', or add GPU nodes"
        )
    return device, gpus


def _fingerprint(unit: Any, store_path: str | None) -> dict:
    """What identifies the rows: a store's path and manifest, or an array's checksum."""
    import hashlib

    if store_path is not None:
        manifest = (Path(store_path) / "manifest.json").read_bytes()
        return {"store": store_path, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    return {"array_sha256": hashlib.sha256(np.ascontiguousarray(unit).data).hexdigest()}


def _run_tiles(
    ray,
    unit,
    store_path,
    threshold,
    b,
    work,
    jid,
    *,
    threads_per_task,
    max_retries,
    progress,
    sink,
    precision="auto",
    device=None,
    gpus_per_task=0.0,
    engine=None,
):
    """Submit the missing tiles, merge every tile once (pairs into ``sink``); returns the
    maxima and the tile counts."""
    n = unit.shape[0]
    grid = tl.tile_grid(n, b)
    best_later = np.full(n, -np.inf)
    best_earlier = np.full(n, -np.inf)
    merged: set[tuple[int, int]] = set()

    def merge(a: int, c: int) -> bool:
        """Merge tile (a, c) from its file; False if the file is missing or bad."""
        if (a, c) in merged:
            return True
        a0, a1 = tl.block_bounds(n, b, a)
        c0, c1 = tl.block_bounds(n, b, c)
        path = tl.tile_path(work, a, c)
        try:
            out = tl.read_tile(path, jid, a, c, a1 - a0, c1 - c0)
        except FileNotFoundError:
            return False
        except ValueError as err:
            if not path.exists():
                return False
            logger.warning("%s; recomputing the tile", err)
            path.unlink(missing_ok=True)
            return False
        sink.add(out.pairs)
        np.maximum(best_later[a0:a1], out.best_later, out=best_later[a0:a1])
        np.maximum(best_earlier[c0:c1], out.best_earlier, out=best_earlier[c0:c1])
        merged.add((a, c))
        return True

    todo = [t for t in grid if not merge(*t)]
    reused = len(grid) - len(todo)
    if reused:
        logger.info(
            "ray: %d of %d tiles already in %s, %d to compute", reused, len(grid), work, len(todo)
        )
    refs: dict = {}
    block_refs: dict[int, Any] = {}
    if store_path is None and todo:
        needed = sorted({k for t in todo for k in t})
        block_refs = {
            k: ray.put(np.ascontiguousarray(unit[slice(*tl.block_bounds(n, b, k))])) for k in needed
        }
    task = ray.remote(_tile_task).options(
        num_cpus=threads_per_task,
        num_gpus=gpus_per_task,
        max_retries=max_retries,
        retry_exceptions=False,
        runtime_env={"env_vars": _thread_env(threads_per_task)},
    )
    for a, c in todo:
        if store_path is None:
            args = (block_refs[a], None if a == c else block_refs[c])
        else:
            args = (store_path, None)
        refs[
            task.remote(
                *args,
                threshold=threshold,
                n=n,
                block_rows=b,
                a=a,
                c=c,
                work_dir=str(work),
                job=jid,
                precision=precision,
                device=device,
                engine=engine,
            )
        ] = (a, c)
    report = _RowProgress(progress, n, len(grid))
    report.tiles(reused)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                a, c = refs[ref]
                ray.get(ref)  # re-raises a task's error (after its retries)
                if not merge(a, c):
                    raise RuntimeError(
                        f"tile ({a}, {c}) finished but its file is missing or "
                        f"damaged: {tl.tile_path(work, a, c)}"
                    )
                report.tiles(1)
    except BaseException:
        for ref in pending:  # the finished tiles stay in work_dir for a rerun
            ray.cancel(ref)
        raise
    return (
        best_later,
        best_earlier,
        {"tiles": len(grid), "tiles_computed": len(todo), "tiles_reused": reused},
    )


class _RowProgress:
    """Tiles done, reported to a rows-done ``progress`` callback in proportion (the
    counts add up to ``n`` when every tile is done)."""

    def __init__(self, progress: Callable[[int], Any] | None, n: int, total: int) -> None:
        self.progress, self.n, self.total = progress, n, total
        self.done = self.reported = 0

    def tiles(self, k: int) -> None:
        self.done += k
        if self.progress is None or self.total == 0:
            return
        rows = self.n * self.done // self.total
        if rows > self.reported:
            self.progress(rows - self.reported)
            self.reported = rows


def _thread_env(threads: int) -> dict[str, str]:
    value = str(threads)
    return {"OMP_NUM_THREADS": value, "OPENBLAS_NUM_THREADS": value, "MKL_NUM_THREADS": value}


def _tile_task(
    block_a,
    block_c,
    *,
    threshold,
    n,
    block_rows,
    a,
    c,
    work_dir,
    job,
    precision="auto",
    device=None,
    engine=None,
) -> int:
    """One Ray task: tile ``(a, c)`` to its file; returns its number of pairs (or -1 when
    the file was already there, e.g. a re-executed task).  A CUDA ``device`` is taken
    on the GPU(s) Ray assigned this task (``cuda`` its first, ``cuda:N`` its N-th)."""
    path = tl.tile_path(work_dir, a, c)
    if path.exists():
        return -1
    tl.maybe_fault(work_dir, a, c)
    a0, a1 = tl.block_bounds(n, block_rows, a)
    c0, c1 = tl.block_bounds(n, block_rows, c)
    if isinstance(block_a, str):  # a store on shared storage: read the two blocks
        store = _open_store(block_a, n)
        rows_a = store[a0:a1]
        rows_c = None if a == c else store[c0:c1]
    else:
        rows_a, rows_c = block_a, block_c
    if device not in (None, "cpu"):
        import ray

        from .embed import actor_device

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        device = actor_device(device, ray.get_gpu_ids(), visible)
    pairs, later, earlier = tl.compute_tile(
        rows_a,
        rows_c,
        threshold,
        start_a=a0,
        start_c=c0,
        precision=precision,
        device=device,
        engine=engine,
    )
    tl.write_tile(path, tl.TileOutput(a, c, pairs, later, earlier), job)
    return len(pairs)


_STORES: dict[str, EmbeddingStore] = {}


def _open_store(path: str, n: int) -> EmbeddingStore:
    """A worker's read-only store, opened once per process (again if it has since grown
    to the ``n`` rows this job needs: committed rows never change)."""
    store = _STORES.get(path)
    if store is None or len(store) < n:
        store = _STORES[path] = EmbeddingStore.open(path, mode="r")
    if len(store) < n:
        raise ValueError(f"the store at {path} has {len(store)} rows; this job needs {n}")
    return store
