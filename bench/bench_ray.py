"""Tile-parallel scaling on Ray against single-process ``blocked``, at the same N.

    .venv/bin/python bench/bench_ray.py [--n 20000] [--dim 512] [--threshold 0.9]
                                        [--tile-rows 0 (auto)]

Input: ``clustered_unit_vectors(N, D, seed=0)`` (:mod:`synthetic`: CLIP-like rows with
planted near-duplicates).  Each configuration runs in a fresh subprocess so that its BLAS
thread count is set before numpy loads and each Ray cluster is its own:

- ``blocked 1 thread`` / ``blocked 2 threads``: ``dedup_embeddings(E, t,
  backend="blocked")`` with ``OPENBLAS_NUM_THREADS`` (and OMP/MKL) = 1 or 2;
- ``ray 1 CPU`` / ``ray 2 CPUs``: ``dedup_index.distributed.dedup_store(E, t)`` on
  ``ray.init(num_cpus=1 or 2)``, one BLAS thread per task (``threads_per_task=1``), so
  the parallelism is the tasks' alone.  ``ray.init`` is not timed; putting the blocks in
  the object store, the tasks, the tile files and the merge are.

On a 2-core machine with a multi-threaded BLAS the ceiling is the 2-thread ``blocked``
run: Ray can at best match it (same GEMMs, split over processes instead of threads) and
pays per-task overhead, the extra reads of the tiles' blocks and the driver's merge.  The
point is the cost model, not a speed-up on one box: with ``W`` workers the GEMM work per
worker is ``N^2 D / (2 W)`` multiply-adds.  Every run's decisions are checked to be
identical to the first one's (removed rows, pairs, max_similarity bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def _digest(result) -> str:
    import numpy as np

    h = hashlib.sha256()
    for arr in (
        result.removed,
        result.pairs.i,
        result.pairs.j,
        result.pairs.s,
        result.max_similarity,
    ):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def one(spec: dict) -> dict:
    """Run one configuration in this (fresh) process; returns its measurements."""
    from synthetic import clustered_unit_vectors

    from dedup_index import dedup_embeddings

    E = clustered_unit_vectors(spec["n"], spec["dim"], seed=0)
    t = spec["threshold"]
    if spec["kind"] == "blocked":
        dedup_embeddings(E[:2048], t, backend="blocked")  # warm up BLAS
        start = time.perf_counter()
        result = dedup_embeddings(E, t, backend="blocked")
        seconds = time.perf_counter() - start
        info = {}
    else:
        import ray

        from dedup_index.distributed import dedup_store

        ray.init(
            num_cpus=spec["cpus"],
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        dedup_store(E[:2048], t, tile_rows=1024)  # start the workers
        start = time.perf_counter()
        result = dedup_store(E, t, tile_rows=spec["tile_rows"] or None, threads_per_task=1)
        seconds = time.perf_counter() - start
        info = {"tiles": result.info["tiles"], "tile_rows": result.info["tile_rows"]}
        ray.shutdown()
    return {
        "seconds": seconds,
        "digest": _digest(result),
        "removed": result.n_removed,
        "pairs": len(result.pairs),
        **info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--tile-rows", type=int, default=0, help="0: the default choice")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    configs = [("blocked", 1), ("blocked", 2), ("ray", 1), ("ray", 2)]
    rows = []
    for kind, cpus in configs:
        spec = {
            "kind": kind,
            "cpus": cpus,
            "n": args.n,
            "dim": args.dim,
            "threshold": args.threshold,
            "tile_rows": args.tile_rows,
        }
        threads = str(cpus if kind == "blocked" else 1)
        env = dict(
            os.environ,
            OPENBLAS_NUM_THREADS=threads,
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
        )
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append((kind, cpus, json.loads(out.stdout.strip().splitlines()[-1])))
        print(f"  done: {kind} {cpus}: {rows[-1][2]['seconds']:.2f} s", file=sys.stderr)
    base = rows[0][2]["seconds"]
    flops = float(args.n) ** 2 * args.dim  # N^2/2 pairs x D multiply-adds x 2
    print(
        f"N = {args.n}, D = {args.dim}, threshold = {args.threshold}, "
        f"{os.cpu_count()} CPUs; {rows[0][2]['removed']} rows removed, "
        f"{rows[0][2]['pairs']} pairs"
    )
    print(f"{'method':<22}{'seconds':>9}{'vs blocked 1 thread':>21}{'GFLOP/s':>9}  tiles")
    for kind, cpus, r in rows:
        name = f"{kind} {cpus} {'thread' if kind == 'blocked' else 'CPU'}" + (
            "s" if cpus > 1 else ""
        )
        tiles = f"{r['tiles']} of {r['tile_rows']} rows" if "tiles" in r else "-"
        print(
            f"{name:<22}{r['seconds']:>9.2f}{base / r['seconds']:>20.2f}x"
            f"{flops / r['seconds'] / 1e9:>9.1f}  {tiles}"
        )
    same = {r["digest"] for _, _, r in rows}
    print("identical decisions, pairs and max_similarity in every run:", len(same) == 1)


if __name__ == "__main__":
    main()
