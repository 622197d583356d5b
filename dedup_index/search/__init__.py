"""Candidate search and canonical rescoring: embeddings in, exact pairs (and maxima) out.

One module per backend, all registered by name in :mod:`.backends` (one signature, one
:class:`SearchResult`); each takes a unit float32 array, or anything indexable like one
(an :class:`~dedup_index.store.EmbeddingStore` streams tiles from disk):

- ``flat``: FAISS ``IndexFlatIP`` searches, tiled; exact, bounded memory.
- ``blocked``: upper-triangle GEMM tiles (torch; CUDA when asked), half the arithmetic of
  ``flat``, each row's best earlier and later row in the same pass; exact.
- ``partitioned``: spherical k-means partitions, every row in its nearest ones, exact
  tiles inside each; approximate, recall measured (:mod:`.recall`), for large N.
- ``ivf`` / ``hnsw``: FAISS approximate range search; for a few queries against a large
  index, and as comparison rows in benchmarks.
- ``dense``: the N x N oracle; small N only.
- ``ray``: ``blocked``'s exact tiles as Ray tasks (:mod:`dedup_index.distributed`).
- ``auto``: picks one from N, D, memory and device, and logs which and why.

Exact backends return identical pairs, ``nearest`` and ``earlier`` bit for bit.  With an
approximate backend every reported pair is exact (its canonical score is ``>=
threshold``), some pairs may be missing, and ``nearest``/``earlier`` are lower bounds.
The tile machinery the exact searches share lives in :mod:`.tiles`; the candidate
arithmetic of its GEMM tiles (``precision``: fp32, bf16, fp16 or ``auto``, each gathered at
the margin of its proven error bound, so the results never change) in :mod:`.precision`.
"""

from __future__ import annotations

from .backends import (
    APPROXIMATE_BACKENDS,
    AUTO_EXACT_MAX_ROWS,
    BACKENDS,
    DISTRIBUTED_BACKENDS,
    EXACT_BACKENDS,
    INDEX_BACKENDS,
    Backend,
    SearchFunction,
    SearchResult,
    check_backend,
    choose_backend,
    get_backend,
    search,
)
from .canonical import as_unit_float32, candidate_delta, canonical_scores
from .dense import DENSE_MAX_ROWS
from .pairs import PairSet, best_pair_score
from .precision import PRECISIONS, check_precision

__all__ = [
    "APPROXIMATE_BACKENDS",
    "AUTO_EXACT_MAX_ROWS",
    "BACKENDS",
    "DENSE_MAX_ROWS",
    "DISTRIBUTED_BACKENDS",
    "EXACT_BACKENDS",
    "INDEX_BACKENDS",
    "PRECISIONS",
    "Backend",
    "PairSet",
    "SearchFunction",
    "SearchResult",
    "as_unit_float32",
    "best_pair_score",
    "candidate_delta",
    "canonical_scores",
    "check_backend",
    "check_precision",
    "choose_backend",
    "get_backend",
    "search",
]
