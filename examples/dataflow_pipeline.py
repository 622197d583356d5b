"""The upstream DataFlow usage with dedup-index's operator (only the import line differs).

Usage, from the repository after `make demo` (which writes demo_output/images.jsonl and
its images):

    .venv/bin/python examples/dataflow_pipeline.py [IMAGES.jsonl [MODEL [IMAGE_ROOT]]]

IMAGES.jsonl defaults to demo_output/images.jsonl; MODEL to efficientnet-lite0 (offline;
openai/clip-vit-base-patch32 or a local CLIP folder work where you have them); IMAGE_ROOT,
the folder relative image paths resolve against, to the manifest's images/ folder when it
has one, else its own folder.  Steps are written under cache_local/ next to the manifest.
"""

import sys
from pathlib import Path

from dedup_index import FileStorage, ImageDeduplicateFilter

first_entry = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output/images.jsonl")
model = sys.argv[2] if len(sys.argv) > 2 else "efficientnet-lite0"
if len(sys.argv) > 3:
    image_root = Path(sys.argv[3])
else:
    image_root = first_entry.parent / "images"
    image_root = image_root if image_root.is_dir() else first_entry.parent

storage = FileStorage(
    first_entry_file_name=str(first_entry),
    cache_path=str(first_entry.parent / "cache_local"),
    file_name_prefix="image_dedupe_filter",
    cache_type="jsonl",
)
# No threshold given: the model's recommended one (0.75 for efficientnet-lite0, 0.90 for
# CLIP ViT-B/32, upstream's); pass threshold=... to choose.
filt = ImageDeduplicateFilter(model_name=model, batch_size=32, image_root=image_root)
cols = filt.run(storage=storage.step(), input_image_key="image", output_score_key="max_similarity")
print(cols, filt.last_report.summary())
