"""Deduplicate precomputed embeddings: no images, no torch.

Usage: python examples/dedup_embeddings.py EMBEDDINGS.npy [THRESHOLD [KEEP_MASK.npy]]

EMBEDDINGS.npy is an (N, D) float array (e.g. from dedup_index.encode.embed_images);
THRESHOLD defaults to 0.9; the keep mask is written to KEEP_MASK.npy (default: next to the
embeddings, as <name>.keep.npy).
"""

import sys
from pathlib import Path

import numpy as np

from dedup_index import dedup_embeddings

source = Path(sys.argv[1])
threshold = float(sys.argv[2]) if len(sys.argv) > 2 else 0.9
out = Path(sys.argv[3]) if len(sys.argv) > 3 else source.with_suffix(".keep.npy")
result = dedup_embeddings(np.load(source), threshold)
print(result.summary())
print(result.pairs.to_frame().head(20))
np.save(out, result.keep)
print(f"keep mask: {out}")
