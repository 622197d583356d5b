"""Peak memory: 1M x 512 partitioned from an on-disk store; exact blocked, store vs array.

    .venv/bin/python bench/bench_memory.py [--rerun] [--exact-n 100000]

1. The store-backed 1M run: ``dedup_embeddings(store, 0.9, backend="partitioned")`` on
   ``bench/_out/store_1m`` (``clustered_unit_vectors(1_000_000, 512, seed=0)``) in a fresh
   process.  ``bench_approx.py --million`` measures exactly this and keeps its record in
   ``bench/_out/million.json``; this script prints that record's memory table (RSS at
   start, after opening the store, peak) and the store's size on disk, and reruns the
   measurement only when there is no record or ``--rerun`` is given.
2. Exact ``blocked`` at ``--exact-n`` rows, each in a fresh process: from an on-disk store
   (tiles read from the mapped shards) and from an in-memory array (``np.load`` of the
   same rows), with the peak RSS of each.

RSS figures are of the worker process: ``start`` after the imports, ``loaded`` after
opening the store or loading the array, ``peak`` = ``VmHWM`` (``ru_maxrss`` of a
subprocess also counts its parent: see ``_common.maxrss_bytes``); ``anon`` and ``file`` are
the anonymous and file-backed (mapped store pages, which the kernel may drop under
pressure) parts of the RSS at the highest sampled point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import (
    MiB,
    disk_usage,
    ensure_data,
    ensure_store,
    gemm_rate,
    machine_lines,
    run_worker,
    table,
)
from bench_approx import MILLION, MILLION_JSON, THRESHOLD


def million_record(rerun: bool) -> tuple[dict, str]:
    if MILLION_JSON.exists() and not rerun:
        rec = json.loads(MILLION_JSON.read_text())
        if Path(rec["build"]["path"]).exists():
            return rec, "from bench/_out/million.json (bench_approx --million)"
    build = ensure_store(MILLION)
    t0 = time.perf_counter()
    rec = run_worker(
        {"task": "dedup", "threshold": THRESHOLD, "store": build["path"], "backend": "partitioned"}
    )
    rec["build"] = build
    rec["store_used"], rec["store_apparent"] = disk_usage(Path(build["path"]))
    return rec, f"measured now ({time.perf_counter() - t0:.0f} s wall)"


def mib(x: float) -> str:
    return f"{x / MiB:.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rerun", action="store_true", help="measure the 1M run again")
    ap.add_argument("--exact-n", type=int, default=100_000)
    args = ap.parse_args(argv)
    print("\n".join(machine_lines()))
    print()

    rec, where = million_record(args.rerun)
    n, d = rec["n"], 512
    print(f"1. partitioned, {n} x {d} from an on-disk store, fresh process; record {where}")
    print(f"   search time {rec['seconds']:.1f} s; partitions: {rec['summary']}")
    rows = [
        ["RSS at start (interpreter + numpy, faiss, dedup_index)", mib(rec["rss_start"])],
        ["RSS after opening the store", mib(rec["rss_loaded"])],
        ["peak RSS (VmHWM)", mib(rec["peak_rss"])],
        ["  anonymous part at the sampled peak", mib(rec["peak_anon_part"])],
        ["  file-backed part at the sampled peak (mapped store)", mib(rec["peak_file_part"])],
        ["peak anonymous RSS (sampled)", mib(rec["peak_anon"])],
        ["peak RSS above the RSS after opening", mib(rec["peak_rss"] - rec["rss_loaded"])],
        ["float32 rows, N x D x 4 bytes (for scale)", mib(n * d * 4)],
        ["store on disk (allocated)", mib(rec["store_used"])],
        ["store on disk (apparent size)", mib(rec["store_apparent"])],
    ]
    print(table(["what", "MiB"], rows, left=(0,)))
    print(
        f"   target peak RSS < 4 GB: {rec['peak_rss'] / 1e9:.2f} GB -> "
        f"{'MET' if rec['peak_rss'] < 4e9 else 'NOT MET'}"
    )
    print()

    m = args.exact_n
    print(f"2. exact blocked at N = {m}, each in a fresh process", flush=True)
    st = ensure_store(m)
    npy = ensure_data(m)
    out = []
    for label, spec in (
        ("store (on disk)", {"store": st["path"]}),
        ("array (np.load)", {"npy": str(npy)}),
    ):
        g0 = gemm_rate()
        r = run_worker({"task": "dedup", "threshold": THRESHOLD, "backend": "blocked", **spec})
        r["gemm"] = (g0 + gemm_rate()) / 2
        print(f"   {label}: {r['seconds']:.1f} s, peak {mib(r['peak_rss'])} MiB", flush=True)
        out.append((label, r))
    header = ["N", "input", "seconds", "GEMM GF/s", "start MiB", "loaded MiB", "peak MiB"]
    header += ["above load", "anon MiB", "file MiB", "pairs", "removed"]
    body = [
        [
            f"{r['n']}",
            label,
            f"{r['seconds']:.1f}",
            f"{r['gemm']:.0f}",
            mib(r["rss_start"]),
            mib(r["rss_loaded"]),
            mib(r["peak_rss"]),
            mib(r["peak_rss"] - r["rss_loaded"]),
            mib(r["peak_anon_part"]),
            mib(r["peak_file_part"]),
            f"{r['pairs']}",
            f"{r['removed']}",
        ]
        for label, r in out
    ]
    print()
    print(table(header, body))
    print(
        f"   rows: {m} x {d} float32 = {m * d * 4 / MiB:.0f} MiB; "
        f"store build: generate {st['generate_s']:.1f} s + write {st['write_s']:.1f} s"
        + (" (reused)" if st["reused"] else "")
    )


if __name__ == "__main__":
    main()
