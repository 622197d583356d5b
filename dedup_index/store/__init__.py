"""The on-disk stage: embeddings in memory-mapped shards, pairs that outgrow memory.

- :class:`EmbeddingStore`: append-only ``(N, D)`` unit-norm embeddings (float32 or
  float16) in shards that grow as they fill, SHA-256 per block checked on read, with a
  JSON manifest as the atomic commit point,
  so an interrupted encoding run resumes from its last committed row.  Search backends
  take it wherever they take an ndarray.
- :func:`open_or_array`: a store, a store's path or an array, as backends take them.
- :class:`PairSink` / :class:`PairFile`: pairs buffered in memory and spilled to Parquet
  beyond a budget, read back in chunks; :func:`write_pair_file` writes one atomically
  (returning its checksum, which ``PairFile(path, sha256=...)`` verifies).
- :class:`SegmentedRows` / :func:`write_rows_segment`: immutable ``.npy`` row segments
  (one per index ``add``) read as one array-like; the persistent index's append-only rows,
  with a block-checksum file each, checked per block on read.
- :mod:`~dedup_index.store.blocks`: the per-block SHA-256 hashing and lazy checking both
  use.

numpy and pyarrow only: no torch, transformers or faiss here.
"""

from __future__ import annotations

from .embeddings import (
    EmbeddingStore,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    open_or_array,
)
from .pairs_file import PairFile, PairSink, write_pair_file
from .segments import (
    RowRange,
    SegmentedRows,
    blocks_name,
    open_rows_file,
    write_rows_file,
    write_rows_segment,
)

__all__ = [
    "EmbeddingStore",
    "PairFile",
    "PairSink",
    "RowRange",
    "SegmentedRows",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "blocks_name",
    "open_or_array",
    "open_rows_file",
    "write_pair_file",
    "write_rows_file",
    "write_rows_segment",
]
