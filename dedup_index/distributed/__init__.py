"""The same dedup on a Ray cluster (optional extra ``[ray]``; Ray is imported only when used).

- :func:`embed_table`: Ray Data over the rows (a list of values, a DataFrame, a Parquet or
  JSONL manifest, or a folder), encoder actors (``num_gpus_per_actor=1``: one per GPU),
  each shard of rows written atomically; a rerun skips finished shards.  The shards are
  assembled into an :class:`~dedup_index.store.EmbeddingStore`.
- :func:`dedup_store`: the exact upper-triangle tile search as Ray tasks, each tile's
  pairs and partial maxima written atomically, merged once on the driver, then the same
  policy sweep: identical to ``dedup_embeddings(E, t, backend="blocked")`` bit for bit.
- :func:`dedup_images`: both, end to end; returns ``(DedupResult, failures)``.
- :func:`connect`: join a cluster (an address, ``RAY_ADDRESS``) or start a local one.

``import dedup_index.distributed`` is light; Ray loads on the first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_LAZY = {
    "connect": "dedup_index.distributed.cluster",
    "dedup_store": "dedup_index.distributed.search",
    "choose_tile_rows": "dedup_index.distributed.search",
    "embed_table": "dedup_index.distributed.embed",
    "EmbedSummary": "dedup_index.distributed.embed",
    "dedup_images": "dedup_index.distributed.pipeline",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import connect  # noqa: F401
    from .embed import EmbedSummary, embed_table  # noqa: F401
    from .pipeline import dedup_images  # noqa: F401
    from .search import choose_tile_rows, dedup_store  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
