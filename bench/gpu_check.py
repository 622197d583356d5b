"""GPU benchmark: exact all-pairs search with tensor-core candidates, checked, and encoding.

    python bench/gpu_check.py [--sizes 1000000,10000000] [--precisions auto,fp16,bf16]
                              [--sample-blocks 4] [--threshold 0.9] [--skip-encoder]

Run by ``bench/gpu_check.sh`` on a machine with a CUDA GPU.  For each N (default 1M and
10M x 512), on a float16 :class:`~dedup_index.store.EmbeddingStore` of
``synthetic.clustered_unit_vector_chunks`` (built chunk by chunk under ``bench/_out``,
reused when there):

- ``dedup_embeddings(store, t, backend="blocked", device="cuda", precision=p)`` for each
  ``p``: seconds, useful TFLOP/s (N^2 * D flops: N^2 / 2 pairs x D multiply-adds x 2),
  pairs, rows removed, and what ``auto`` ran;
- a check against ``precision="fp32"`` computed independently on the CPU for a sample of
  row blocks of 1024 rows: every pair touching a sampled row, and each sampled row's
  nearest score, must be bit-identical (the CPU reference: ``cross_search`` of the block
  against every other row plus ``blocked_search`` inside the block);
- the GPU GEMM rates of fp32, bf16 and fp16 (``dedup_index.search.precision``);
- the encoder's throughput: a randomly initialised CLIP ViT-B/32 (the architecture and
  input size of ``openai/clip-vit-base-patch32``; speed does not depend on the weights)
  loaded by path through ``load_encoder`` on CUDA, embedding in-memory PIL images through
  ``embed_images`` (decode-free: preprocessing and the forward pass).

Targets (issue 11): 1M exact under 30 s, 10M exact under 5 minutes on one H100/H200.
Prints a report and writes it as JSON to ``$OUT/gpu_check.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_sample(store, result, threshold: float, blocks: int, seed: int = 0) -> dict:
    """Bit-identity of ``result`` with a float32 CPU reference on sampled row blocks."""
    from dedup_index.search.blocked import blocked_search
    from dedup_index.search.cross import cross_search

    n = store.shape[0]
    rng = np.random.default_rng(seed)
    size = 1024
    starts = sorted(
        rng.choice(max(1, n // size), size=min(blocks, max(1, n // size)), replace=False)
    )
    pairs = result.pairs
    if hasattr(pairs, "iter_chunks") and not hasattr(pairs, "i"):
        chunks = list(pairs.iter_chunks())
        pi = np.concatenate([c.i for c in chunks]) if chunks else np.zeros(0, np.int64)
        pj = np.concatenate([c.j for c in chunks]) if chunks else np.zeros(0, np.int64)
        ps = np.concatenate([c.s for c in chunks]) if chunks else np.zeros(0)
    else:
        pi, pj, ps = pairs.i, pairs.j, pairs.s
    bad = 0
    for k in starts:
        a, b = int(k) * size, min(n, int(k) * size + size)
        rows = np.arange(a, b)
        q = np.ascontiguousarray(store[a:b], dtype=np.float32)
        live = np.ones(n, dtype=bool)
        live[a:b] = False
        cross = cross_search(q, store, threshold, base_live=live, base_best=False, precision="fp32")
        within, near_in, _ = blocked_search(q, threshold, precision="fp32")
        ri = np.concatenate([np.minimum(cross.q + a, cross.b), within.i + a])
        rj = np.concatenate([np.maximum(cross.q + a, cross.b), within.j + a])
        rs = np.concatenate([cross.s, within.s])
        order = np.lexsort((rj, ri))
        ref = set(zip(ri[order].tolist(), rj[order].tolist(), rs[order].tolist(), strict=True))
        touch = ((pi >= a) & (pi < b)) | ((pj >= a) & (pj < b))
        got = set(zip(pi[touch].tolist(), pj[touch].tolist(), ps[touch].tolist(), strict=True))
        nearest = np.maximum(np.maximum(cross.query_best, near_in), 0.0)
        same_near = np.array_equal(result.max_similarity[rows], nearest)
        bad += int(ref != got) + int(not same_near)
        log(
            f"  block {a}:{b}: pairs {len(got)} vs fp32 {len(ref)} equal {ref == got}, "
            f"nearest equal {same_near}"
        )
    return {"blocks": len(starts), "rows_per_block": size, "mismatches": bad}


def run_search(n: int, d: int, precisions: list[str], threshold: float, blocks: int) -> list:
    from _common import ensure_store

    import dedup_index
    from dedup_index.store import EmbeddingStore

    t0 = time.perf_counter()
    build = ensure_store(n, d, dtype="float16")
    log(
        f"N = {n}: float16 store {build['path']} ({'reused' if build['reused'] else 'built'} "
        f"in {time.perf_counter() - t0:.0f} s, builder peak RSS "
        f"{build.get('builder_peak_rss', 0) / 2**30:.2f} GiB)"
    )
    store = EmbeddingStore.open(build["path"], mode="r")
    out = []
    for p in precisions:
        t0 = time.perf_counter()
        res = dedup_index.dedup_embeddings(
            store, threshold, backend="blocked", device="cuda", precision=p, progress=False
        )
        s = time.perf_counter() - t0
        ran = res.info.get("precision", {})
        tflops = float(n) * n * d / s / 1e12
        log(
            f"  blocked cuda precision={p} (ran {ran.get('precision')}): {s:.1f} s, "
            f"{tflops:.1f} useful TFLOP/s, {len(res.pairs)} pairs, {res.n_removed} removed"
        )
        check = check_sample(store, res, threshold, blocks) if blocks else {}
        out.append(
            {
                "n": n,
                "precision": p,
                "ran": ran,
                "seconds": s,
                "tflops": tflops,
                "pairs": len(res.pairs),
                "removed": res.n_removed,
                "check": check,
            }
        )
        del res
    return out


def encoder_rate(images: int = 2048, batch: int = 256) -> dict:
    """Images/s of a ViT-B/32-shaped CLIP on CUDA through the library's embedding path."""
    import tempfile

    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dedup_index.encode import embed_images, load_encoder

    with tempfile.TemporaryDirectory() as tmp:
        CLIPModel(CLIPConfig()).save_pretrained(tmp)
        CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}).save_pretrained(tmp)
        enc = load_encoder(tmp, device="cuda", batch_size=batch)
        rng = np.random.default_rng(0)
        pics = [
            Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(64)
        ]
        values = [pics[k % len(pics)] for k in range(images)]
        embed_images(values[:batch], enc, progress=False)  # warm-up
        t0 = time.perf_counter()
        got = embed_images(values, enc, progress=False)
        s = time.perf_counter() - t0
    return {
        "images": images,
        "seconds": s,
        "images_per_s": images / s,
        "dim": int(got.embeddings.shape[1]),
    }


