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

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..search.canonical import candidate_delta, canonical_scores
from ..search.cross import CrossResult
from ..search.flat import faiss_module

ANN_BACKENDS = ("ivf", "hnsw")
NEAREST_K = 16


@dataclass(frozen=True)
class AnnResult(CrossResult):
    """A :class:`CrossResult` plus every rescored candidate ``(q, b, s)``, below the
    threshold too (for best-earlier lower bounds)."""

    all_candidates: tuple = ()


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
        faiss = faiss_module()
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        return cls(index, kind, params)

    def to_bytes(self) -> bytes:
        return faiss_module().serialize_index(self.index).tobytes()

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
        self,
        queries: np.ndarray,
        base,
        threshold: float,
        live: np.ndarray | None = None,
        *,
        self_offset: int | None = None,
        nearest: bool = True,
    ) -> CrossResult:
        """Like :func:`~dedup_index.search.cross.cross_search`, through the FAISS index:
        pairs found are exact, pairs may be missed, best scores are lower bounds.

        ``base`` gives the rows of the index's labels (for rescoring).  When the queries
        are themselves in the index as rows ``self_offset + k``, each query's own row is
        left out.  ``nearest=False`` skips the top-k search that raises best scores
        below the threshold (a read-only ``query`` needs only the pairs: half the time)."""
        m, d = queries.shape
        n = len(self)
        empty = np.zeros(0, np.int64)
        if m == 0 or n == 0:
            nothing = (empty, empty, np.zeros(0))
            return AnnResult(*nothing, np.full(m, -np.inf), np.full(n, -np.inf), nothing)
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
            if not nearest:
                continue
            scores, top = self.index.search(chunk, min(NEAREST_K + 1, n))
            ok = top >= 0
            if self_offset is not None:
                ok &= top != (np.arange(a, a + chunk.shape[0]) + self_offset)[:, None]
            if live is not None:
                ok &= live[np.where(ok, top, 0)]
            best = np.where(ok, scores, -np.inf).max(axis=1)
            near = ok & (scores >= (best - delta)[:, None])
            qs.append(np.broadcast_to(np.arange(a, a + chunk.shape[0])[:, None], top.shape)[near])
            bs.append(top[near].astype(np.int64))
        q = np.concatenate(qs)
        b = np.concatenate(bs)
        keep = b >= 0
        if live is not None:
            keep &= live[np.where(keep, b, 0)]
        if self_offset is not None:
            keep &= b != q + self_offset
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
        return AnnResult(
            q[hit][order], b[hit][order], s[hit][order], query_best, base_best, (q, b, s)
        )


class Concat:
    """Rows ``0..n_old-1`` from ``old`` and ``n_old..`` from ``new``, indexable by int
    arrays (for rescoring candidates that may be old or new rows)."""

    def __init__(self, old, n_old: int, new: np.ndarray) -> None:
        self.old, self.n_old, self.new = old, n_old, new
        self.shape = (n_old + new.shape[0], new.shape[1])

    def __getitem__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((idx.shape[0], self.shape[1]), dtype=np.float32)
        old = idx < self.n_old
        if old.any():
            out[old] = self.old[idx[old]]
        out[~old] = self.new[idx[~old] - self.n_old]
        return out
