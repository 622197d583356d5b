"""Engine benchmark: upstream algorithm vs dense oracle vs flat backend vs raw FAISS.

    .venv/bin/python bench/bench_engine.py [--sizes 2000,4000,8000,50000] [--threshold 0.9]
                                           [--threads N] [--dim 512] [--seed 0]

For each N, on the same synthetic CLIP-like data (:mod:`synthetic`), in one process:

- ``upstream``: the upstream algorithm (:mod:`upstream_reference`; N <= 8000 only).
- ``dense``: ``dedup_embeddings(backend="dense", score="nearest")``, the oracle (N <= 8000).
- ``flat``: ``dedup_embeddings(backend="flat", score="nearest")``: pairs + true
  nearest-neighbour ``max_similarity``.
- ``flat pairs``: ``dedup_embeddings(backend="flat", score="pairs")``: pairs only.
- ``faiss raw``: one ``faiss.IndexFlatIP`` over all rows, ``range_search`` at
  radius = threshold in query blocks of 4096, keep ``j > i``: the bare FAISS baseline.

Timing: best of 3 for N <= 8000, a single run above.  Every method's output is checked:
upstream's removed set against ours, dense against flat bit for bit, raw FAISS's pairs
against ours.

Columns:

- ``speedup``: upstream seconds / this method's seconds (higher is faster).
- ``x faiss``: this method's seconds / raw FAISS seconds (its cost over bare FAISS).
- ``peak MiB``: peak resident memory above the RSS at the method's start, from a 2 ms
  sampler of ``/proc/self/statm`` and ``getrusage`` ``ru_maxrss`` (a process high-water
  mark, so it only counts when the method sets a new one).
- ``GFLOP/s``: the arithmetic of the similarity products / the method's whole time.  A
  full-square product of N x D rows is N*N*D multiply-adds = 2*N*N*D flops (FAISS range
  search and top-k search, which compute every block).  ``X @ X.T`` in numpy (upstream,
  dense) runs BLAS ``syrk``, which computes one triangle: N*(N+1)*D flops.  ``flat`` adds
  the top-k pass for the rows that have no pair: 2*R*N*D for R such rows.  The float64
  canonical rescoring (pairs * D) is negligible and not counted.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# faiss is imported after numpy (above) on purpose; torch is never imported.
import faiss  # noqa: E402
from synthetic import clustered_unit_vectors  # noqa: E402
from upstream_reference import upstream_dedup  # noqa: E402

import dedup_index  # noqa: E402
from dedup_index.policy import decide  # noqa: E402
from dedup_index.search import as_unit_float32  # noqa: E402
from dedup_index.search.flat import (  # noqa: E402
    DEFAULT_DB_BLOCK,
    flat_pairs,
    flat_pairs_and_nearest,
)

SMALL_MAX = 8000  # upstream and dense run up to here; best of 3 up to here
REPEATS_SMALL = 3
QUERY_BLOCK = 4096
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakRSS:
    """Peak RSS above the RSS at entry, sampled every 2 ms plus the ``ru_maxrss`` mark."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.delta = 0

    def __enter__(self) -> PeakRSS:
        self.start = _rss_bytes()
        self.maxrss0 = _maxrss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        maxrss1 = _maxrss_bytes()
        if maxrss1 > self.maxrss0:
            self.peak = max(self.peak, maxrss1)
        self.delta = self.peak - self.start


# --------------------------------------------------------------------------- methods


