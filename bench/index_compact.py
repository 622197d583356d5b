"""Memory of ``DedupIndex.compact`` on a large ``ivf`` index, against FAISS's own way of
building the compacted index (one in-memory IVF index over every row).

Usage: python bench/index_compact.py INDEX [INDEX ...] [--nlist 1024]

Each INDEX (a float16 ``ivf`` index, e.g. one built in one pass by
``bench_index.py --from-store N --index-dir D --keep``: ``D/i``) is copied to a temporary
folder, then compacted there in a fresh process (RSS sampled every 20 ms).  In another
fresh process the comparison: the same rows in a FAISS ``IndexIVFFlat`` (float16 lists,
as the index keeps them) on the compacted index's centroids, every row added in memory
(FAISS assigning each to its nearest centroid) before the index is written: what
``compact`` did before it wrote bounded segments.  Prints one table row per index.
``--nlist``: the lists asked for (the k-means is the slow part; the memory does not
depend on it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MemSampler, machine_lines, table  # noqa: E402


def gib(kib: int) -> float:
    return round(kib / 2**20, 2)


def child_compact(path: str, nlist: int) -> dict:
    from dedup_index.index import DedupIndex

    index = DedupIndex.open(path, mode="a")
    with MemSampler() as mem:
        t0 = time.perf_counter()
        stats = index.compact(nlist=nlist, retain_seconds=0)
        seconds = time.perf_counter() - t0
    index.close()
    return {
        "rows": stats["rows"],
        "seconds": round(seconds, 1),
        "peak": gib(mem.peak["VmRSS"]),
        "anon": gib(mem.peak["RssAnon"]),
        "file": gib(mem.peak["RssFile"]),
        "row_files": stats["row_files"],
        "segments": stats["ann_segments"],
        "nlist": stats["nlist"],
    }


def child_faiss(path: str) -> dict:
    """Every row of the compacted index ``path`` in one in-memory FAISS IVF index."""
    import numpy as np

    from dedup_index.index import DedupIndex
    from dedup_index.index.ann import new_ivf
    from dedup_index.search.flat import faiss_module

    faiss = faiss_module()
    with DedupIndex.open(path) as index:
        rows = index._view.rows
        first = faiss.extract_index_ivf(index._view.ann.segments[0].index)
        flat = faiss.downcast_index(first.quantizer)
        centroids = faiss.rev_swig_ptr(flat.get_xb(), first.nlist * first.d)
        centroids = np.array(centroids, dtype=np.float32).reshape(first.nlist, first.d)
        rows.release_pages()
        with MemSampler() as mem:
            t0 = time.perf_counter()
            quantizer = faiss.IndexFlatIP(first.d)
            quantizer.add(centroids)
            ivf = new_ivf(quantizer, first.d, first.nlist, fp16=True)
            for a in range(0, rows.shape[0], 1 << 16):
                ivf.add(np.ascontiguousarray(rows[a : a + (1 << 16)]))
            with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
                faiss.write_index(ivf, str(Path(tmp) / "all.faiss"))
            seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 1),
        "peak": gib(mem.peak["VmRSS"]),
        "anon": gib(mem.peak["RssAnon"]),
        "file": gib(mem.peak["RssFile"]),
    }


def in_child(task: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", task, *args], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"{task} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", nargs="+")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--work", default=None, help="folder for the copies (default: temp)")
    args = parser.parse_args()
    print("\n".join(machine_lines()))
    rows = []
    for source in args.index:
        with tempfile.TemporaryDirectory(dir=args.work, prefix="compact-") as tmp:
            copy = str(Path(tmp) / "i")
            shutil.copytree(source, copy)
            ours = in_child("compact", copy, str(args.nlist))
            theirs = in_child("faiss", copy)
        rows.append(
            [
                f"{ours['rows']:,}",
                f"{ours['seconds']:.0f}",
                f"{ours['peak']:.2f} ({ours['anon']:.2f} / {ours['file']:.2f})",
                f"{ours['row_files']} / {ours['segments']} / {ours['nlist']:,}",
                f"{theirs['seconds']:.0f}",
                f"{theirs['peak']:.2f} ({theirs['anon']:.2f} / {theirs['file']:.2f})",
                f"{ours['peak'] / theirs['peak']:.2f}",
            ]
        )
        print(json.dumps({"index": source, "compact": ours, "faiss": theirs}), flush=True)
    header = [
        "rows",
        "compact s",
        "compact peak GiB (anon / file)",
        "row files / segments / lists",
        "FAISS in-memory s",
        "FAISS peak GiB (anon / file)",
        "peak vs FAISS",
    ]
    print(table(header, rows, left=()))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        task, rest = sys.argv[2], sys.argv[3:]
        out = child_compact(rest[0], int(rest[1])) if task == "compact" else child_faiss(rest[0])
        print(json.dumps(out))
    else:
        main()
