"""Where an add's memory goes: add new rows to an existing index, sampling RSS and the main
thread's stack every 0.5 s.

Usage: python bench/index_add_memory.py INDEX [--rows 100000] [--tag p2] [--out FILE]

New rows as ``bench_index.py --from-store`` makes them (30% near-copies of indexed rows,
70% fresh), keys ``TAG-0 ...`` (a new tag each run: the index keeps its rows).  Prints
the open and add times with RSS (anonymous / file-backed) after each, the samples at the
peaks with the innermost frames, and with ``--out`` writes every sample as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import status_kib  # noqa: E402
from synthetic import clustered_unit_vectors  # noqa: E402

from dedup_index.index import DedupIndex  # noqa: E402


def mib() -> dict[str, int]:
    return {k: v // 1024 for k, v in status_kib().items() if k in ("VmRSS", "RssAnon", "RssFile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tag", default="mem")
    parser.add_argument("--out")
    args = parser.parse_args()
    main_thread = threading.main_thread().ident
    samples: list = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            frame = sys._current_frames().get(main_thread)
            where = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack(frame)[-6:]]
            samples.append((time.perf_counter(), mib(), where))
            time.sleep(0.5)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    index = DedupIndex.open(args.index, mode="a")
    t1 = time.perf_counter()
    print(f"open {t1 - t0:.1f} s, {mib()} MiB", flush=True)
    n, m = len(index), args.rows
    rng = np.random.default_rng(7)
    k = int(0.3 * m)
    near = np.asarray(index._view.rows[np.sort(rng.choice(n, k, replace=False))])
    near += 0.01 * rng.standard_normal(near.shape, dtype=np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    new = np.concatenate([near, clustered_unit_vectors(m - k, index.dim, seed=999)])
    new = new[rng.permutation(m)].astype(np.float32)
    del near
    index._view.rows.release_pages()
    t2 = time.perf_counter()
    added = index.add(new, keys=[f"{args.tag}-{r}" for r in range(m)])
    t3 = time.perf_counter()
    print(f"add {m} rows {t3 - t2:.1f} s, {added.n_removed} removed, {mib()} MiB", flush=True)
    stop.set()
    sampler.join()
    for field in ("VmRSS", "RssAnon"):
        at = max(samples, key=lambda s: s[1][field])
        print(f"peak {field}: {at[1]} MiB at {' < '.join(reversed(at[2][-3:]))}")
    if args.out:
        Path(args.out).write_text(json.dumps([(round(t - t0, 1), s, w) for t, s, w in samples]))
    index.close()


if __name__ == "__main__":
    main()
