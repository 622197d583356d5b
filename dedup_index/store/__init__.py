"""The on-disk stage: embeddings in memory-mapped shards, pairs that outgrow memory.

- :class:`EmbeddingStore`: append-only ``(N, D)`` unit-norm embeddings (float32 or
  float16) in fixed-size ``.npy`` shards with a JSON manifest as the atomic commit point,
  so an interrupted encoding run resumes from its last committed row.  Search backends
  take it wherever they take an ndarray.
- :func:`open_or_array`: a store, a store's path or an array, as backends take them.
- :class:`PairSink` / :class:`PairFile`: pairs buffered in memory and spilled to Parquet
  beyond a budget, read back in chunks; :func:`write_pair_file` writes one atomically
  (returning its checksum, which ``PairFile(path, sha256=...)`` verifies).

numpy and pyarrow only: no torch, transformers or faiss here.
"""

from __future__ import annotations

from .embeddings import (
    EmbeddingStore,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    open_or_array,
)
from .pairs_file import PairFile, PairSink, write_pair_file

__all__ = [
    "EmbeddingStore",
    "PairFile",
    "PairSink",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "open_or_array",
    "write_pair_file",
]
