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
- the torch tile loop against the dense oracle (:func:`tile_check`, issue 16): every
  precision, three tilings and the tile sized from free device memory, rows resident and
  streamed from a store, float64 input, TF32 on, ``cuda:0``/``torch.device`` forms, a bad
  ordinal; and a 200k-row float16 store searched resident and streamed;
- the encoder's throughput: a randomly initialised CLIP ViT-B/32 (the architecture and
  input size of ``openai/clip-vit-base-patch32``; speed does not depend on the weights)
  loaded by path through ``load_encoder`` on CUDA, embedding in-memory PIL images through
  ``embed_images`` (decode-free: preprocessing and the forward pass);
- both encoders (ViT-B/32-shaped CLIP, efficientnet-lite0) at fp32/fp16/bf16 with 0 and 4
  loader processes from JPEG files at batch 256 against the CPU's float32 rows (cosine >
  0.995, unit norm, images/s: :func:`encoder_check`), and ``embed_table`` with one GPU
  actor on a local Ray cluster against the CPU rows (:func:`ray_check`);
  ``--encoder-check-only cpu`` smoke-runs just these on the CPU.

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
            f"{tflops:.1f} useful TFLOP/s, {len(res.pairs)} pairs, {res.n_removed} removed, "
            f"device tiles {ran.get('device_tiles')}"
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


def tile_check(threshold: float, *, n: int = 6000, d: int = 512, stream_n: int = 200_000) -> dict:
    """Issue 16 item 4/7/8 on the GPU: the torch tile loop against the dense oracle.

    An adversarial set (``mixed_adversarial``: copies, chains, pairs within 1e-7 of the
    threshold) in a float32 store, searched on CUDA in every precision with three fixed
    tilings and the tile sized from free device memory (``gpu_tile``), rows resident and
    streamed from the store in chunks (``resident=False``), TF32 switched on globally, as
    float64 in memory, through ``device="cuda:0"`` and ``torch.device``; a bad ordinal
    must be a ValueError.  Then ``stream_n`` rows of a float16 store (``ensure_store``)
    searched resident and streamed: the same results, both timed.  Every run records its
    ``device_tiles`` report (tile, resident or streamed, copies back per tile, waits)."""
    import tempfile

    import torch
    from _common import ensure_store

    import dedup_index
    from dedup_index.search.blocked import blocked_search, device_free_memory, gpu_tile
    from dedup_index.search.dense import dense_search_all
    from dedup_index.store import EmbeddingStore
    from dedup_index.testing import mixed_adversarial

    x = mixed_adversarial(11, n, d, threshold).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict = {"n": len(x), "runs": [], "mismatches": 0}
    with tempfile.TemporaryDirectory() as tmp:
        with EmbeddingStore.create(Path(tmp) / "s", d, shard_rows=4096) as st:
            st.append(x.astype(np.float32))
        store = EmbeddingStore.open(Path(tmp) / "s")
        rows = store[:]
        oracle = dense_search_all(rows, threshold, nearest=True)
        oracle64 = dense_search_all(x, threshold, nearest=True)
        free = device_free_memory("cuda")
        out["free_bytes"] = free
        out["gpu_tile"] = list(gpu_tile(10_000_000, free))
        runs = [
            (
                f"{p} tile={t} resident={r}",
                store,
                {"precision": p, "tile": t, "resident": r},
                oracle,
            )
            for p in ("fp32", "bf16", "fp16")
            for t in (None, (256, 1024), (1000, 3000), 4096)
            for r in (None, False)
        ]
        runs.append(("float64 in memory", x, {}, oracle64))
        runs.append(("cuda:0", rows, {"device": "cuda:0"}, oracle))
        runs.append(("torch.device", rows, {"device": torch.device("cuda", 0)}, oracle))
        for name, src, kw, want in runs:
            rep: dict = {}
            kw = {"device": "cuda", **kw}
            t0 = time.perf_counter()
            got = blocked_search(src, threshold, report=rep, **kw)
            same = (
                got[0].equals(want[0])
                and np.array_equal(got[1], want[1])
                and np.array_equal(got[2], want[2])
            )
            out["mismatches"] += int(not same)
            out["runs"].append(
                {"run": name, "same": same, "s": time.perf_counter() - t0, **rep["device_tiles"]}
            )
            log(f"  tile check {name}: same as oracle {same}, {rep['device_tiles']}")
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True  # must not reach the search
        try:
            got = dedup_index.dedup_embeddings(rows, threshold, backend="blocked", device="cuda")
            same = got.pairs.equals(oracle[0]) and np.array_equal(got.max_similarity, oracle[1])
            left = torch.backends.cuda.matmul.allow_tf32
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        out["tf32"] = {"same": bool(same), "left_on": bool(left)}
        out["mismatches"] += int(not same) + int(not left)
        try:
            dedup_index.dedup_embeddings(rows, threshold, backend="blocked", device="cuda:99")
            out["bad_ordinal"] = "no error"
            out["mismatches"] += 1
        except ValueError as err:
            out["bad_ordinal"] = str(err)
        log(f"  tile check: TF32 {out['tf32']}, bad ordinal: {out['bad_ordinal']}")
    if stream_n:
        big = EmbeddingStore.open(ensure_store(stream_n, d, dtype="float16")["path"])
        ref = None
        for resident in (None, False):
            rep = {}
            t0 = time.perf_counter()
            got = blocked_search(big, threshold, device="cuda", resident=resident, report=rep)
            s = time.perf_counter() - t0
            if ref is None:
                ref, same = got, True
            else:
                same = got[0].equals(ref[0]) and np.array_equal(got[1], ref[1])
            out["mismatches"] += int(not same)
            out["runs"].append(
                {
                    "run": f"{stream_n} float16 store resident={resident}",
                    "same": same,
                    "s": s,
                    **rep["device_tiles"],
                }
            )
            log(f"  {stream_n} rows, resident={resident}: {s:.1f} s, {rep['device_tiles']}")
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


