"""``python -m dedup_index.demo``: the main job on an embedded default, offline.

Builds a small collection from real photos that scikit-image ships, plants
near-duplicates (exact byte copies, JPEG re-encodes, PNG re-saves), writes a JSONL
manifest, and runs the DataFlow operator through ``FileStorage`` exactly as a pipeline
would.  The model is a tiny CLIP checkpoint generated on the spot (no hub): its random
weights still tell copies from distinct photos at threshold 0.9999, but they are no
measure of quality; real weights come with the embedding work.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dedup_index.demo", description=__doc__)
    parser.add_argument(
        "--out", default="demo_output", help="folder for everything (default: %(default)s)"
    )
    parser.add_argument("--threshold", type=float, default=0.9999)
    parser.add_argument(
        "--model", default=None, help="CLIP checkpoint (default: a generated tiny one)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from dedup_index import FileStorage, ImageDeduplicateFilter
    from dedup_index.encode.tiny import make_tiny_clip

    out = Path(args.out)
    images = out / "images"
    rows = build_collection(images)
    manifest = out / "images.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = args.model
    if model is None:
        model = str(out / "tiny-clip")
        if not (Path(model) / "config.json").exists():
            make_tiny_clip(model)
    print(
        f"demo collection: {len(rows)} images in {images} "
        f"({len(PHOTOS)} distinct photos + {len(rows) - len(PHOTOS)} planted copies)"
    )
    print(f"model: {model}   threshold: {args.threshold}\n")

    storage = FileStorage(
        first_entry_file_name=str(manifest),
        cache_path=str(out / "cache"),
        file_name_prefix="image_dedupe_filter",
        cache_type="jsonl",
    )
    filt = ImageDeduplicateFilter(
        model_name=model, threshold=args.threshold, batch_size=32, image_root=images
    )
    filt.run(storage=storage.step(), input_image_key="image", output_score_key="max_similarity")
    report = filt.last_report

    print("kept:")
    for row in storage.step().read("dict"):
        print(f"  {row['image']:<30} {row['kind']:<22} max_similarity {row['max_similarity']:.6f}")
    print("\nremoved:")
    for row in report.rejects.to_dict("records"):
        print(
            f"  {row['image']:<30} {row['reject_reason']:<10} duplicate of "
            f"{row['duplicate_of']:<26} similarity {row['similarity']:.6f}"
        )
    planted = {r["image"] for r in rows if r["kind"] != "original"}
    removed = set(report.rejects["image"])
    print(f"\n{report.summary()}")
    print(
        f"planted copies found: {len(planted & removed)}/{len(planted)}; "
        f"originals wrongly removed: {len(removed - planted)}"
    )
    print(f"kept rows: {report.output_path}\nrejects:   {report.rejects_path}")
    return 0 if removed == planted else 1


if __name__ == "__main__":
    sys.exit(main())
