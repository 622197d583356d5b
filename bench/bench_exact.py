"""Exact all-pairs search against the machine's GEMM rate: blocked vs FAISS vs flat.

    .venv/bin/python bench/bench_exact.py [--sizes 20000,50000,100000] [--threshold 0.9]
                                          [--skip-flat-above N] [--repeats-small 3]

For each N, in one process, on ``clustered_unit_vectors(N, 512, seed=0)``
(:mod:`synthetic`):

- ``blocked``: ``dedup_embeddings(E, t, backend="blocked", score="nearest")``: pairs,
  each row's nearest neighbour and best earlier row, from upper-triangle GEMM tiles.
- ``faiss range``: one ``faiss.IndexFlatIP`` over all rows, ``range_search`` at radius
  = threshold in query blocks of 4096, keep ``j > i``: the raw full-square baseline.
- ``flat``: ``dedup_embeddings(E, t, backend="flat", score="nearest")``.

The GEMM rate of the machine (numpy float32, 2048 x 512 by 512 x 8192 into a
preallocated ``out=``, best of 5) is measured before the first method and after each, and
each method is compared with the mean of the rates measured just before and just after it,
because this machine's speed drifts over minutes.

Columns: ``x faiss`` = FAISS range-search seconds / this method's seconds (higher is
faster); ``GFLOP/s`` = useful arithmetic N^2 * D flops (N^2 / 2 pairs x D multiply-adds
x 2) / seconds, the same numerator for every method; ``% GEMM`` = that / the GEMM rate
measured around the method; ``peak MiB`` = peak RSS above the RSS at the method's start
(sampled, see ``bench_engine.PeakRSS``).  Best of ``--repeats-small`` for N <= 20000, one
run above.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import numpy as np
from _common import gemm_rate, machine_lines, table
from bench_engine import PeakRSS, faiss_raw
from synthetic import clustered_unit_vectors

import dedup_index

SMALL = 20_000


@dataclass
class Row:
    n: int
    method: str
    seconds: float
    gemm: float  # GFLOP/s measured around this method
    pairs: int
    removed: int
    peak: int


def run_method(fn, repeats: int) -> tuple[object, float, float, int]:
    """``(result, best seconds, mean GEMM rate around the runs, peak bytes)``; the GEMM rate
    is measured before and after every repetition."""
    best, peak, rates, out = float("inf"), 0, [gemm_rate()], None
    for _ in range(repeats):
        out = None
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            t = time.perf_counter() - t0
        rates.append(gemm_rate())
        best, peak = min(best, t), max(peak, mem.delta)
    return out, best, float(np.mean(rates)), peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,50000,100000")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats-small", type=int, default=3)
    ap.add_argument(
        "--skip-flat-above", type=int, default=None, help="no flat run above this N (time)"
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    thr, d = args.threshold, args.dim

    print("\n".join(machine_lines()))
    print(f"data: bench/synthetic.py clustered_unit_vectors(N, {d}, seed={args.seed})")
    print(f"threshold {thr}; best of {args.repeats_small} for N <= {SMALL}, one run above")
    print(f"GEMM rate at start: {gemm_rate():.1f} GFLOP/s (2048x{d} @ {d}x8192, out=)")
    print()

    rows: list[Row] = []
    faiss_s: dict[int, float] = {}
    checks: list[str] = []
    skipped: list[str] = []
    wall0 = time.perf_counter()
    for n in sizes:
        t0 = time.perf_counter()
        unit = clustered_unit_vectors(n, d, seed=args.seed)
        print(f"N = {n}: data in {time.perf_counter() - t0:.1f} s", flush=True)
        reps = args.repeats_small if n <= SMALL else 1

        def dedup(backend: str, unit=unit):
            return dedup_index.dedup_embeddings(unit, thr, backend=backend, score="nearest")

        blocked, s, g, peak = run_method(lambda: dedup("blocked"), reps)
        rows.append(Row(n, "blocked", s, g, len(blocked.pairs), blocked.n_removed, peak))
        print(f"  blocked {s:.2f} s", flush=True)

        raw, s, g, peak = run_method(lambda unit=unit: faiss_raw(unit, thr), reps)
        faiss_s[n] = s
        rows.append(Row(n, "faiss range", s, g, raw[0].size, np.unique(raw[1]).size, peak))
        print(f"  faiss range {s:.2f} s", flush=True)
        raw_set = set(zip(raw[0].tolist(), raw[1].tolist(), strict=True))
        ours = set(zip(blocked.pairs.i.tolist(), blocked.pairs.j.tolist(), strict=True))
        checks.append(
            f"N = {n}: faiss range vs blocked pairs: {len(raw_set)} vs {len(ours)}, only "
            f"FAISS {len(raw_set - ours)}, only blocked {len(ours - raw_set)} (FAISS keeps "
            "float32 IP > radius; blocked decides >= on canonical float64 scores)"
        )
        del raw, raw_set, ours

        if args.skip_flat_above is not None and n > args.skip_flat_above:
            skipped.append(f"N = {n}: flat skipped (--skip-flat-above {args.skip_flat_above})")
        else:
            flat, s, g, peak = run_method(lambda: dedup("flat"), reps)
            rows.append(Row(n, "flat", s, g, len(flat.pairs), flat.n_removed, peak))
            print(f"  flat {s:.2f} s", flush=True)
            same = {
                "pairs": blocked.pairs.equals(flat.pairs),
                "keep": np.array_equal(blocked.keep, flat.keep),
                "max_similarity": np.array_equal(blocked.max_similarity, flat.max_similarity),
            }
            verdict = "OK" if all(same.values()) else "MISMATCH"
            checks.append(
                f"N = {n}: blocked vs flat bit-equal: "
                + ", ".join(f"{k} {v}" for k, v in same.items())
                + f" -> {verdict}"
            )
            del flat
        del blocked, unit
        gc.collect()

    header = ["N", "method", "seconds", "x faiss", "GFLOP/s", "GEMM GF/s", "% GEMM"]
    header += ["pairs", "removed", "peak MiB"]
    body: list[list[str]] = []
    for k, r in enumerate(rows):
        if k and r.n != rows[k - 1].n:
            body.append([])
        useful = float(r.n) * r.n * d / r.seconds / 1e9
        body.append(
            [
                f"{r.n}",
                r.method,
                f"{r.seconds:.2f}",
                f"{faiss_s[r.n] / r.seconds:.2f}x",
                f"{useful:.1f}",
                f"{r.gemm:.1f}",
                f"{100 * useful / r.gemm:.0f}%",
                f"{r.pairs}",
                f"{r.removed}",
                f"{r.peak / 2**20:.0f}",
            ]
        )
    print()
    print(table(header, body))
    print()
    print("checks:")
    print("\n".join(checks + skipped))
    print(f"\ntotal wall time {time.perf_counter() - wall0:.0f} s")


if __name__ == "__main__":
    main()
