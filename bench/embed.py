"""Embedding throughput: the upstream way vs the parallel pipeline, and where the time goes.

    .venv/bin/python bench/embed.py            # 1,000 JPEGs of ~2 MP (minutes)
    .venv/bin/python bench/embed.py --n 64     # a quick run

Inputs: ``--n`` JPEGs of 1728 x 1152 (2.0 MP; every third one portrait), quality 90,
written once to ``bench/_out/embed_jpegs`` (git-ignored). Each is a 2 x 2 mosaic of random
crops of scikit-image's real photos, upscaled at most ~2x and given a faint sensor-like
grain, so the files carry real-photo detail and decode at the cost of real 2 MP photos.

Models (random weights are fine for timing; nothing is downloaded):

* ``vit-b32``: a CLIP whose image tower has ViT-B/32's shape (hidden 768, 12 layers,
  12 heads, patch 32, 224 x 224, projection 512), saved to ``bench/_out`` with a default
  ``CLIPImageProcessor`` and loaded by path like any checkpoint;
* ``efficientnet-lite0``: the offline ImageNet model (``load_encoder``).

Rows, per model (images/s; "x upstream" is the ratio to row 1):

1. ``upstream``: what DataFlow-MM's operator does: on the main thread, ``Image.open``
   + ``convert("RGB")`` per image, the checkpoint's image processor (``CLIPProcessor``'s
   image half; for EfficientNet its own PIL preprocessing) on the batch, an fp32 forward
   pass, batch 32. (EfficientNet's model here is the packaged one as loaded, NCHW with
   separate BatchNorms, as this package ran it before the pipeline.)
2. ``pipeline``: :func:`dedup_index.encode.pipeline.embed_images`: decode (with JPEG
   draft) and preprocess in worker processes, the model on the main process (for
   EfficientNet: BatchNorm folded into the convolutions, channels-last).
3. ``pipeline, no draft``: the same with full-size JPEG decoding (``draft_factor=0``).
4. ``model only``: ``encode_pixels`` on pre-decoded uint8 tensors (``--model-n`` images).
5. ``decode only``: load + preprocess with no model: the upstream way (1 process), ours
   in 1 process, and ours with the pipeline's workers.

The last line says which is the limit: when the workers' decode rate exceeds the model
rate, the model is (the pipeline then runs near the model-only rate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "_out"
sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT = 1728, 1152
PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
]


# --------------------------------------------------------------------------- inputs


def make_jpegs(n: int, folder: Path, seed: int = 0) -> list[str]:
    """``n`` ~2 MP JPEG mosaics of real photos in ``folder`` (reused when present)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"writing {len(missing)} JPEGs of {WIDTH}x{HEIGHT} to {folder} ...", flush=True)
        sources = [_photo(name) for name in PHOTOS]
        for i in missing:
            rng = np.random.default_rng(seed + i)
            tile_w, tile_h = WIDTH // 2, HEIGHT // 2
            canvas = Image.new("RGB", (WIDTH, HEIGHT))
            for t in range(4):
                src = sources[int(rng.integers(len(sources)))]
                canvas.paste(
                    _random_tile(src, tile_w, tile_h, rng), ((t % 2) * tile_w, (t // 2) * tile_h)
                )
            arr = np.asarray(canvas, dtype=np.int16)
            grain = rng.normal(0.0, 2.0, arr.shape[:2])[..., None]
            arr = np.clip(arr + grain, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 2:
                img = img.transpose(Image.Transpose.ROTATE_90)  # portrait
            img.save(paths[i], "JPEG", quality=90)
    return [str(p) for p in paths]


def _photo(name: str):
    import skimage.data
    from PIL import Image

    arr = (
        skimage.data.stereo_motorcycle()[0]
        if name == "motorcycle"
        else getattr(skimage.data, name)()
    )
    return Image.fromarray(np.asarray(arr)).convert("RGB")


def _random_tile(src, tile_w: int, tile_h: int, rng):
    """A random crop of ``src`` covering 50-100% of its shorter side, resized to the tile."""
    from PIL import Image

    w, h = src.size
    frac = rng.uniform(0.5, 1.0)
    cw = max(16, int(min(w, h * tile_w / tile_h) * frac))
    ch = max(16, int(cw * tile_h / tile_w))
    x = int(rng.integers(0, max(1, w - cw + 1)))
    y = int(rng.integers(0, max(1, h - ch + 1)))
    tile = src.crop((x, y, x + cw, y + ch)).resize((tile_w, tile_h), Image.Resampling.BICUBIC)
    return tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else tile


def make_vit_b32(folder: Path) -> str:
    """A randomly initialised CLIP with ViT-B/32's image tower, saved by ``save_pretrained``."""
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class

    config = CLIPConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor_class().save_pretrained(folder)  # CLIP's defaults: 224, bicubic, OpenAI mean/std
    return str(folder)


# --------------------------------------------------------------------------- measurements


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def upstream_forward(encoder):
    """The model as the upstream way runs it: for CLIP the same model; for EfficientNet
    the packaged model as loaded (BatchNorm unfused, NCHW), as this package ran it before."""
    if getattr(encoder, "model_name", "") != "efficientnet-lite0":
        return encoder._features
    from dedup_index.encode.efficientnet import _load_model

    model = _load_model().eval()
    return lambda pixels: model.extract_features(pixels).mean(dim=(2, 3))


def upstream_rate(paths: list[str], encoder, batch_size: int, hf_processor) -> float:
    """Main thread: PIL open + convert, the processor on the batch, fp32 forward."""
    import torch
    from PIL import Image

    forward = upstream_forward(encoder)

    def embed(batch_paths):
        images = [Image.open(p).convert("RGB") for p in batch_paths]
        if hf_processor is not None:
            pixels = hf_processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.from_numpy(np.stack([encoder.preprocessor(im) for im in images]))
        with torch.no_grad():
            feats = forward(pixels.to(encoder.device))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    embed(paths[:batch_size])  # warm-up (a full batch: oneDNN builds kernels per shape)
    start = time.perf_counter()
    for s in range(0, len(paths), batch_size):
        embed(paths[s : s + batch_size])
    return _rate(len(paths), time.perf_counter() - start)


def pipeline_rate(paths: list[str], encoder, batch_size: int, num_workers: int | None) -> float:
    from dedup_index.encode.pipeline import embed_images

    embed_images(paths[:batch_size], encoder, batch_size=batch_size, num_workers=0)  # warm-up
    start = time.perf_counter()
    emb, positions, failures = embed_images(
        paths, encoder, batch_size=batch_size, num_workers=num_workers
    )
    seconds = time.perf_counter() - start
    assert len(positions) == len(paths) and not failures, failures[:3]
    return _rate(len(paths), seconds)


def model_rate(paths: list[str], encoder, batch_size: int) -> float:
    from dedup_index.encode.pipeline import _Loader

    loader = _Loader(None, None, encoder.preprocessor)
    pixels = np.stack([loader.load(p, True)[0] for p in paths])
    encoder.encode_pixels(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for s in range(0, len(pixels), batch_size):
        encoder.encode_pixels(pixels[s : s + batch_size])
    return _rate(len(pixels), time.perf_counter() - start)


def decode_rates(
    paths: list[str], encoder, batch_size: int, num_workers: int, hf_processor
) -> dict[str, float]:
    """Load + preprocess only: upstream way, ours in-process, ours with workers."""
    from PIL import Image

    from dedup_index.encode.pipeline import _iterate, _Loader, _Ranges

    rates = {}
    start = time.perf_counter()
    for s in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[s : s + batch_size]]
        if hf_processor is not None:
            hf_processor(images=images, return_tensors="pt")
        else:
            np.stack([encoder.preprocessor(im) for im in images])
    rates["upstream, 1 process"] = _rate(len(paths), time.perf_counter() - start)

    ranges = _Ranges(paths, batch_size, _Loader(None, None, encoder.preprocessor), True)
    start = time.perf_counter()
    for _ in _iterate(ranges, 0, encoder):
        pass
    rates["ours, 1 process"] = _rate(len(paths), time.perf_counter() - start)
    if num_workers > 0:
        start = time.perf_counter()
        for _ in _iterate(ranges, num_workers, encoder):
            pass
        rates[f"ours, {num_workers} workers"] = _rate(len(paths), time.perf_counter() - start)
    return rates


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images (default 1000)")
    parser.add_argument("--model-n", type=int, default=256, help="images for the model-only row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=None, help="pipeline workers (default: auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all CPUs)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--models",
        default="vit-b32,efficientnet-lite0",
        help="comma-separated: vit-b32, efficientnet-lite0",
    )
    parser.add_argument(
        "--no-draft-row", action="store_true", help="skip the no-draft pipeline row"
    )
    parser.add_argument("--json", default=str(OUT / "embed.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    import torch

    from dedup_index.encode import load_encoder
    from dedup_index.encode.pipeline import default_num_workers

    paths = make_jpegs(args.n, OUT / "embed_jpegs")
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    num_workers = default_num_workers() if args.workers is None else args.workers
    load = os.getloadavg()
    header = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average before {load[0]:.2f}; torch {torch.__version__}",
        f"inputs: {args.n} JPEGs {WIDTH}x{HEIGHT} q90, mean {mean_kb:.0f} KiB; batch "
        f"{args.batch_size}; pipeline workers {num_workers}; device {args.device}",
    ]
    print("\n".join(header), flush=True)

    results = {"header": header, "models": {}}
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "vit-b32":
            model_name = make_vit_b32(OUT / "clip-vit-b32-random")
            label = "CLIP ViT-B/32 (random)"
        elif name == "efficientnet-lite0":
            model_name, label = name, "EfficientNet-Lite0"
        else:
            parser.error(f"unknown model {name!r}; use vit-b32 or efficientnet-lite0")
        encoder = load_encoder(
            model_name, device=args.device, batch_size=args.batch_size, threads=args.threads
        )
        hf_processor = getattr(encoder, "processor", None)
        r = {}
        print(f"[{label}] upstream ...", flush=True)
        r["upstream"] = upstream_rate(paths, encoder, args.batch_size, hf_processor)
        print(f"[{label}] pipeline ...", flush=True)
        r["pipeline"] = pipeline_rate(paths, encoder, args.batch_size, num_workers)
        if not args.no_draft_row:
            print(f"[{label}] pipeline, no draft ...", flush=True)
            no_draft = load_encoder(
                model_name,
                device=args.device,
                batch_size=args.batch_size,
                threads=args.threads,
                draft_factor=0,
            )
            r["pipeline, no draft"] = pipeline_rate(paths, no_draft, args.batch_size, num_workers)
            del no_draft
        print(f"[{label}] model only, decode only ...", flush=True)
        r["model only"] = model_rate(paths[: args.model_n], encoder, args.batch_size)
        for key, value in decode_rates(
            paths, encoder, args.batch_size, num_workers, hf_processor
        ).items():
            r[f"decode only ({key})"] = value
        results["models"][label] = r
        for key, value in r.items():
            rows.append((label, key, value, value / r["upstream"]))
        parallel = [v for k, v in r.items() if "workers" in k] or [
            r["decode only (ours, 1 process)"]
        ]
        limit = "the model" if parallel[0] > r["model only"] else "decoding"
        rows.append(
            (
                label,
                f"limit: {limit} (decode {parallel[0]:.1f}/s vs model {r['model only']:.1f}/s)",
                None,
                None,
            )
        )
        del encoder

    print()
    print(f"{'model':<24} {'path':<44} {'images/s':>9} {'x upstream':>10}")
    for label, key, value, ratio in rows:
        if value is None:
            print(f"{label:<24} {key}")
        else:
            print(f"{label:<24} {key:<44} {value:9.1f} {ratio:10.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; results in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
