"""Append throughput of the embedding store: format 1 (sparse preallocated ``.npy``
shards, no checksums) against format 2 (growing shards, SHA-256 per 1 MiB block), same
run, same data, interleaved so machine load hits both alike (issue 13, item 7).

    .venv/bin/python bench/store_append.py --rows 200000 --dim 512 --batch 1024 --repeats 3

The format-1 implementation is loaded from git (``OLD_COMMIT``) into the package as a
sibling module, so both run the same validation and normalisation code.  Also reports the
disk each store takes and a full read with verification (format 2 hashes every block on
first read).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OLD_COMMIT = "0a74e73"  # the last commit with format-1 stores


def load_old():
    src = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:dedup_index/store/embeddings.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp()) / "embeddings_format1.py"
    tmp.write_text(src)
    import dedup_index.store  # noqa: F401 - the parent package of the loaded module

    spec = importlib.util.spec_from_file_location("dedup_index.store.embeddings_format1", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EmbeddingStore


def run(
    cls, folder: Path, x: np.ndarray, batch: int, keys: bool
) -> tuple[float, float, int, float, float]:
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    c0 = time.process_time()
    with cls.create(folder, x.shape[1]) as store:
        for a in range(0, x.shape[0], batch):
            part = x[a : a + batch]
            store.append(part, [f"img-{r}.jpg" for r in range(a, a + len(part))] if keys else None)
        disk = store.nbytes_on_disk
    append_s = time.perf_counter() - t0
    append_cpu = time.process_time() - c0
    t0 = time.perf_counter()
    store = cls.open(folder)
    store[x.shape[0] // 2]  # open and read one row (format 2: hashes one 1 MiB block)
    open_s = time.perf_counter() - t0
    store.close()
    t0 = time.perf_counter()
    with cls.open(folder) as store:
        got = store.to_array()
        if keys:
            store.keys()
    read_s = time.perf_counter() - t0
    assert got.shape == x.shape
    return append_s, read_s, disk, append_cpu, open_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-keys", action="store_true")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args()
    from dedup_index.search.canonical import as_unit_float32
    from dedup_index.store import EmbeddingStore

    old = load_old()
    x = as_unit_float32(np.random.default_rng(0).standard_normal((args.rows, args.dim)))
    root = Path(args.dir or tempfile.mkdtemp(prefix="store-append-"))
    results: dict[str, list[tuple[float, float, int, float, float]]] = {
        "format 1": [],
        "format 2": [],
    }
    for _ in range(args.repeats):
        for name, cls in (("format 1", old), ("format 2", EmbeddingStore)):
            results[name].append(
                run(cls, root / name.replace(" ", ""), x, args.batch, not args.no_keys)
            )
    shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.rows} x {args.dim} float32, batches of {args.batch}, keys={not args.no_keys}, "
        f"{args.repeats} interleaved repeats (median)"
    )
    for name, rs in results.items():
        append_s = float(np.median([r[0] for r in rs]))
        read_s = float(np.median([r[1] for r in rs]))
        cpu_s = float(np.median([r[3] for r in rs]))
        open_ms = 1000 * float(np.median([r[4] for r in rs]))
        print(
            f"{name}: append {args.rows / append_s:,.0f} rows/s ({append_s:.2f} s wall, "
            f"{cpu_s:.2f} s CPU), "
            f"open + one row {open_ms:.1f} ms, read all {read_s:.2f} s, "
            f"on disk {rs[0][2] / 2**20:.1f} MiB "
            f"(apparent shard size {'sparse 512 MiB' if name == 'format 1' else 'rows only'}); "
            f"all append times {[round(r[0], 2) for r in rs]}"
        )


if __name__ == "__main__":
    main()