def faiss_raw(unit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bare FAISS: one IndexFlatIP, range search at radius = threshold, keep j > i."""
    n, d = unit.shape
    index = faiss.IndexFlatIP(d)
    index.add(unit)
    parts_i, parts_j, parts_s = [], [], []
    for a in range(0, n, QUERY_BLOCK):
        b = min(n, a + QUERY_BLOCK)
        lims, dist, labels = index.range_search(unit[a:b], threshold)
        qi = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(lims.astype(np.int64)))
        qj = labels.astype(np.int64)
        upper = qj > qi
        parts_i.append(qi[upper])
        parts_j.append(qj[upper])
        parts_s.append(dist[upper])
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)


@dataclass
class Row:
    n: int
    method: str
    seconds: float
    pairs: int
    removed: int
    peak: int
    gflop: float


def timed(fn: Callable[[], object], repeats: int) -> tuple[object, float, int]:
    """Run ``fn`` ``repeats`` times: its last result, the best seconds, the largest peak."""
    best, peak, out = float("inf"), 0, None
    for _ in range(repeats):
        out = None
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            t = time.perf_counter() - t0
        best, peak = min(best, t), max(peak, mem.delta)
    return out, best, peak


# --------------------------------------------------------------------------- checks


def check_upstream(up, ours, pairs_only, unit: np.ndarray, threshold: float) -> list[str]:
    keep_up, max_up, pairs_up = up
    lines = []
    diff = np.flatnonzero(keep_up != ours.keep)
    near = 0
    if diff.size:
        # Rows whose fate differs: do they only take part in pairs within 1e-6 of the
        # threshold?  (float32 vs canonical float64 may put those on either side.)
        for r in diff:
            s = unit.astype(np.float64) @ unit[r].astype(np.float64)
            s[r] = -np.inf
            if np.any(np.abs(s - threshold) < 1e-6):
                near += 1
    lines.append(
        f"upstream vs flat: removed rows differing = {diff.size} (expected 0; {near} of them "
        f"have a pair within 1e-6 of the threshold); pairs {len(pairs_up)} vs {len(ours.pairs)}"
    )
    up_set = {(p["kept_idx"], p["removed_idx"]) for p in pairs_up}
    our_set = set(zip(ours.pairs.i.tolist(), ours.pairs.j.tolist(), strict=True))
    lines.append(
        f"upstream vs flat: pairs only upstream = {len(up_set - our_set)}, "
        f"only ours = {len(our_set - up_set)}"
    )
    mx = pairs_only.max_similarity
    same_zero = np.array_equal(max_up == 0, mx == 0)
    lines.append(
        f"upstream max_similarity vs flat score='pairs': max |diff| = "
        f"{np.max(np.abs(max_up - mx)):.2e} (float32 vs canonical float64), "
        f"same rows at 0: {same_zero}"
    )
    return lines


def check_dense_flat(dense, flat) -> str:
    removed = np.array_equal(dense.removed, flat.removed)
    dup = np.array_equal(dense.duplicate_of, flat.duplicate_of)
    pairs = dense.pairs.equals(flat.pairs)
    mx = np.array_equal(dense.max_similarity, flat.max_similarity)
    ok = removed and dup and pairs and mx
    return (
        f"dense vs flat (exact): removed {removed}, duplicate_of {dup}, pairs {pairs}, "
        f"max_similarity {mx} -> {'OK' if ok else 'MISMATCH'}"
    )


def check_flat_modes(flat, pairs_only) -> str:
    same = flat.pairs.equals(pairs_only.pairs) and np.array_equal(flat.keep, pairs_only.keep)
    recover = np.where(flat.max_similarity >= flat.threshold, flat.max_similarity, 0.0)
    mx = np.array_equal(recover, pairs_only.max_similarity)
    return (
        f"flat 'nearest' vs 'pairs': same pairs and keep {same}; 'pairs' max_similarity "
        f"recovered from 'nearest' exactly: {mx}"
    )


def check_faiss(raw, flat, threshold: float) -> str:
    ri, rj, rs = raw
    raw_set = set(zip(ri.tolist(), rj.tolist(), strict=True))
    our_set = set(zip(flat.pairs.i.tolist(), flat.pairs.j.tolist(), strict=True))
    only_raw, only_ours = raw_set - our_set, our_set - raw_set
    return (
        f"raw FAISS vs flat: pairs {len(raw_set)} vs {len(our_set)}; only FAISS "
        f"{len(only_raw)}, only ours {len(only_ours)} (FAISS keeps IP > radius in float32)"
    )


# --------------------------------------------------------------------------- report


def machine_info(threads: int | None) -> list[str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    simd = " ".join(x for x in ("avx2", "fma", "avx512f") if x in flags)

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            name = line.split()[-1]
            if "blas" in name or "gomp" in name:
                libs.add(os.path.basename(name))
    return [
        f"CPU: {model} ({simd}); {os.cpu_count()} logical cores, "
        f"{len(os.sched_getaffinity(0))} usable; memory {mem}",
        f"Python {platform.python_version()}, numpy {np.__version__}, faiss-cpu "
        f"{faiss.__version__} ({faiss.get_compile_options().strip()}), torch "
        f"{version('torch')} (not imported), dedup_index {dedup_index.__version__}",
        f"FAISS OpenMP threads: {faiss.omp_get_max_threads()}"
        + (f" (set by --threads {threads})" if threads else " (FAISS default)"),
        f"BLAS/OpenMP libraries loaded: {', '.join(sorted(libs))}",
    ]


def fmt_table(rows: list[Row], upstream: dict[int, float], raw: dict[int, float]) -> str:
    header = [
        "N",
        "method",
        "seconds",
        "speedup",
        "x faiss",
        "pairs",
        "removed",
        "peak MiB",
        "GFLOP/s",
    ]
    body = []
    for r in rows:
        up = upstream.get(r.n)
        body.append(
            [
                f"{r.n}",
                r.method,
                f"{r.seconds:.3f}",
                f"{up / r.seconds:.1f}x" if up else "-",
                f"{r.seconds / raw[r.n]:.2f}" if r.n in raw else "-",
                f"{r.pairs}",
                f"{r.removed}",
                f"{r.peak / 2**20:.0f}",
                f"{r.gflop / r.seconds / 1e9:.1f}",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    left = {1}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if k in left else c.rjust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body, strict=True):
        if prev is not None and r.n != prev:
            out.append("")
        out.append(line(cells))
        prev = r.n
    return "\n".join(out)


def breakdown(unit: np.ndarray, threshold: float, threads: int | None) -> str:
    """One run of the flat stages by hand, to see where ``flat`` spends its time."""
    n, d = unit.shape
    t = {}
    t0 = time.perf_counter()
    as_unit_float32(unit)
    t["as_unit_float32"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = flat_pairs(unit, threshold, threads=threads)
    t["pairs only: range search, lower tiles skipped"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    both, _ = flat_pairs_and_nearest(unit, threshold, threads=threads)
    t["pairs + nearest: one top-k pass"] = time.perf_counter() - t0
    assert both.equals(pairs)
    t0 = time.perf_counter()
    decide(n, pairs)
    t["keep policy"] = time.perf_counter() - t0
    parts = [f"  {k:46s} {v:8.3f} s" for k, v in t.items()]
    return "\n".join([f"N = {n}: flat stages, one run each ({len(pairs)} pairs):", *parts])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,4000,8000,50000")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the flat stage timings")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    thr, threads, d = args.threshold, args.threads, args.dim
    if threads:
        faiss.omp_set_num_threads(threads)

    print("\n".join(machine_info(threads)))
    print(f"data: bench/synthetic.py clustered_unit_vectors(N, d={d}, seed={args.seed})")
    print(f"threshold {thr}; best of {REPEATS_SMALL} for N <= {SMALL_MAX}, one run above")
    print()

    rows: list[Row] = []
    up_s: dict[int, float] = {}
    raw_s: dict[int, float] = {}
    notes: list[str] = []
    breakdowns: list[str] = []
    for n in sizes:
        unit = clustered_unit_vectors(n, d, seed=args.seed)
        reps = REPEATS_SMALL if n <= SMALL_MAX else 1
        square = 2.0 * n * n * d
        syrk = 1.0 * n * (n + 1) * d
        print(f"N = {n} ...", flush=True)

        up = dense = None
        if n <= SMALL_MAX:
            up, s, peak = timed(partial(upstream_dedup, unit, thr), reps)
            up_s[n] = s
            removed = int((~up[0]).sum())
            rows.append(Row(n, "upstream", s, len(up[2]), removed, peak, syrk))
            dense, s, peak = timed(
                partial(
                    dedup_index.dedup_embeddings,
                    unit,
                    thr,
                    backend="dense",
                    score="nearest",
                    threads=threads,
                ),
                reps,
            )
            rows.append(Row(n, "dense", s, len(dense.pairs), dense.n_removed, peak, syrk))

        flat, s, peak = timed(
            partial(
                dedup_index.dedup_embeddings,
                unit,
                thr,
                backend="flat",
                score="nearest",
                threads=threads,
            ),
            reps,
        )
        # One top-k pass over the full square.
        rows.append(Row(n, "flat", s, len(flat.pairs), flat.n_removed, peak, square))

        pairs_only, s, peak = timed(
            partial(
                dedup_index.dedup_embeddings,
                unit,
                thr,
                backend="flat",
                score="pairs",
                threads=threads,
            ),
            reps,
        )
        # Range search skips the database tiles wholly below the diagonal.
        tiled = sum(
            2.0 * min(n, c + DEFAULT_DB_BLOCK) * (min(n, c + DEFAULT_DB_BLOCK) - c) * d
            for c in range(0, n, DEFAULT_DB_BLOCK)
        )
        rows.append(
            Row(n, "flat pairs", s, len(pairs_only.pairs), pairs_only.n_removed, peak, tiled)
        )

        raw, s, peak = timed(partial(faiss_raw, unit, thr), reps)
        raw_s[n] = s
        rows.append(Row(n, "faiss raw", s, raw[0].size, np.unique(raw[1]).size, peak, square))

        notes.append(f"N = {n}:")
        if up is not None:
            notes.extend("  " + x for x in check_upstream(up, flat, pairs_only, unit, thr))
        if dense is not None:
            notes.append("  " + check_dense_flat(dense, flat))
        notes.append("  " + check_flat_modes(flat, pairs_only))
        notes.append("  " + check_faiss(raw, flat, thr))
        del up, dense, flat, pairs_only, raw
        gc.collect()
        if not args.no_breakdown:
            breakdowns.append(breakdown(unit, thr, threads))

    print()
    print(fmt_table(rows, up_s, raw_s))
    print()
    print("checks:")
    print("\n".join(notes))
    if breakdowns:
        print()
        print("\n".join(breakdowns))


if __name__ == "__main__":
    main()
