"""Shared helpers of ``bench_exact.py``, ``bench_approx.py`` and ``bench_memory.py``.

- machine description (``bench_engine.machine_info``), the GEMM rate of this machine
  measured on the spot (:func:`gemm_rate`), aligned plain-text tables (:func:`table`);
- memory: RSS now, the process high-water mark, and a sampler of ``/proc/self/status``
  (:class:`MemSampler`) that also splits the peak into anonymous and file-backed pages;
- cached inputs under ``bench/_out`` (git-ignored): synthetic rows as ``.npy`` and
  :class:`~dedup_index.store.EmbeddingStore` folders, built in fresh subprocesses;
- workers: one measurement per fresh subprocess (``python bench/_common.py SPEC_JSON``),
  so each method's peak RSS is its own process's (``VmHWM``; see :func:`maxrss_bytes` for
  why not ``ru_maxrss``).  A worker prints one
  JSON line as its last line of output; :func:`run_worker` returns it as a dict.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dedup_index.files import atomic_write_with, write_json_atomic

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "_out"
sys.path.insert(0, str(BENCH))

MiB = float(1 << 20)
GiB = float(1 << 30)

# --------------------------------------------------------------------------- machine


def machine_lines() -> list[str]:
    """CPU, cores, memory, Python/numpy/faiss/torch versions (torch is never imported)."""
    from bench_engine import machine_info

    return machine_info(None)


def gemm_rate(rows: int = 2048, dim: int = 512, cols: int = 8192, repeats: int = 5) -> float:
    """GFLOP/s of one float32 numpy GEMM ``(rows x dim) @ (dim x cols)`` into a
    preallocated ``out=``, best of ``repeats`` (the tile shape of the ``blocked`` backend)."""
    rng = np.random.default_rng(12345)
    a = rng.standard_normal((rows, dim), dtype=np.float32)
    b = rng.standard_normal((cols, dim), dtype=np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    np.matmul(a, b.T, out=out)  # warm up (thread pool, pages of out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * dim * cols / best / 1e9


def blas_kernel() -> str:
    """numpy's BLAS and the kernel it runs (threadpoolctl: e.g. ``openblas Haswell``)."""
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return f"{pool.get('internal_api')} {pool.get('architecture', '?')}"
    return "?"


def numpy_default_rate(rows: int = 2048, dim: int = 512, cols: int = 8192) -> tuple[float, str]:
    """:func:`gemm_rate` in a subprocess with ``OPENBLAS_CORETYPE`` and
    ``OPENBLAS_L2_SIZE`` unset (OpenBLAS then picks its kernel for this CPU): the machine's
    real numpy float32 ceiling, beside the one CI's environment gives.  ``(GFLOP/s,
    kernel)``."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import _common as c; "
        f"print(json.dumps([c.gemm_rate({rows}, {dim}, {cols}), c.blas_kernel()]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(BENCH)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        return float("nan"), "failed: " + done.stderr.strip()[-200:]
    rate, kernel = json.loads(done.stdout.strip().splitlines()[-1])
    return float(rate), kernel


def torch_rates(rows: int = 2048, dim: int = 512, cols: int = 8192, repeats: int = 5) -> dict:
    """GFLOP/s of torch's GEMMs on the same shape, all threads: float32, bf16 through
    oneDNN with float32 output, and plain bf16 with bf16 output (what
    ``precision="bf16"`` runs on the CPU).  Empty without torch."""
    try:
        import torch
    except ImportError:
        return {}
    rng = np.random.default_rng(12345)
    a = torch.from_numpy(rng.standard_normal((rows, dim), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((cols, dim), dtype=np.float32))
    out = torch.empty(rows, cols)
    ab, bb = a.bfloat16(), b.bfloat16()
    ar, br = ab.float(), bb.float()

    def best(fn) -> float:
        fn()
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return 2.0 * rows * dim * cols / t / 1e9

    mk = torch.backends.mkldnn.matmul
    rates = {"torch fp32": best(lambda: torch.mm(a, b.T, out=out))}
    saved = mk.fp32_precision
    try:
        mk.fp32_precision = "bf16"
        rates["torch bf16 (oneDNN, fp32 out)"] = best(lambda: torch.mm(ar, br.T, out=out))
    finally:
        mk.fp32_precision = saved
    rates["torch bf16 (bf16 out)"] = best(lambda: torch.mm(ab, bb.T))
    return rates


def table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (1,)) -> str:
    """Plain aligned table: columns in ``left`` left-aligned, the others right-aligned; an
    empty row prints as a blank line."""
    widths = [len(h) for h in header]
    for r in rows:
        for k, cell in enumerate(r):
            widths[k] = max(widths[k], len(cell))

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if k in left else c.rjust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) if r else "" for r in rows)
    return "\n".join(out)


# --------------------------------------------------------------------------- memory


def status_kib() -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` of this process, KiB."""
    want = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in want:
                out[key] = int(line.split()[1])
    return out


def maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (KiB on Linux).  Beware: in a process
    started by ``subprocess`` (vfork + exec) it also counts the *parent's* peak, because
    Linux folds the high-water mark of the address space left at exec into it; measured
    here: every worker reported the 3.6 GB peak of the parent that had generated the data.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space: ``VmHWM`` of ``/proc/self/status``
    (the kernel's high-water mark, reset at exec; unlike ``ru_maxrss`` above)."""
    return status_kib()["VmHWM"] * 1024


class MemSampler:
    """Samples ``/proc/self/status`` every ``interval`` s: peak VmRSS, and the anonymous and
    file-backed (mapped store pages) parts at that peak, plus the peak of RssAnon alone."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.peak_anon = 0

    def _take(self) -> None:
        s = status_kib()
        if s["VmRSS"] > self.peak["VmRSS"]:
            self.peak = {k: s[k] for k in ("VmRSS", "RssAnon", "RssFile")}
        self.peak_anon = max(self.peak_anon, s["RssAnon"])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take()
            time.sleep(self.interval)

    def __enter__(self) -> MemSampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


# --------------------------------------------------------------------------- inputs


def data_path(n: int, dim: int = 512, seed: int = 0) -> Path:
    return OUT / f"synthetic_{n}x{dim}_s{seed}.npy"


def ensure_data(n: int, dim: int = 512, seed: int = 0) -> Path:
    """``clustered_unit_vectors(n, dim, seed)`` saved as ``.npy`` (generated once)."""
    path = data_path(n, dim, seed)
    if not path.exists():
        from synthetic import clustered_unit_vectors

        OUT.mkdir(parents=True, exist_ok=True)
        rows = clustered_unit_vectors(n, dim, seed=seed)
        atomic_write_with(path, lambda tmp: np.save(tmp, rows), suffix=".npy")
    return path


#: Stores above this many rows are generated chunk by chunk
#: (``synthetic.clustered_unit_vector_chunks``: peak RSS O(chunk), not O(N)).
CHUNKED_ABOVE = 200_000


def store_generator(n: int) -> str:
    """The generator a store of ``n`` rows is built with (recorded and checked)."""
    if n > CHUNKED_ABOVE:
        return "bench/synthetic.py clustered_unit_vector_chunks"
    return "bench/synthetic.py clustered_unit_vectors"


def store_path(n: int, dim: int = 512, seed: int = 0, dtype: str = "float32") -> Path:
    tag = f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"
    base = OUT / f"store_{tag}" if (dim, seed) == (512, 0) else OUT / f"store_{n}x{dim}_s{seed}"
    return base if dtype == "float32" else Path(f"{base}_{dtype}")


def store_record(path: Path) -> dict[str, Any] | None:
    """The builder's record of a complete store at ``path``, or None if there is none."""
    rec_path = Path(str(path) + ".build.json")
    if not (path / "manifest.json").exists() or not rec_path.exists():
        return None
    rec = json.loads(rec_path.read_text())
    count = json.loads((path / "manifest.json").read_text()).get("count")
    return rec if rec.get("complete") and count == rec.get("n") else None


def ensure_store(
    n: int, dim: int = 512, seed: int = 0, *, rebuild: bool = False, dtype: str = "float32"
) -> dict:
    """A store of ``clustered_unit_vectors(n, dim, seed)`` (chunked above
    :data:`CHUNKED_ABOVE` rows: :func:`store_generator`), rows kept as ``dtype``, built in a
    fresh subprocess unless a complete one is there; returns its build record
    (``reused`` says which)."""
    path = store_path(n, dim, seed, dtype)
    rec = store_record(path)
    want = {"n": n, "dim": dim, "seed": seed, "generator": store_generator(n)}
    if dtype != "float32":
        want["dtype"] = dtype
    if rec and not rebuild and all(rec.get(k) == v for k, v in want.items()):
        return {**rec, "reused": True, "path": str(path)}
    if path.exists():
        import shutil

        shutil.rmtree(path)
    Path(str(path) + ".build.json").unlink(missing_ok=True)
    spec = {"task": "build_store", "n": n, "dim": dim, "seed": seed, "path": str(path)}
    res = run_worker({**spec, "dtype": dtype})
    return {**res, "reused": False, "path": str(path)}


def disk_usage(path: Path) -> tuple[int, int]:
    """``(bytes allocated on disk, apparent bytes)`` of the files under ``path``."""
    used = apparent = 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            st = p.stat()
            used += st.st_blocks * 512
            apparent += st.st_size
    return used, apparent


# --------------------------------------------------------------------------- workers


def run_worker(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process; its result dict (raises if it failed)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {spec} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def _build_store(spec: dict[str, Any]) -> dict[str, Any]:
    """Up to :data:`CHUNKED_ABOVE` rows: generate all rows (clusters and the final shuffle
    span all rows), then append them in pieces of 65536 rows.  Above: generate and append
    65536 rows at a time (``clustered_unit_vector_chunks``), so the builder's peak RSS
    stays near one chunk (the whole-array generator peaked at 17.5 GiB for 1M rows)."""
    from synthetic import clustered_unit_vector_chunks, clustered_unit_vectors

    from dedup_index.store import EmbeddingStore

    n, dim, seed = spec["n"], spec["dim"], spec["seed"]
    dtype = spec.get("dtype", "float32")
    generator = store_generator(n)
    meta = {"generator": generator, "n": n, "dim": dim}
    if dtype != "float32":
        meta["dtype"] = dtype
    store = EmbeddingStore.create(spec["path"], dim, meta={**meta, "seed": seed}, dtype=dtype)
    t_gen = t_write = 0.0
    if n > CHUNKED_ABOVE:
        chunks = clustered_unit_vector_chunks(n, dim, seed=seed)
    else:
        t0 = time.perf_counter()
        rows = clustered_unit_vectors(n, dim, seed=seed)
        t_gen += time.perf_counter() - t0
        chunks = (rows[a : a + 65_536] for a in range(0, n, 65_536))
    while True:
        t0 = time.perf_counter()
        block = next(chunks, None)
        t_gen += time.perf_counter() - t0
        if block is None:
            break
        t1 = time.perf_counter()
        store.append(block, normalize=False)
        t_write += time.perf_counter() - t1
    store.close()
    rec = {
        **meta,
        "seed": seed,
        "complete": True,
        "generate_s": round(t_gen, 2),
        "write_s": round(t_write, 2),
        "builder_peak_rss": peak_rss_bytes(),
    }
    # How it was built, next to the store (the store's own manifest is left alone).
    write_json_atomic(spec["path"] + ".build.json", rec)
    return rec


def _dedup(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``dedup_embeddings`` run on a ``.npy`` (loaded into memory) or a store (opened,
    streamed); memory, time, pairs, and optionally recall, profile and the pairs."""
    import dedup_index
    from dedup_index.search.recall import measure_recall
    from dedup_index.store import EmbeddingStore

    rss0 = status_kib()
    t0 = time.perf_counter()
    if spec.get("store"):
        data: Any = EmbeddingStore.open(spec["store"])
    else:
        data = np.load(spec["npy"])
    load_s = time.perf_counter() - t0
    gc.collect()
    rss1 = status_kib()
    kwargs = dict(
        backend=spec["backend"],
        score=spec.get("score", "nearest"),
        backend_options=spec.get("options") or None,
    )
    prof = cProfile.Profile() if spec.get("profile") else None
    with MemSampler() as mem:
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        res = dedup_index.dedup_embeddings(data, spec["threshold"], **kwargs)
        if prof is not None:
            prof.disable()
        seconds = time.perf_counter() - t0
    peak, ru_peak = peak_rss_bytes(), maxrss_bytes()
    out: dict[str, Any] = {
        "n": int(data.shape[0]),
        "backend": spec["backend"],
        "seconds": seconds,
        "load_s": load_s,
        "pairs": len(res.pairs),
        "removed": int(res.n_removed),
        "exact": bool(res.exact),
        "summary": res.info.get("summary", ""),
        "rss_start": rss0["VmRSS"] * 1024,
        "rss_loaded": rss1["VmRSS"] * 1024,
        "peak_rss": peak,
        "ru_maxrss": ru_peak,
        "peak_sampled": mem.peak["VmRSS"] * 1024,
        "peak_anon_part": mem.peak["RssAnon"] * 1024,
        "peak_file_part": mem.peak["RssFile"] * 1024,
        "peak_anon": mem.peak_anon * 1024,
    }
    if spec.get("save_pairs"):
        p = res.pairs
        np.savez(spec["save_pairs"], i=np.asarray(p.i), j=np.asarray(p.j), keep=res.keep)
    if prof is not None:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(spec.get("profile_lines", 14))
        out["profile"] = buf.getvalue()
    if spec.get("recall_sample"):
        rep = measure_recall(data, spec["threshold"], res.pairs, sample=spec["recall_sample"])
        out.update(
            recall=rep.recall,
            precision=rep.precision,
            n_exact=rep.n_exact,
            n_missed=rep.n_missed,
            recall_s=rep.seconds,
        )
        # More samples (other seeds) where asked: a recall near a target needs two.
        out["recall_more"] = []
        for seed in spec.get("recall_more_seeds", ()):
            r = measure_recall(
                data, spec["threshold"], res.pairs, sample=spec["recall_sample"], seed=seed
            )
            out["recall_more"].append(
                {"seed": seed, "recall": r.recall, "n_exact": r.n_exact, "n_missed": r.n_missed}
            )
    return out


TASKS = {"build_store": _build_store, "dedup": _dedup}


def _worker_main(arg: str) -> None:
    spec = json.loads(arg)
    if os.environ.get("DEDUP_BENCH_LOG"):  # a long run's progress, readable while it runs
        import logging

        logging.basicConfig(
            filename=os.environ["DEDUP_BENCH_LOG"],
            level=logging.INFO,
            format="%(asctime)s %(name)s %(message)s",
        )
    if spec.get("task") == "dedup":
        import faiss  # noqa: F401  (import order as in the library: numpy, then faiss)
    print(json.dumps(TASKS[spec["task"]](spec)), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
