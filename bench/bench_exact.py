"""Exact all-pairs search against the machine's GEMM rates: blocked in each precision vs FAISS.

    .venv/bin/python bench/bench_exact.py [--sizes 20000,50000,100000] [--threshold 0.9]
                                          [--precisions fp32,auto] [--skip-flat-above N]
                                          [--repeats-small 3]
    .venv/bin/python bench/bench_exact.py --million [--precisions auto] [--limit-s 1800]
                                          [--max-rss-gib 12]

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

``--million``: instead of the sizes, exact ``blocked`` (each of ``--precisions``, default
``auto``) over the 1,000,000 x 512 on-disk store of ``bench_approx.py --million`` (built
once into ``bench/_out/store_1m`` by :func:`_common.ensure_store`, reused after), streamed
from disk, in this process.  The pairs go to a counting sink that logs progress every
30 s: the highest row block reached, the share of the upper-triangle work done
(``1 - (1 - a/N)^2``), the RSS and the projected total.  A run stops (and the next
precision starts) once its projection passes 1.25x ``--limit-s`` or its time passes
``--limit-s``, printing the rate reached, or once its RSS passes ``--max-rss-gib``
(default 12: the machine is shared).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path

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
        "--precisions",
        default=None,
        help="blocked runs, comma-separated (default fp32,auto; --million: auto)",
    )
    ap.add_argument(
        "--skip-flat-above", type=int, default=None, help="no flat run above this N (time)"
    )
    ap.add_argument("--million", action="store_true", help="blocked over the 1M on-disk store")
    ap.add_argument("--limit-s", type=float, default=None, help="--million: stop past this")
    ap.add_argument(
        "--max-rss-gib", type=float, default=12.0, help="--million: stop above this RSS"
    )
    args = ap.parse_args(argv)
    if args.million:
        run_million([p for p in (args.precisions or "auto").split(",") if p], args)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    thr, d = args.threshold, args.dim
    precisions = [p for p in (args.precisions or "fp32,auto").split(",") if p]
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


class _ProgressSink:
    """A pair sink (``add`` / ``finish``) that keeps the pairs and logs, every
    ``every`` seconds, how far the row blocks have got: row blocks are handed out in
    order, so the highest row of a pair seen is about the current block's start ``a``,
    and ``1 - (1 - a/N)^2`` of the upper-triangle work is done."""

    def __init__(
        self, n: int, limit_s: float | None, every: float = 30.0, max_rss: float = 12 * 2**30
    ) -> None:
        from dedup_index.search.pairs import PairSet

        self.n, self.limit_s, self.every, self.max_rss = n, limit_s, every, max_rss
        self.parts: list = []
        self.empty = PairSet.empty
        self.t0 = self.last = time.perf_counter()
        self.top = 0
        self.stopped: str | None = None

    def add(self, pairs) -> None:
        self.parts.append(pairs)
        if len(pairs):
            self.top = max(self.top, int(np.asarray(pairs.i).max()))
        now = time.perf_counter()
        if now - self.last >= min(self.every, 5.0):
            rss = _rss_bytes()
            if rss > self.max_rss:  # guard the shared machine: stop before it swaps or OOMs
                self.stopped = f"{self.line(now)}; RSS {rss / 2**30:.1f} GiB over the guard"
                raise _Stop(self.stopped)
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.line(now)}, RSS {_rss_bytes() / 2**30:.1f} GiB", flush=True)
            if self.limit_s is not None and self.projected(now) > 1.25 * self.limit_s:
                self.stopped = self.line(now)
                raise _Stop(self.stopped)
            if self.limit_s is not None and now - self.t0 > self.limit_s:
                self.stopped = self.line(now)
                raise _Stop(self.stopped)

    def done(self) -> float:
        return 1.0 - (1.0 - self.top / self.n) ** 2

    def projected(self, now: float) -> float:
        f = self.done()
        return (now - self.t0) / f if f > 0.02 else 0.0

    def line(self, now: float) -> str:
        el = now - self.t0
        return (
            f"  {el:7.0f} s: row blocks at ~{self.top} of {self.n}, {self.done():.1%} of the "
            f"work, projected total {self.projected(now):.0f} s"
        )

    def finish(self):
        from dedup_index.search.pairs import concat_pairsets

        return concat_pairsets(self.parts) if self.parts else self.empty()


class _Stop(Exception):
    pass


def _rss_bytes() -> int:
    """This process's resident set now (``VmRSS``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_million(precisions: list[str], args: argparse.Namespace) -> None:
    """Exact ``blocked`` over the 1M x 512 on-disk store (see the module docstring)."""
    from _common import MiB, disk_usage, ensure_store, peak_rss_bytes

    from dedup_index.search.blocked import blocked_search
    from dedup_index.search.precision import measure_rates
    from dedup_index.store import EmbeddingStore

    print("\n".join(machine_lines()))
    rates_start = all_rates()
    print_rates("GEMM rates at start", rates_start)
    measure_rates()
    t0 = time.perf_counter()
    build = ensure_store(1_000_000)
    used, _ = disk_usage(Path(build["path"]))
    print(
        f"store {build['path']}: {'reused' if build['reused'] else 'built'} "
        f"({time.perf_counter() - t0:.0f} s), {used / 2**30:.2f} GiB on disk",
        flush=True,
    )
    store = EmbeddingStore.open(build["path"])
    n, d = store.shape
    for prec in precisions:
        sink = _ProgressSink(n, args.limit_s, max_rss=args.max_rss_gib * 2**30)
        report: dict = {}
        print(f"blocked precision={prec} over {n} x {d} from the store ...", flush=True)
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            pairs, _, _ = blocked_search(
                store, args.threshold, precision=prec, sink=sink, report=report
            )
        except _Stop as stop:
            el = time.perf_counter() - w0
            print(
                f"STOPPED at {el:.0f} s (limit {args.limit_s:.0f} s): {stop}; "
                f"cpu {time.process_time() - c0:.0f} s; {report.get('precision', '')}",
                flush=True,
            )
            continue
        sec, cpu = time.perf_counter() - w0, time.process_time() - c0
        gf = float(n) ** 2 * d / sec / 1e9
        print(
            f"blocked {prec} ({report.get('precision', '?')}): N={n} {sec:.1f} s "
            f"({sec / 60:.1f} min), cpu {cpu:.0f} s, {gf:.1f} useful GFLOP/s, "
            f"{len(pairs)} pairs, peak RSS {peak_rss_bytes() / MiB:.0f} MiB",
            flush=True,
        )
    print_rates("GEMM rates at end", all_rates())


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