# ------------------------------------------------------------- encoders and Ray on the GPU
# (issue 16, items 5, 6 and defect 9). Each function takes ``device`` so it can be smoke-run
# on the CPU (``--device cpu``: the CPU against itself, small numbers).


def photo_files(folder: Path, count: int) -> list[str]:
    """``count`` distinct JPEG files (q 90, 320-640 px sides) cut from scikit-image's
    photos: real decode work for the loader processes, real image statistics."""
    import skimage.data
    from PIL import Image, ImageOps

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle"]
    bases = []
    for name in names:
        arr = (
            skimage.data.stereo_motorcycle()[0]
            if name == "motorcycle"
            else getattr(skimage.data, name)()
        )
        bases.append(Image.fromarray(np.asarray(arr)).convert("RGB"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        img = bases[k % len(bases)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch)).resize(
            (int(rng.integers(320, 641)), int(rng.integers(320, 641)))
        )
        if k % 2:
            crop = ImageOps.mirror(crop)
        path = folder / f"{k:05d}.jpg"
        crop.save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def vit_b32_dir(folder: Path) -> str:
    """A randomly initialised CLIP ViT-B/32 (openai/clip-vit-base-patch32's architecture
    and preprocessing) saved by path: no hub needed; speed does not depend on weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if not (folder / "config.json").exists():
        import torch

        torch.manual_seed(0)
        CLIPModel(CLIPConfig()).save_pretrained(folder)
        CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}).save_pretrained(folder)
    return str(folder)


def encoder_check(
    work: Path,
    *,
    device: str = "cuda",
    images: int = 1024,
    reference_rows: int = 128,
    batch: int = 256,
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16"),
    workers: tuple[int, ...] = (0, 4),
) -> list[dict]:
    """Both encoders (ViT-B/32-shaped CLIP, efficientnet-lite0) at each precision with 0
    and 4 loader processes on ``device``, through ``embed_images`` from JPEG files, against
    the CPU's float32 rows of the first ``reference_rows`` files: cosine > 0.995 and unit
    norm per row, images/s at ``batch`` (after a warm-up batch)."""
    from dedup_index.encode import embed_images, load_encoder

    files = photo_files(work / "photos", images)
    models = {"clip-vit-b32": vit_b32_dir(work / "vit-b32"), "efficientnet-lite0": None}
    out = []
    for kind, path in models.items():
        name = path or "efficientnet-lite0"
        try:
            cpu = load_encoder(name, device="cpu", precision="fp32")
            ref = embed_images(files[:reference_rows], cpu, num_workers=0, progress=False)
            del cpu
        except Exception as exc:  # a benchmark: report and go on
            out.append({"encoder": kind, "error": f"CPU reference: {exc!r}"})
            log(f"encoder {kind}: CPU reference failed: {exc!r}")
            continue
        for precision in precisions:
            try:
                enc = load_encoder(name, device=device, precision=precision, batch_size=batch)
            except Exception as exc:  # noqa: BLE001
                out.append({"encoder": kind, "precision": precision, "error": repr(exc)})
                log(f"encoder {kind} {precision}: {exc!r}")
                continue
            for nw in workers:
                row = {"encoder": kind, "device": device, "precision": precision}
                row["workers"], row["batch"] = nw, batch
                try:
                    embed_images(files[:batch], enc, num_workers=0, progress=False)  # warm-up
                    _sync(device)
                    t0 = time.perf_counter()
                    got = embed_images(files, enc, num_workers=nw, progress=False)
                    _sync(device)
                    seconds = time.perf_counter() - t0
                    emb = got.embeddings
                    cos = np.sum(emb[:reference_rows] * ref.embeddings, axis=1)
                    norm = np.abs(np.linalg.norm(emb.astype(np.float64), axis=1) - 1.0)
                    row.update(
                        images=len(files),
                        seconds=seconds,
                        images_per_s=len(files) / seconds,
                        min_cosine_vs_cpu=float(cos.min()),
                        max_norm_error=float(norm.max()),
                        live_batch=int(enc.live_batch_size),
                        ok=bool(cos.min() > 0.995 and norm.max() < 1e-4)
                        and got.positions == list(range(len(files))),
                    )
                except Exception as exc:  # noqa: BLE001
                    row["error"] = repr(exc)
                log(f"  encoder {row}")
                out.append(row)
            del enc
            _empty_cache(device)
    return out


def ray_check(
    work: Path, *, device: str = "cuda", images: int = 512, reference_rows: int = 128
) -> dict:
    """``embed_table`` with one GPU actor (4 loader processes) on a local Ray cluster
    against ``embed_images`` on this process's GPU at the actor's precision (same rows and
    failures; bit-identical expected: same kernels, same batches) and against the CPU's
    float32 rows of the first ``reference_rows`` files (cosine > 0.995)."""
    import ray

    from dedup_index.distributed import embed_table
    from dedup_index.encode import embed_images, load_encoder
    from dedup_index.store import EmbeddingStore

    files = photo_files(work / "photos", images)
    files.insert(7, str(work / "photos" / "missing.jpg"))
    model = vit_b32_dir(work / "vit-b32")
    gpu = device != "cpu"
    cpu_enc = load_encoder(model, device="cpu", precision="fp32")
    cpu_rows = embed_images(files[:reference_rows], cpu_enc, progress=False)
    del cpu_enc
    local_enc = load_encoder(model, device=device)
    local = embed_images(files, local_enc, num_workers=4, progress=False)
    del local_enc
    _empty_cache(device)
    ray.init(
        num_cpus=max(2, min(8, os.cpu_count() or 2)),
        num_gpus=1 if gpu else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        t0 = time.perf_counter()
        summary = embed_table(
            files,
            work / "ray-embed",
            model_name=model,
            num_gpus_per_actor=1 if gpu else 0,
            num_workers=4,
            cpus_per_actor=None,
            progress=False,
        )
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    with EmbeddingStore.open(summary.store_path) as store:
        rows = np.asarray(store[:], dtype=np.float32)
    from dedup_index.search import as_unit_float32

    cpu = as_unit_float32(cpu_rows.embeddings)
    cos = np.sum(rows[: len(cpu)] * cpu, axis=1)
    result = {
        "device": device,
        "images": len(files),
        "seconds_with_actor_start": seconds,
        "same_rows": summary.rows.tolist() == local.positions
        and local.positions[: len(cpu_rows.positions)] == cpu_rows.positions,
        "failures": [(r, f.reason) for r, f in summary.failures],
        "min_cosine_vs_cpu": float(cos.min()),
        "bit_identical_to_local": bool(np.array_equal(rows, as_unit_float32(local.embeddings))),
    }
    result["ok"] = bool(result["same_rows"] and cos.min() > 0.995 and len(summary.failures) == 1)
    log(f"ray embed_table, one {'GPU' if gpu else 'CPU'} actor: {result}")
    return result


def _sync(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _empty_cache(device: str) -> None:
    import gc

    gc.collect()
    if device != "cpu":
        import torch

        torch.cuda.empty_cache()


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
    ap.add_argument("--skip-encoder-check", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-tile-check", action="store_true")
    ap.add_argument(
        "--encoder-check-only",
        choices=["cpu", "cuda"],
        help="run only the encoder and Ray checks on this device (cpu: a smoke run)",
    )
    args = ap.parse_args(argv)
    if args.encoder_check_only:
        return encoder_and_ray_main(args.encoder_check_only, args)
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
    if not args.skip_tile_check:  # the torch tile loop against the oracle (issue 16)
        try:
            report["tile_check"] = tile_check(args.threshold)
        except Exception as exc:  # a benchmark: report and go on
            report["tile_check"] = {"error": repr(exc), "mismatches": 1}
            log(f"tile check failed: {exc!r}")
        save(report)
    if not args.skip_encoder_check or not args.skip_ray:
        report.update(encoder_and_ray(Path(os.environ.get("OUT", "bench/_out")), "cuda", args))
        save(report)
    for n in [int(s) for s in args.sizes.split(",") if s]:
        report["search"] += run_search(n, args.dim, precisions, args.threshold, args.sample_blocks)
        save(report)  # after every size: a later one may run out of time
    bad = sum(r["check"].get("mismatches", 0) for r in report["search"])
    bad += report.get("tile_check", {}).get("mismatches", 0)
    log(f"done: {bad} mismatching sampled blocks and tile-check runs")
    return 1 if bad else 0


def encoder_and_ray(out: Path, device: str, args: argparse.Namespace) -> dict:
    """The encoder and Ray checks as report entries (each failure reported, not raised)."""
    import tempfile

    small = device == "cpu"  # a smoke run: the CPU against itself, few images
    report: dict = {}
    with tempfile.TemporaryDirectory(dir=out if out.is_dir() else None) as tmp:
        work = Path(tmp)
        if not args.skip_encoder_check:
            try:
                report["encoders"] = encoder_check(
                    work,
                    device=device,
                    images=24 if small else 1024,
                    reference_rows=8 if small else 128,
                    batch=8 if small else 256,
                    workers=(0, 2) if small else (0, 4),
                )
            except Exception as exc:  # noqa: BLE001
                report["encoders"] = [{"error": repr(exc)}]
                log(f"encoder check failed: {exc!r}")
        if not args.skip_ray:
            try:
                report["ray_embed"] = ray_check(
                    work,
                    device=device,
                    images=12 if small else 512,
                    reference_rows=8 if small else 128,
                )
            except Exception as exc:  # noqa: BLE001
                report["ray_embed"] = {"error": repr(exc)}
                log(f"ray check failed: {exc!r}")
    return report


def encoder_and_ray_main(device: str, args: argparse.Namespace) -> int:
    """``--encoder-check-only DEVICE``: only the encoder and Ray checks, saved as JSON."""
    out = Path(os.environ.get("OUT", "bench/_out"))
    out.mkdir(parents=True, exist_ok=True)
    report = encoder_and_ray(out, device, args)
    save(report)
    rows = [*report.get("encoders", []), report.get("ray_embed", {"ok": True})]
    bad = [r for r in rows if not r.get("ok", False)]
    log(f"encoder/ray checks: {len(rows) - len(bad)} of {len(rows)} passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
