"""First query on a big persistent index: row checksums per block vs whole file (issue 13).

Builds an index of ``--rows`` random unit rows of ``--dim`` (one rows segment, no pairs:
the files ``DedupIndex.add`` would write, assembled directly because an exact add of 1M
rows takes hours here), then, each in a fresh process, times ``open``, the first
``query`` and a second one, twice per form:

* ``blocks``: the segment's block-checksum file listed (this version): a read hashes only
  the ~1 MiB blocks it touches;
* ``whole``: the same index with the block file unlisted (an index written before it):
  the first read hashes the whole rows file.

An exact backend (``flat``/``blocked``) reads every row for every query, so both forms
hash every block on the first query; ``--backend ivf`` gathers only the candidates' rows.
Runs with a warm page cache (the files were just written).  Usage::

    python bench/row_checksums.py --rows 1000000 --dim 512 --backend blocked
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

CHILD = textwrap.dedent(
    """
    import json, sys, time, numpy as np
    from dedup_index.index import DedupIndex
    from dedup_index.store.blocks import hashed_bytes
    q = np.load(sys.argv[2])
    t0 = time.perf_counter()
    index = DedupIndex.open(sys.argv[1])
    t1 = time.perf_counter()
    first = index.query(q)
    t2 = time.perf_counter()
    index.query(q)
    t3 = time.perf_counter()
    print(json.dumps({"open_s": t1 - t0, "first_query_s": t2 - t1, "second_query_s": t3 - t2,
                      "hits": len(first[0]), "block_bytes_hashed": hashed_bytes()}))
    """
)


def build(root: Path, n: int, dim: int, backend: str) -> None:
    from dedup_index.files import atomic_write_bytes, write_json_atomic
    from dedup_index.index import DedupIndex
    from dedup_index.index.ann import AnnIndex
    from dedup_index.search.pairs import PairSet
    from dedup_index.store import (
        blocks_name,
        write_pair_file,
        write_rows_file,
        write_rows_segment,
    )

    options = {"nlist": 1024, "nprobe": 8, "tail_rows": 0, "balance": False}
    with DedupIndex.create(
        root, dim, 0.99, backend=backend, backend_options=options if backend == "ivf" else {}
    ):
        pass
    rng = np.random.default_rng(0)
    rows = np.empty((n, dim), np.float32)
    for a in range(0, n, 65536):
        x = rng.standard_normal((min(n, a + 65536) - a, dim), dtype=np.float32)
        rows[a : a + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.save(root.parent / "q.npy", rows[[12345]])
    manifest = json.loads((root / "manifest.json").read_text())
    t = time.perf_counter()
    write_rows_file(root / "old.npy", rows)  # before: the rows file and its SHA-256 only
    print(f"write_rows_file (whole-file SHA-256): {time.perf_counter() - t:.2f} s", flush=True)
    (root / "old.npy").unlink()
    t = time.perf_counter()
    sums = write_rows_segment(root, "rows/rows-000001.npy", rows)
    print(f"write_rows_segment (+ block file): {time.perf_counter() - t:.2f} s", flush=True)
    keys = [str(k) for k in range(n)]
    sums["rows/keys-000001.json"] = write_json_atomic(root / "rows/keys-000001.json", keys)
    empty = PairSet(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    sums["pairs/part-000001.parquet"] = write_pair_file(root / "pairs/part-000001.parquet", empty)
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        keep=np.ones(n, bool),
        duplicate_of=np.full(n, -1, np.int64),
        duplicate_similarity=np.full(n, np.nan),
        group=np.arange(n, dtype=np.int64),
        nearest=np.zeros(n),
        earlier=np.zeros(n),
        removed=np.zeros(n, bool),
    )
    sums["state-000001.npz"] = atomic_write_bytes(root / "state-000001.npz", buf.getvalue())
    ann = []
    if backend == "ivf":
        t = time.perf_counter()
        index = AnnIndex("ivf", options).build_segment(rows, nlist=1024, fresh=True)
        sums["ann/seg-000001.faiss"] = atomic_write_bytes(
            root / "ann/seg-000001.faiss", AnnIndex.segment_to_bytes(index)
        )
        ann = [{"file": "ann/seg-000001.faiss", "start": 0, "stop": n}]
        print(f"IVF segment: {time.perf_counter() - t:.1f} s", flush=True)
    entry = {"file": "rows/rows-000001.npy", "keys": "rows/keys-000001.json", "count": n}
    manifest.update(
        count=n,
        generation=1,
        rows=[dict(entry, blocks=blocks_name(entry["file"]))],
        pairs=["pairs/part-000001.parquet"],
        state=["state-000001.npz"],
        ann=ann,
        checksums=sums,
        n_pairs=0,
    )
    write_json_atomic(root / "manifest.json", manifest)
    whole = dict(manifest, rows=[entry])  # the form written before block files
    whole["checksums"] = {k: v for k, v in sums.items() if not k.endswith(".blocks.json")}
    write_json_atomic(root / "manifest-whole.json", whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backend", default="blocked", choices=("blocked", "flat", "ivf"))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp) / "index"
        build(root, args.rows, args.dim, args.backend)
        forms = {"blocks": (root / "manifest.json").read_bytes()}
        forms["whole"] = (root / "manifest-whole.json").read_bytes()
        for rep in range(args.repeat):
            for form, manifest in forms.items():
                (root / "manifest.json").write_bytes(manifest)
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(root), str(Path(tmp) / "q.npy")],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                out = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps({"form": form, "run": rep, "backend": args.backend, **out}))


if __name__ == "__main__":
    main()
