"""The upstream DataFlow usage with dedup-index's operator.

Usage: python examples/dataflow_pipeline.py IMAGES.jsonl [MODEL]
MODEL defaults to openai/clip-vit-base-patch32 (must be cached or reachable); any local
CLIP checkpoint directory works, e.g. demo_output/tiny-clip after `make demo`.
"""

import sys

from dedup_index import FileStorage, ImageDeduplicateFilter

first_entry = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "openai/clip-vit-base-patch32"
storage = FileStorage(
    first_entry_file_name=first_entry,
    cache_path="./cache_local",
    file_name_prefix="image_dedupe_filter",
    cache_type="jsonl",
)
filt = ImageDeduplicateFilter(model_name=model, threshold=0.90, batch_size=32)
cols = filt.run(storage=storage.step(), input_image_key="image", output_score_key="max_similarity")
print(cols, filt.last_report.summary())