def save(report: dict) -> None:
    """The report so far, as JSON in ``$OUT/gpu_check.json`` (when ``$OUT`` is set)."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--precisions", default="auto")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--sample-blocks", type=int, default=3)
    ap.add_argument("--skip-encoder", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from dedup_index.search.precision import measure_rates

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do")
        return 2
    report: dict = {
        "machine": f"{platform.node()} {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, {os.cpu_count()} CPUs",
    }
    log(report["machine"])
    report["gemm_tflops"] = {k: v / 1000 for k, v in measure_rates("cuda", refresh=True).items()}
    log(f"GPU GEMM TFLOP/s (1024x512 @ 512x16384): {report['gemm_tflops']}")
    precisions = [p for p in args.precisions.split(",") if p]
    report["search"] = []
    save(report)
    if not args.skip_encoder:  # first: short, and useful even if a large N runs out of time
        try:
            report["encoder"] = encoder_rate()
            log(f"encoder (ViT-B/32 shape, random weights, CUDA): {report['encoder']}")
        except Exception as exc:  # a benchmark: report and go on
            report["encoder"] = {"error": repr(exc)}
            log(f"encoder failed: {exc!r}")
        save(report)
    for n in [int(s) for s in args.sizes.split(",") if s]:
        report["search"] += run_search(n, args.dim, precisions, args.threshold, args.sample_blocks)
        save(report)  # after every size: a later one may run out of time
    bad = sum(r["check"].get("mismatches", 0) for r in report["search"])
    log(f"done: {bad} mismatching sampled blocks")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
