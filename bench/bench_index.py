"""Persistent index: add cost against rebuilding, query latency against FAISS's own search.

Usage: python bench/bench_index.py [--base 200000] [--add 20000] [--backends ivf,hnsw,blocked]
                                   [--queries 1000] [--store bench/_out/store_1m] [--no-rebuild]
       python bench/bench_index.py --latency-only 1000000 [--nprobe 12] [--rounds 3]
                                   [--cache /tmp/bench1m]  (build the 1M index once, reuse it)
       python bench/bench_index.py --from-store 10000000 [--add 100000] [--batch-rows 262144]
                                   [--index-dir DIR] [--keep] [--reuse]  (issue 15 item 4)

``--from-store N``: an ``ivf`` index with float16 rows built from the float16 store of N
rows (``_common.ensure_store(N, dtype="float16")``, built first if missing) by
``DedupIndex.add_store`` (from 1M rows in one pass: one ``partitioned`` search, its
centroids the coarse quantizer; ``--batch-rows`` then unused; below, in batches), with RSS
sampled (``_common.MemSampler``: peak VmRSS
and its anonymous / file-backed parts); then ``--add`` new rows (30% near-copies of store
rows, 70% fresh) added in one ``add`` (timed, sampled); then the recall of the build's
pairs on a sample of 1000 rows (``search.recall.measure_recall``) and of the add's new
pairs on a sample of 2000 new rows (``exact_pairs_of_rows``), both against exact search.

For each backend, in the same run on the same rows (``bench/synthetic.py``, D = 512,
threshold 0.9; or ``--store``: base rows from an EmbeddingStore, new rows 30% near-copies
of base rows):

- build: ``add`` the ``--base`` rows, then ``compact`` (one segment; for ``ivf`` the
  coarse quantizer retrained with ``nlist`` grown to the rows), both timed;
- add: ``add`` the ``--add`` new rows (timed: rows/s, and ``rebuild s / add s`` against
  one-shot ``dedup_embeddings`` of base + new rows: ``partitioned`` above 150k rows, else
  ``blocked``; timed first, and again at the end for the drift); approximate backends
  get the recall of the new-to-old pairs of a sample of 2000 new rows against an exact
  search of them; the exact backend gets the fraction
  of the machine's GEMM rate (``_common.gemm_rate``, measured just before and after the
  add, GFLOP/s) that its ``Q x N + Q x Q / 2`` products reach;
- query: ``--queries`` single-row ``DedupIndex.query`` calls (p50/p99 ms) and, on the same
  FAISS index, FAISS's own ``range_search`` of the same rows (p50/p99 ms), and the recall
  of the query hits against an exact search;
- compact again after the add (timed).

The machine is shared: compare numbers within one run only.
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

from _common import gemm_rate, machine_lines, maxrss_bytes, table  # noqa: E402
from synthetic import clustered_unit_vectors  # noqa: E402

from dedup_index import dedup_embeddings  # noqa: E402
from dedup_index.index import DedupIndex  # noqa: E402
from dedup_index.search.canonical import candidate_delta  # noqa: E402
from dedup_index.search.cross import cross_search  # noqa: E402

THRESHOLD = 0.9


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def data(args) -> tuple[np.ndarray, np.ndarray, str]:
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
        return base, new, f"store {args.store} ({n} rows) + {m} new rows (30% near-copies)"
    n, m = args.base, args.add
    E = clustered_unit_vectors(n + m, 512, seed=0)
    return E[:n], E[n:], f"clustered_unit_vectors({n + m}, 512); base {n}, add {m}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=200_000)
    ap.add_argument("--add", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--backends", default="ivf,hnsw,blocked")
    ap.add_argument("--store", default=None, help="base rows from an EmbeddingStore")
    ap.add_argument("--no-rebuild", action="store_true", help="skip the one-shot rebuild")
    ap.add_argument("--nprobe", type=int, default=None, help="ivf lists probed (default 12)")
    ap.add_argument(
        "--no-compact", action="store_true", help="no compactions (hnsw: each is a rebuild)"
    )
    ap.add_argument(
        "--latency-only",
        type=int,
        default=None,
        metavar="N",
        help="only single-row query latency and recall on N rows (no adds, no rebuild)",
    )
    ap.add_argument(
        "--niter", type=int, default=None, help="--latency-only: k-means iterations (default 20)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="--latency-only: rounds of splitting over-full IVF lists (default "
        "dedup_index.index.ann.BALANCE_ROUNDS)",
    )
    ap.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="--latency-only: keep the rows and each FAISS index built in DIR and reuse "
        "them on later runs with the same N, backend, nlist and niter (a 1M build takes "
        "minutes)",
    )
    ap.add_argument(
        "--from-store",
        type=int,
        default=None,
        metavar="N",
        help="build an ivf float16 index from the float16 store of N rows, add --add rows",
    )
    ap.add_argument("--batch-rows", type=int, default=None, help="--from-store: rows per add")
    ap.add_argument("--index-dir", default=None, help="--from-store: where to build the index")
    ap.add_argument("--keep", action="store_true", help="--from-store: keep the index")
    ap.add_argument(
        "--reuse", action="store_true", help="--from-store: reuse a complete --index-dir build"
    )
    args = ap.parse_args(argv)
    print("\n".join(machine_lines()))
    if args.latency_only:
        latency_only(args)
        return
    if args.from_store:
        from_store(args)
        return
    base, new, what = data(args)
    n, m = len(base), len(new)
    print(f"data: {what}; threshold {THRESHOLD}", flush=True)
    gemm = gemm_rate()
    print(f"GEMM rate (numpy float32, this run): {gemm:.0f} GFLOP/s", flush=True)

    rebuild_s = None
    if not args.no_rebuild:
        E = np.concatenate([base, new])
        method = "blocked" if n + m <= 150_000 else "partitioned"
        t0 = time.perf_counter()
        rebuilt = dedup_embeddings(E, THRESHOLD, backend=method, normalize=False, score="pairs")
        rebuild_s = time.perf_counter() - t0
        del E
        print(
            f"rebuild from scratch: {method} over {n + m} rows, {rebuild_s:.1f} s, "
            f"{rebuilt.n_removed} removed",
            flush=True,
        )
    # Exact new-to-old pairs of a sample of the new rows (recall of the add).
    rng = np.random.default_rng(2)
    sample = np.sort(rng.choice(m, size=min(m, 2000), replace=False))
    exact_new = cross_search(new[sample], base, THRESHOLD)
    exact = set(zip(exact_new.b.tolist(), sample[exact_new.q].tolist(), strict=True))
    # Query rows: new rows' near-copies of base rows and plain rows, and their exact hits.
    queries = np.concatenate([base, new])[rng.choice(n + m, size=args.queries, replace=False)]

    rows, notes = [], []
    for name in [b for b in args.backends.split(",") if b]:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-index-{name}-"))
        options = {} if args.nprobe is None or name != "ivf" else {"nprobe": args.nprobe}
        try:
            index = DedupIndex.create(
                folder / "i", 512, THRESHOLD, backend=name, backend_options=options
            )
            t0 = time.perf_counter()
            index.add(base)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if not args.no_compact:
                index.compact(retain_seconds=0)
            compact_s = time.perf_counter() - t0
            print(
                f"{name}: built over {n} rows in {build_s:.1f} s, compacted in {compact_s:.1f} s "
                f"({index.stats()['nlist'] or '-'} lists)",
                flush=True,
            )
            rate = gemm_rate() if index.exact else None  # the machine drifts: measure
            t0 = time.perf_counter()  # the GEMM rate next to the add, before and after
            added = index.add(new)
            add_s = time.perf_counter() - t0
            if rate is not None:
                rate = (rate + gemm_rate()) / 2
            pairs = index.pairs()
            cross = (pairs.j >= n) & (pairs.i < n)
            ci, cj = pairs.i[cross], pairs.j[cross] - n
            keep = np.isin(cj, sample)
            found = set(zip(ci[keep].tolist(), cj[keep].tolist(), strict=True))
            recall = len(found & exact) / len(exact) if exact else 1.0
            gemm_pct = ""
            if index.exact:
                flops = 2.0 * m * n * 512 + m * m * 512
                gemm_pct = f"{100 * flops / add_s / 1e9 / rate:.0f}% of {rate:.0f}"
            print(f"{name}: added {m} rows in {add_s:.2f} s (recall {recall:.4f})", flush=True)

            lat, hits = [], []
            for q in queries:
                t0 = time.perf_counter()
                hits.append(index.query(q)[0])
                lat.append(time.perf_counter() - t0)
            q50, q99 = percentiles(lat)
            total = len(index)
            truth = cross_search(queries, index._view.rows, THRESHOLD, base_best=False)
            want = set(zip(truth.q.tolist(), truth.b.tolist(), strict=True))
            keys = index.keys()
            row_of = {k: r for r, k in enumerate(keys)}
            got = {(qi, row_of[k]) for qi, h in enumerate(hits) for k, _ in h}
            q_recall = len(got & want) / len(want) if want else 1.0
            f50 = f99 = float("nan")
            ann = index._view.ann
            if ann is not None and ann.segments:
                seg = ann.segments[0].index
                radius = THRESHOLD - candidate_delta(512)
                flat = []
                for q in queries:
                    x = np.ascontiguousarray(q[None, :])
                    t0 = time.perf_counter()
                    seg.range_search(x, radius)
                    flat.append(time.perf_counter() - t0)
                f50, f99 = percentiles(flat)
            imbalance = "-"
            if ann is not None and name == "ivf":
                import faiss

                sizes = [faiss.extract_index_ivf(s.index).invlists for s in ann.segments]
                imbalance = f"{sizes[0].imbalance_factor():.2f}"
            t0 = time.perf_counter()
            stats = index.compact(retain_seconds=0) if not args.no_compact else index.stats()
            compact2_s = time.perf_counter() - t0
            index.close()
            rows.append(
                [
                    name,
                    f"{build_s:.1f}",
                    f"{compact_s:.1f}",
                    f"{add_s:.2f}",
                    f"{m / add_s:,.0f}",
                    "-" if rebuild_s is None else f"{rebuild_s / add_s:.1f}x",
                    f"{recall:.4f}",
                    gemm_pct or "-",
                    f"{q50:.2f}",
                    f"{q99:.2f}",
                    f"{f50:.2f}",
                    f"{f99:.2f}",
                    f"{q_recall:.4f}",
                    f"{compact2_s:.1f}",
                    str(added.n_removed),
                    f"{maxrss_bytes() / 2**30:.2f}",
                ]
            )
            notes.append(
                f"{name}: {total} rows after the add, {stats['nlist'] or '-'} lists after the "
                f"second compaction, {stats['bytes_on_disk'] / 2**20:.0f} MiB on disk; "
                f"{len(ann.segments) if ann else 0} FAISS segment(s) while queried, list "
                f"imbalance factor (FAISS: 1 = even) {imbalance}"
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if rebuild_s is not None:  # again: the machine drifts, so rebuild/add uses both
        E = np.concatenate([base, new])
        t0 = time.perf_counter()
        dedup_embeddings(E, THRESHOLD, backend=method, normalize=False, score="pairs")
        again = time.perf_counter() - t0
        print(f"rebuild again after the backends: {again:.1f} s (first {rebuild_s:.1f} s)")
    header = [
        "backend",
        "build s",
        "compact s",
        "add s",
        "add rows/s",
        "rebuild/add",
        "recall new",
        "% GEMM",
        "query p50 ms",
        "p99 ms",
        "faiss p50 ms",
        "p99 ms",
        "query recall",
        "compact 2 s",
        "removed",
        "peak GiB",
    ]
    print(table(header, rows, left=(0,)))
    print("\n".join(notes))


def from_store(args) -> None:
    """Issue 15 item 4: build from an on-disk float16 store in bounded memory, add, recall."""
    import json

    from _common import MemSampler, ensure_store, status_kib

    from dedup_index.index.core import STORE_BATCH_ROWS
    from dedup_index.search.ivf import default_nlist
    from dedup_index.search.recall import exact_pairs_of_rows, measure_recall
    from dedup_index.store import EmbeddingStore

    n, m = args.from_store, args.add
    rec = ensure_store(n, dtype="float16")
    print(f"store: {rec['path']} ({'reused' if rec['reused'] else 'built'})", flush=True)
    folder = Path(args.index_dir or tempfile.mkdtemp(prefix="bench-index-store-")) / "i"
    options = {"nlist": default_nlist(n)}
    if args.nprobe is not None:
        options["nprobe"] = args.nprobe
    batch = args.batch_rows or STORE_BATCH_ROWS

    def gib(kib: int) -> str:
        return f"{kib / 2**20:.2f}"

    def progress(done: int, total: int) -> None:
        s = status_kib()
        print(
            f"  {done}/{total} rows, {time.perf_counter() - t0:.0f} s, RSS {gib(s['VmRSS'])} "
            f"GiB (anon {gib(s['RssAnon'])}, file {gib(s['RssFile'])})",
            flush=True,
        )

    reuse = args.reuse and (folder / "manifest.json").exists()
    with MemSampler() as build_mem:
        t0 = time.perf_counter()
        if reuse:
            index = DedupIndex.open(folder, mode="a")
            print(f"index reused: {folder} ({len(index)} rows)", flush=True)
        else:
            if folder.exists():
                shutil.rmtree(folder)
            index = DedupIndex.create(
                folder, 512, THRESHOLD, backend="ivf", dtype="float16", backend_options=options
            )
        if len(index) < n:
            store = EmbeddingStore.open(rec["path"])
            index.add_store(store, batch_rows=batch, start=len(index), progress=progress)
            store.close()
        build_s = time.perf_counter() - t0
    stats = index.stats()
    print(
        f"built: {len(index)} rows in {build_s:.0f} s, {stats['ann_segments']} segments, "
        f"{stats['nlist']} lists, {stats['pairs']} pairs, {stats['bytes_on_disk'] / 2**30:.2f} "
        f"GiB on disk; peak RSS {gib(build_mem.peak['VmRSS'])} GiB (anon "
        f"{gib(build_mem.peak['RssAnon'])}, file {gib(build_mem.peak['RssFile'])}; peak anon "
        f"{gib(build_mem.peak_anon)})",
        flush=True,
    )
    t1 = time.perf_counter()
    build_recall = measure_recall(index._view.rows, THRESHOLD, index.pairs(), sample=1000)
    print(f"build recall on a sample: {build_recall} ({time.perf_counter() - t1:.0f} s)")
    # New rows: 30% near-copies of indexed rows, 70% fresh rows of the same generator.
    rng = np.random.default_rng(3)
    k = int(0.3 * m)
    near = np.asarray(index._view.rows[np.sort(rng.choice(n, k, replace=False))])
    near += 0.01 * rng.standard_normal(near.shape, dtype=np.float32)
    fresh = clustered_unit_vectors(m - k, 512, seed=12345)
    new = np.concatenate([near / np.linalg.norm(near, axis=1, keepdims=True), fresh])
    new = new[rng.permutation(m)].astype(np.float32)
    del near, fresh
    n0 = len(index)
    index._view.rows.release_pages()  # the recall's reads: not the add's memory
    with MemSampler() as add_mem:
        t0 = time.perf_counter()
        added = index.add(new, keys=[f"new-{r}" for r in range(m)])
        add_s = time.perf_counter() - t0
    print(
        f"added {m} rows in {add_s:.1f} s ({added.n_removed} removed); peak RSS "
        f"{gib(add_mem.peak['VmRSS'])} GiB (anon {gib(add_mem.peak['RssAnon'])}, file "
        f"{gib(add_mem.peak['RssFile'])}; peak anon {gib(add_mem.peak_anon)})",
        flush=True,
    )
    t1 = time.perf_counter()
    rows = index._view.rows
    sample = n0 + np.sort(rng.choice(m, size=min(m, 2000), replace=False))
    exact = exact_pairs_of_rows(rows, THRESHOLD, sample)
    want = set(zip(exact.i.tolist(), exact.j.tolist(), strict=True))
    pairs = index.pairs()
    mine = np.isin(pairs.j, sample) | np.isin(pairs.i, sample)
    got = set(zip(pairs.i[mine].tolist(), pairs.j[mine].tolist(), strict=True))
    old_new = {p for p in want if p[0] < n0}
    add_recall = len(got & want) / len(want) if want else 1.0
    old_recall = len(got & old_new) / len(old_new) if old_new else 1.0
    print(
        f"add recall on {sample.size} new rows: {add_recall:.4f} of {len(want)} pairs "
        f"(new-to-old {old_recall:.4f} of {len(old_new)}), precision "
        f"{len(got & want) / max(1, len(got)):.4f} ({time.perf_counter() - t1:.0f} s)",
        flush=True,
    )
    summary = {
        "n": n,
        "add": m,
        "batch_rows": batch,
        "options": options,
        "build_s": round(build_s, 1),
        "build_reused": reuse,
        "build_peak_rss_gib": float(gib(build_mem.peak["VmRSS"])),
        "build_peak_anon_gib": float(gib(build_mem.peak_anon)),
        "build_peak_file_gib": float(gib(build_mem.peak["RssFile"])),
        "build_recall": round(build_recall.recall, 4),
        "build_recall_pairs": build_recall.n_exact,
        "add_s": round(add_s, 1),
        "add_peak_rss_gib": float(gib(add_mem.peak["VmRSS"])),
        "add_peak_anon_gib": float(gib(add_mem.peak_anon)),
        "add_recall": round(add_recall, 4),
        "add_recall_new_to_old": round(old_recall, 4),
        "add_recall_pairs": len(want),
        "segments": stats["ann_segments"],
        "nlist": stats["nlist"],
        "disk_gib": round(stats["bytes_on_disk"] / 2**30, 2),
    }
    print(json.dumps(summary))
    index.close()
    if not args.keep:
        shutil.rmtree(folder.parent if args.index_dir is None else folder, ignore_errors=True)


def latency_only(args) -> None:
    """Single-row query latency at N rows through what ``DedupIndex.query`` runs on a
    compacted index (one FAISS segment over every row, ``nlist = default_nlist(N)``),
    against FAISS's own ``range_search`` on the same index; recall against an exact
    search of the queries.  Skips the index's own dedup of the N rows (an hour at 1M on
    two cores): the index is built as ``compact`` builds it."""
    import faiss

    from dedup_index.index.ann import AnnIndex
    from dedup_index.search.ivf import default_nlist
    from dedup_index.store import SegmentedRows

    n = args.latency_only
    cache = Path(args.cache) if args.cache else None
    t0 = time.perf_counter()
    if cache is not None and (cache / f"rows-{n}.npy").exists():
        E = np.load(cache / f"rows-{n}.npy", mmap_mode="r")
        E = np.ascontiguousarray(E)
        print(f"data: clustered_unit_vectors({n}, 512) from {cache}", flush=True)
    else:
        E = clustered_unit_vectors(n, 512, seed=0)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cache / f"rows-{n}.npy", E)
    print(f"data: clustered_unit_vectors({n}, 512) in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = SegmentedRows([E], 512)
    rng = np.random.default_rng(1)
    queries = E[rng.choice(n, size=args.queries, replace=False)]
    queries = queries + 0.01 * rng.standard_normal(queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = cross_search(queries, E, THRESHOLD, base_best=False)
    want = set(zip(truth.q.tolist(), truth.b.tolist(), strict=True))
    out = []
    for name in [b for b in args.backends.split(",") if b in ("ivf", "hnsw")]:
        options = {} if args.nprobe is None else {"nprobe": args.nprobe}
        if args.niter:
            options["niter"] = args.niter  # k-means iterations of the balanced quantizer
        if args.rounds is not None:
            options["balance_rounds"] = args.rounds
        empty = AnnIndex(name, options)
        saved = None
        if cache is not None:
            rounds = "default" if args.rounds is None else args.rounds
            saved = cache / f"{name}-{n}-niter{args.niter or 'default'}-rounds{rounds}.faiss"
        t0 = time.perf_counter()
        if saved is not None and saved.exists():
            index = faiss.read_index(str(saved))
            print(f"{name}: index read from {saved}", flush=True)
        elif name == "ivf":
            index = empty.build_segment(rows, nlist=default_nlist(n), fresh=True)
        else:
            index = empty.build_segment(rows)
        build_s = time.perf_counter() - t0
        if saved is not None and not saved.exists():
            faiss.write_index(index, str(saved))
        ann = empty.with_segment(0, n, index)
        print(f"{name}: built over {n} rows in {build_s:.0f} s", flush=True)
        lat, faiss_lat, got = [], [], set()
        radius = THRESHOLD - candidate_delta(512)
        for k, q in enumerate(queries):
            x = np.ascontiguousarray(q[None, :])
            t0 = time.perf_counter()
            found = ann.search(x, rows, THRESHOLD, None, nearest=False)
            lat.append(time.perf_counter() - t0)
            got.update((k, int(b)) for b in found.b)
            t0 = time.perf_counter()
            index.range_search(x, radius)
            faiss_lat.append(time.perf_counter() - t0)
        q50, q99 = percentiles(lat)
        f50, f99 = percentiles(faiss_lat)
        recall = len(got & want) / len(want) if want else 1.0
        imbalance = "-"
        if name == "ivf":
            imbalance = f"{faiss.extract_index_ivf(index).invlists.imbalance_factor():.2f}"
        out.append(
            [
                name,
                str(n),
                str(getattr(index, "nlist", "-")),
                f"{build_s:.0f}",
                f"{q50:.2f}",
                f"{q99:.2f}",
                f"{f50:.2f}",
                f"{f99:.2f}",
                f"{recall:.4f} ({len(want)})",
                imbalance,
            ]
        )
    header = ["backend", "N", "nlist", "build s", "p50 ms", "p99 ms", "faiss p50", "faiss p99"]
    print(table([*header, "recall (pairs)", "imbalance"], out, left=(0,)))


if __name__ == "__main__":
    main()
