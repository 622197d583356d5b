"""Deduplicate precomputed embeddings: no images, no torch.

Usage: python examples/dedup_embeddings.py EMBEDDINGS.npy [THRESHOLD]
"""

import sys

import numpy as np

from dedup_index import dedup_embeddings

E = np.load(sys.argv[1])
threshold = float(sys.argv[2]) if len(sys.argv) > 2 else 0.9
result = dedup_embeddings(E, threshold)
print(result.summary())
print(result.pairs.to_frame().head(20))
np.save("keep_mask.npy", result.keep)
