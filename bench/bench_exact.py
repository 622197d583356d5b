"""Exact all-pairs search against the machine's GEMM rates: blocked in each precision vs FAISS.

    .venv/bin/python bench/bench_exact.py [--sizes 20000,50000,100000] [--threshold 0.9]
                                          [--precisions fp32,auto] [--skip-flat-above N]
                                          [--repeats-small 3]

For each N, in one process, on ``clustered_unit_vectors(N, 512, seed=0)``
(:mod:`synthetic`):

- ``blocked fp32`` / ``blocked auto`` / ``blocked bf16`` ...:
  ``dedup_embeddings(E, t, backend="blocked", score="nearest", precision=p)``: pairs,
  each row's nearest neighbour and best earlier row, from upper-triangle GEMM tiles in
  that candidate arithmetic (``auto``: what it picked is printed).  Every precision's
  pairs, keep mask, ``duplicate_of``, ``max_similarity`` and best-earlier scores are
  checked bit-equal to ``fp32``'s.
- ``faiss range``: one ``faiss.IndexFlatIP`` over all rows, ``range_search`` at radius
  = threshold in query blocks of 4096, keep ``j > i``: the raw full-square baseline.
- ``flat``: ``dedup_embeddings(E, t, backend="flat", score="nearest")``.

GEMM rates, 2048 x 512 by 512 x 8192, best of 5, measured at the start and at the end of
the run: numpy float32 as CI runs it (``OPENBLAS_CORETYPE`` as set), numpy float32 with
its default kernel (a subprocess with ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset),
torch float32, torch bf16 through oneDNN with float32 output, and plain torch bf16 (bf16
output: what ``precision="bf16"`` runs on the CPU).  The *best float32 rate* is the
fastest of the three float32 kernels; nothing exact in float32 can beat it.  The numpy CI
rate is also measured before and after every method (this machine's speed drifts over
minutes).

Columns: ``x faiss`` = FAISS range-search seconds / this method's seconds; ``x fp32`` =
``blocked fp32`` seconds / this method's; ``GFLOP/s`` = useful arithmetic N^2 * D flops
(N^2 / 2 pairs x D multiply-adds x 2) / seconds, the same numerator for every method;
``% CI GEMM`` = that / the numpy CI rate measured around the method; ``% best fp32`` and
``% bf16`` = that / the best float32 rate and / the bf16 (bf16 output) rate (means of
start and end); ``cpu s`` = process CPU seconds (all threads: with other work on the machine, wall
seconds over ``cpu s`` / cores shows how much of the machine the method got); ``peak MiB``
= peak RSS above the RSS at the method's start.  Best of
``--repeats-small`` for N <= 20000, one run above.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import numpy as np
from _common import (
    blas_kernel,
    gemm_rate,
    machine_lines,
    numpy_default_rate,
    table,
    torch_rates,
)
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
    cpu: float = float("nan")  # process CPU seconds of the best run (all threads)


def run_method(fn, repeats: int) -> tuple[object, float, float, int, float]:
    """``(result, best seconds, mean GEMM rate around the runs, peak bytes, CPU seconds of
    the best run)``; the GEMM rate is measured before and after every repetition."""
    best, peak, rates, out, cpu = float("inf"), 0, [gemm_rate()], None, float("nan")
    for _ in range(repeats):
        out = None
        gc.collect()
        with PeakRSS() as mem:
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            t, c = time.perf_counter() - t0, time.process_time() - c0
        rates.append(gemm_rate())
        if t < best:
            best, cpu = t, c
        peak = max(peak, mem.delta)
    return out, best, float(np.mean(rates)), peak, cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,50000,100000")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats-small", type=int, default=3)
    ap.add_argument(
        "--precisions", default="fp32,auto", help="blocked runs, comma-separated (fp32 first)"
    )
    ap.add_argument(
        "--skip-flat-above", type=int, default=None, help="no flat run above this N (time)"
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    thr, d = args.threshold, args.dim
    precisions = [p for p in args.precisions.split(",") if p]
    if precisions[0] != "fp32":
        precisions.insert(0, "fp32")

    print("\n".join(machine_lines()))
    print(f"data: bench/synthetic.py clustered_unit_vectors(N, {d}, seed={args.seed})")
    print(f"threshold {thr}; best of {args.repeats_small} for N <= {SMALL}, one run above")
    rates_start = all_rates()
    print_rates("GEMM rates at start", rates_start)
    from dedup_index.search.precision import measure_rates, resolve_precision

    measure_rates()  # auto's one-off timing (cached), outside the timed runs
    name, why, _ = resolve_precision(work=float(max(sizes)) ** 2 / 2 * d)
    print(f"precision='auto' at N = {max(sizes)} picks {name}: {why}")
    print()

    rows: list[Row] = []
    faiss_s: dict[int, float] = {}
    fp32_s: dict[int, float] = {}
    checks: list[str] = []
    skipped: list[str] = []
    wall0 = time.perf_counter()
    for n in sizes:
        t0 = time.perf_counter()
        unit = clustered_unit_vectors(n, d, seed=args.seed)
        print(f"N = {n}: data in {time.perf_counter() - t0:.1f} s", flush=True)
        reps = args.repeats_small if n <= SMALL else 1

        def dedup(backend: str, unit=unit, precision: str = "auto"):
            return dedup_index.dedup_embeddings(
                unit, thr, backend=backend, score="nearest", precision=precision
            )

        blocked = None
        for p in precisions:
            got, s, g, peak, cpu = run_method(lambda p=p: dedup("blocked", precision=p), reps)
            ran = got.info.get("precision", {}).get("precision", "?")
            label = f"blocked {p}" + (f" ({ran})" if p == "auto" else "")
            rows.append(Row(n, label, s, g, len(got.pairs), got.n_removed, peak, cpu))
            print(f"  {label} {s:.2f} s", flush=True)
            if blocked is None:
                blocked, fp32_s[n] = got, s
                continue
            same = {
                "pairs": blocked.pairs.equals(got.pairs),
                "keep": np.array_equal(blocked.keep, got.keep),
                "duplicate_of": np.array_equal(blocked.duplicate_of, got.duplicate_of),
                "max_similarity": np.array_equal(blocked.max_similarity, got.max_similarity),
                "earlier": np.array_equal(
                    blocked.max_earlier_similarity, got.max_earlier_similarity
                ),
            }
            verdict = "OK" if all(same.values()) else "MISMATCH"
            checks.append(
                f"N = {n}: {label} vs blocked fp32 bit-equal: "
                + ", ".join(f"{k} {v}" for k, v in same.items())
                + f" -> {verdict}"
            )
            del got

        raw, s, g, peak, cpu = run_method(lambda unit=unit: faiss_raw(unit, thr), reps)
        faiss_s[n] = s
        rows.append(Row(n, "faiss range", s, g, raw[0].size, np.unique(raw[1]).size, peak, cpu))
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
            flat, s, g, peak, cpu = run_method(lambda: dedup("flat"), reps)
            rows.append(Row(n, "flat", s, g, len(flat.pairs), flat.n_removed, peak, cpu))
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

    rates_end = all_rates()
    mean = {k: (rates_start[k] + rates_end[k]) / 2 for k in rates_start}
    fp32_keys = [k for k in mean if k.startswith("numpy fp32") or k == "torch fp32"]
    best_fp32 = max(fp32_keys, key=lambda k: mean[k])
    bf16_key = "torch bf16 (bf16 out)"  # the GEMM precision="bf16" runs on the CPU
    header = ["N", "method", "seconds", "cpu s", "x faiss", "x fp32", "GFLOP/s", "CI GEMM"]
    header += ["% CI GEMM"]
    header += ["% best fp32", "% bf16", "pairs", "removed", "peak MiB"]
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
                f"{r.cpu:.1f}",
                f"{faiss_s[r.n] / r.seconds:.2f}x",
                f"{fp32_s[r.n] / r.seconds:.2f}x",
                f"{useful:.1f}",
                f"{r.gemm:.1f}",
                f"{100 * useful / r.gemm:.0f}%",
                f"{100 * useful / mean[best_fp32]:.0f}%",
                f"{100 * useful / mean[bf16_key]:.0f}%" if bf16_key in mean else "-",
                f"{r.pairs}",
                f"{r.removed}",
                f"{r.peak / 2**20:.0f}",
            ]
        )
    print()
    print_rates("GEMM rates at end", rates_end)
    print(f"best float32 GEMM rate (mean of start and end): {best_fp32} {mean[best_fp32]:.1f}")
    if bf16_key in mean:
        print(f"bf16 GEMM rate (mean of start and end): {bf16_key} {mean[bf16_key]:.1f}")
    print()
    print(table(header, body))
    print()
    print("checks:")
    print("\n".join(checks + skipped))
    print(f"\ntotal wall time {time.perf_counter() - wall0:.0f} s")


def all_rates() -> dict[str, float]:
    """Every GEMM rate of the module docstring, GFLOP/s."""
    rates = {f"numpy fp32 CI ({blas_kernel()})": gemm_rate()}
    rate, kernel = numpy_default_rate()
    rates[f"numpy fp32 default ({kernel})"] = rate
    rates.update(torch_rates())
    return rates


def print_rates(title: str, rates: dict[str, float]) -> None:
    shown = "; ".join(f"{k} {v:.1f}" for k, v in rates.items())
    print(f"{title} (GFLOP/s, 2048x512 @ 512x8192, all threads): {shown}")


if __name__ == "__main__":
    main()
