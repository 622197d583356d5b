"""The persistent index's approximate side: a FAISS IVF or HNSW index over its rows.

For very large indexes an exact ``add`` (every new row against every stored row) costs
``N x batch x D``.  With ``backend="ivf"`` or ``"hnsw"`` new rows and queries go through a
FAISS index instead (label = row number), so a query on a million rows answers in
milliseconds and an ``add`` reads old embeddings only for the candidates it rescores.
As everywhere, every reported pair is rescored canonically and exact; pairs may be
missed, and nearest scores are lower bounds (``DedupIndex.exact`` is False).

The FAISS index is saved as ``ann-NNNNNN.faiss`` per generation (checksummed, written
before the manifest like every other file): each ``add`` rewrites it, sequential I/O of
about ``N x D x 4`` bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..search.canonical import candidate_delta, canonical_scores
from ..search.cross import CrossResult

ANN_BACKENDS = ("ivf", "hnsw")
NEAREST_K = 16


def _faiss():
    import faiss

    return faiss


class AnnIndex:
    """A FAISS inner-product index holding rows ``0..n-1`` of a DedupIndex in order."""

    def __init__(self, index: Any, kind: str, params: dict[str, Any]) -> None:
        self.index = index
        self.kind = kind
        self.params = dict(params)
        self._configure()

    @classmethod
    def build(cls, kind: str, first: np.ndarray, params: dict[str, Any]) -> AnnIndex:
        """A new index trained (IVF) on and holding ``first``, the first rows added."""
        if kind == "ivf":
            from ..search.ivf import build_ivf_index

            index = build_ivf_index(first, nlist=params.get("nlist"), seed=params.get("seed", 0))
        elif kind == "hnsw":
            from ..search.hnsw import build_hnsw_index

            index = build_hnsw_index(
                first, m=params.get("m", 32), ef_construction=params.get("ef_construction", 200)
            )
        else:
            raise ValueError(f"approximate backend must be one of {ANN_BACKENDS}; got {kind!r}")
        return cls(index, kind, params)

    @classmethod
    def from_bytes(cls, payload: bytes, kind: str, params: dict[str, Any]) -> AnnIndex:
        faiss = _faiss()
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        return cls(index, kind, params)

    def to_bytes(self) -> bytes:
        return _faiss().serialize_index(self.index).tobytes()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, rows: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

    def _configure(self) -> None:
        if self.kind == "ivf":
            self.index.nprobe = min(int(self.params.get("nprobe", 16)), self.index.nlist)
        else:
            self.index.hnsw.efSearch = int(self.params.get("ef_search", 64))

    def search(
        self, queries: np.ndarray, base, threshold: float, live: np.ndarray | None = None
    ) -> CrossResult:
        """Like :func:`~dedup_index.search.cross.cross_search`, through the FAISS index:
        pairs found are exact, pairs may be missed, best scores are lower bounds."""
        m, d = queries.shape
        n = len(self)
        empty = np.zeros(0, np.int64)
        if m == 0 or n == 0:
            return CrossResult(empty, empty, np.zeros(0), np.full(m, -np.inf), np.full(n, -np.inf))
        delta = candidate_delta(d)
        block = 4096
        if self.kind == "hnsw":
            from ..search.hnsw import safe_range_block

            block = min(256, safe_range_block(self.index))
        qs, bs = [], []
        for a in range(0, m, block):
            chunk = np.ascontiguousarray(queries[a : a + block])
            lims, _, labels = self.index.range_search(chunk, threshold - delta)
            qs.append(np.repeat(np.arange(a, a + chunk.shape[0]), np.diff(lims.astype(np.int64))))
            bs.append(labels.astype(np.int64))
            scores, top = self.index.search(chunk, min(NEAREST_K, n))
            ok = top >= 0
            if live is not None:
                ok &= live[np.where(ok, top, 0)]
            best = np.where(ok, scores, -np.inf).max(axis=1)
            near = ok & (scores >= (best - delta)[:, None])
            qs.append(np.broadcast_to(np.arange(a, a + chunk.shape[0])[:, None], top.shape)[near])
            bs.append(top[near].astype(np.int64))
        q = np.concatenate(qs)
        b = np.concatenate(bs)
        if live is not None:
            keep = live[b]
            q, b = q[keep], b[keep]
        key = np.unique(q * n + b)
        q, b = key // n, key % n
        s = canonical_scores(queries, q, b, other=base)
        query_best = np.full(m, -np.inf)
        base_best = np.full(n, -np.inf)
        np.maximum.at(query_best, q, s)
        np.maximum.at(base_best, b, s)
        hit = s >= threshold
        order = np.lexsort((q[hit], b[hit]))
        return CrossResult(q[hit][order], b[hit][order], s[hit][order], query_best, base_best)
