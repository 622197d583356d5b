"""Persistent index: add throughput, query latency, against rebuilding from scratch.

Usage: python bench/bench_index.py [--base 200000] [--add 20000] [--backends flat,ivf,hnsw]

For each backend, in the same run on the same rows (``bench/synthetic.py``, D = 512,
threshold 0.9): build an index of ``--base`` rows (timed), ``add`` ``--add`` new rows
(timed: rows/s), answer 1000 single-row queries one at a time (p50/p99 latency), and
compare with rebuilding from scratch: one-shot ``dedup_embeddings`` of base + new rows
(``blocked`` for exact, ``partitioned`` above 150k rows).  Approximate backends also get
the recall of the pairs of the added rows against an exact search of those rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_lines, maxrss_bytes, table  # noqa: E402
from synthetic import clustered_unit_vectors  # noqa: E402

from dedup_index import dedup_embeddings  # noqa: E402
from dedup_index.index import DedupIndex  # noqa: E402
from dedup_index.search.cross import cross_search  # noqa: E402

THRESHOLD = 0.9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=200_000)
    ap.add_argument("--add", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--backends", default="flat,ivf,hnsw")
    ap.add_argument(
        "--store",
        default=None,
        help="base rows from an EmbeddingStore (e.g. bench/_out/store_1m); new rows are then "
        "30%% near-copies of base rows and 70%% fresh rows",
    )
    args = ap.parse_args(argv)
    print("\n".join(machine_lines()))
    if args.store:
        from dedup_index.store import EmbeddingStore

        base = EmbeddingStore.open(args.store).to_array()
        n, m = len(base), args.add
        rng = np.random.default_rng(3)
        k = int(0.3 * m)
        near = base[rng.choice(n, k, replace=False)] + 0.01 * rng.standard_normal(
            (k, base.shape[1]), dtype=np.float32
        )
        fresh = clustered_unit_vectors(m - k, 512, seed=1)
        new = np.concatenate([near / np.linalg.norm(near, axis=1, keepdims=True), fresh])
        new = new[rng.permutation(m)].astype(np.float32)
        E = np.concatenate([base, new])
        print(f"data: store {args.store} ({n} rows) + {m} new rows (30% near-copies of base rows)")
    else:
        n, m = args.base, args.add
        E = clustered_unit_vectors(n + m, 512, seed=0)
        base, new = E[:n], E[n:]
        print(f"data: clustered_unit_vectors({n + m}, 512); base {n}, add {m}")
    print(f"threshold {THRESHOLD}")

    t0 = time.perf_counter()
    backend = "blocked" if n + m <= 150_000 else "partitioned"
    rebuilt = dedup_embeddings(E, THRESHOLD, backend=backend, normalize=False, score="pairs")
    rebuild_s = time.perf_counter() - t0
    print(f"rebuild from scratch: {backend} over {n + m} rows, {rebuild_s:.1f} s", flush=True)
    # Exact pairs of (a sample of) the new rows with the old rows, for the recall column.
    sample = np.sort(np.random.default_rng(2).choice(m, size=min(m, 2000), replace=False))
    exact_new = cross_search(new[sample], base, THRESHOLD)
    exact = set(zip(exact_new.b.tolist(), sample[exact_new.q].tolist(), strict=True))

    rows = []
    for name in [b for b in args.backends.split(",") if b]:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-index-{name}-"))
        try:
            t0 = time.perf_counter()
            index = DedupIndex.create(folder / "i", 512, THRESHOLD, backend=name)
            index.add(base)
            build_s = time.perf_counter() - t0
            print(f"{name}: built over {n} rows in {build_s:.1f} s", flush=True)
            t0 = time.perf_counter()
            added = index.add(new)
            add_s = time.perf_counter() - t0
            print(f"{name}: added {m} rows in {add_s:.1f} s", flush=True)
            pairs = index.pairs()
            new_old = pairs.j >= n
            sampled = np.zeros(m, bool)
            sampled[sample] = True
            cross_pairs = new_old & (pairs.i < n)
            ci, cj = pairs.i[cross_pairs], pairs.j[cross_pairs] - n
            keep = sampled[cj]
            found = set(zip(ci[keep].tolist(), cj[keep].tolist(), strict=True))
            recall = len(found & exact) / len(exact) if exact else 1.0
            lat = []
            rng = np.random.default_rng(1)
            for r in rng.choice(n + m, size=args.queries, replace=False):
                t0 = time.perf_counter()
                index.query(E[r])
                lat.append(time.perf_counter() - t0)
            index.close()
            lat_ms = np.array(lat) * 1e3
            rows.append(
                [
                    name,
                    f"{build_s:.1f}",
                    f"{add_s:.2f}",
                    f"{m / add_s:,.0f}",
                    f"{np.percentile(lat_ms, 50):.2f}",
                    f"{np.percentile(lat_ms, 99):.2f}",
                    f"{rebuild_s / add_s:.1f}x",
                    f"{recall:.4f}",
                    str(added.n_removed),
                    f"{maxrss_bytes() / 2**30:.2f}",
                ]
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    header = [
        "backend",
        "build s",
        "add s",
        "add rows/s",
        "query p50 ms",
        "query p99 ms",
        "rebuild/add",
        "recall new",
        "removed",
        "peak GiB",
    ]
    print(table(header, rows, left=(0,)))
    print(
        f"rebuild from scratch: {backend} over {n + m} rows, {rebuild_s:.1f} s, "
        f"{rebuilt.n_removed} removed"
    )


if __name__ == "__main__":
    main()
