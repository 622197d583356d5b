"""The persistent index's approximate side: FAISS IVF or HNSW *segments* over its rows.

For very large indexes an exact ``add`` (every new row against every stored row) costs
``N x batch x D``.  With ``backend="ivf"`` or ``"hnsw"`` new rows and queries go through
FAISS indexes instead, so a query on a million rows answers in milliseconds and an
``add`` reads old embeddings only for the candidates it rescores.  As everywhere, every
reported pair is rescored canonically and exact; pairs may be missed, and nearest scores
are lower bounds (``DedupIndex.exact`` is False).

Append-only layout (an LSM tree in miniature):

- *segments*: each covers rows ``[start, stop)`` with its own FAISS index (labels local
  to it), saved once as ``ann/seg-NNNNNN.faiss`` and never rewritten.  IVF segments share
  the coarse quantizer (centroids) of the first one, so a query is assigned to its
  ``nprobe`` lists once and each segment is scanned with ``range_search_preassigned``.
- the *tail*: rows added after the last segment, at most ``tail_rows`` (default
  :data:`TAIL_ROWS`), searched exactly (GEMM tiles over the memory-mapped rows).  Small
  adds (a stream of single uploads) only grow the tail; the add that would overflow it
  turns the tail into a new segment.
- :meth:`DedupIndex.compact` rebuilds one segment over every row with ``nlist`` grown to
  the row count (:func:`~dedup_index.search.ivf.default_nlist`).

At 10M rows the segments do not fit in memory (20 GB of float32 lists), so:

- a ``float16`` index keeps its IVF lists as float16 too (``IndexIVFScalarQuantizer``
  ``QT_fp16`` without residuals: the codes *are* the stored rows, bit for bit, so every
  product is the one an IVF-Flat segment over the rounded rows gives, at half the bytes);
- a segment file of :data:`MMAP_BYTES` or more is opened memory-mapped (FAISS
  ``IO_FLAG_MMAP``: its lists stay on disk and in the page cache), and the GEMM search
  of a batch reads each list it needs with ``pread`` (:func:`read_list`), so scanning
  every list of a 10 GB segment adds nothing to the process's resident memory.

An :class:`AnnIndex` is immutable: :meth:`AnnIndex.with_segment` returns a new one
sharing the old segments, so a query running on one keeps a consistent view while an
add builds the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..search.canonical import candidate_delta, canonical_scores
from ..search.centroids import BALANCE_ROUNDS, balanced_centroids
from ..search.cross import CrossResult, cross_search
from ..search.flat import faiss_module
from ..search.pairs import PairSet
from ..store import RowRange
from ..validation import available_cpus

ANN_BACKENDS = ("ivf", "hnsw")
NEAREST_K = 16
#: Rows searched exactly after the last FAISS segment (8 MiB at D = 512: about a
#: millisecond per query) before they become a segment of their own.
TAIL_ROWS = 4096
#: Queries per FAISS call (bounds the result buffers); HNSW takes fewer (see hnsw.py).
QUERY_BLOCK = 4096
#: IVF lists probed per query unless ``backend_options["nprobe"]`` says otherwise.  At
#: 1M clustered rows (three balancing rounds) 12 lists found the same query pairs as 16
#: (recall 0.9991 of 1161) for three quarters of the scanning; 8 found 0.9974.
NPROBE = 12
#: From this many lists (a one-pass build's quantizer, the region-trained centroids of
#: :func:`~dedup_index.search.partitioned.region_centroids`) twice :data:`NPROBE`: near the
#: data's common direction each region has its own "hub" centroids, ~15 within 0.002 of
#: each other for a row there, so 12 probes can miss the one its copy's list hangs on
#: (10M rows, 49,344 lists: new-to-old recall 0.9712 with 12).  At ~200 rows a list
#: the extra probes cost little next to the quantizer's 49k products a query.
MANY_LISTS = 16384


def default_nprobe(nlist: int) -> int:
    """Lists an IVF query probes unless told: :data:`NPROBE`, twice it from
    :data:`MANY_LISTS` lists."""
    return NPROBE * (2 if nlist >= MANY_LISTS else 1)


#: From this many queries an IVF search runs as GEMM tiles: the queries assigned to a
#: list times the list's vectors, one BLAS product per list, instead of FAISS scanning
#: list by list for each query (the same rows compared, 10-20x faster on a batch).
GEMM_QUERIES = 64
#: Most scores one product of the GEMM search holds (queries x list rows; 16 MiB).
TILE_ENTRIES = 1 << 22
#: Segment files this large or larger are memory-mapped rather than read into memory
#: (FAISS ``IO_FLAG_MMAP``); smaller ones are loaded whole (faster first queries).
MMAP_BYTES = 64 << 20


@dataclass(frozen=True)
class Segment:
    """A FAISS index over rows ``[start, stop)`` (its labels are ``row - start``)."""

    start: int
    stop: int
    index: Any
    #: The segment's file when its lists are memory-mapped from it (read with
    #: ``pread`` by the GEMM search); None when the lists are in memory.
    path: str | None = None


class AnnIndex:
    """FAISS segments over rows ``0..covered-1`` of a DedupIndex, in order (immutable)."""

    def __init__(
        self, kind: str, params: dict[str, Any], segments=(), *, dtype: str = "float32"
    ) -> None:
        if kind not in ANN_BACKENDS:
            raise ValueError(f"approximate backend must be one of {ANN_BACKENDS}; got {kind!r}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16'; got {dtype!r}")
        self.kind = kind
        self.params = dict(params)
        #: The index's row dtype: new IVF segments of a float16 index hold float16 lists.
        self.dtype = dtype
        segments = tuple(segments)
        if kind == "ivf" and len(segments) > 1:  # one copy of the centroids, not one each
            first = segments[0].index
            segments = (
                segments[0],
                *(replace(s, index=on_quantizer_of(first, s.index)) for s in segments[1:]),
            )
        self.segments: tuple[Segment, ...] = segments
        for seg in self.segments:
            self._configure(seg.index)

    @property
    def covered(self) -> int:
        """Rows held by the segments (the rest of the index is the exact tail)."""
        return self.segments[-1].stop if self.segments else 0

    @property
    def tail_rows(self) -> int:
        return int(self.params.get("tail_rows", TAIL_ROWS))

    @property
    def nlist(self) -> int | None:
        return int(self.segments[0].index.nlist) if self.kind == "ivf" and self.segments else None

    def __len__(self) -> int:
        return self.covered

    # ------------------------------------------------------------------ segments
    def build_segment(self, rows, *, nlist: int | None = None, fresh: bool = False):
        """A FAISS index over ``rows`` (an array-like): IVF lists on this index's trained
        quantizer (a copy), trained anew (:meth:`train_centroids`) when there is none yet
        or ``fresh``; or an HNSW graph."""
        from ..search.canonical import rows_of

        n = rows.shape[0]
        if self.kind == "hnsw":
            from ..search.hnsw import build_hnsw_index

            return build_hnsw_index(
                rows,
                m=self.params.get("m", 32),
                ef_construction=self.params.get("ef_construction", 200),
            )
        from ..search.ivf import ADD_BLOCK

        faiss = faiss_module()
        if fresh or not self.segments:
            centroids = self.train_centroids(rows, nlist=nlist)
            quantizer = faiss.IndexFlatIP(centroids.shape[1])
            quantizer.add(centroids)
            d, lists = centroids.shape[1], centroids.shape[0]
            fp16 = self.dtype == "float16"
        else:
            first = self.segments[0].index
            quantizer = faiss.clone_index(first.quantizer)
            d, lists, fp16 = first.d, first.nlist, is_fp16(first)
        index = new_ivf(quantizer, d, lists, fp16=fp16)
        for a in range(0, n, ADD_BLOCK):
            index.add(rows_of(rows, a, min(n, a + ADD_BLOCK)))
        return index

    def train_centroids(self, rows, *, nlist: int | None = None) -> np.ndarray:
        """The coarse centroids ``(nlist', d)`` float32 of a fresh IVF segment over
        ``rows`` (an array-like; only a sample is read): balanced
        (:func:`~dedup_index.search.centroids.balanced_centroids`: ``nlist'`` grows by
        the splits) unless ``backend_options["balance"]`` is false or there are fewer
        than 8 lists (plain spherical k-means).  ``nlist``: default
        ``backend_options["nlist"]``, else
        :func:`~dedup_index.search.ivf.default_nlist` of the row count."""
        from ..search.ivf import default_nlist, trained_ivf_index

        lists = nlist or self.params.get("nlist") or default_nlist(rows.shape[0])
        seed = self.params.get("seed", 0)
        if not self.params.get("balance", True) or lists < 8:
            trained = trained_ivf_index(rows, nlist=lists, seed=seed)
            return np.array(_centroids(trained.quantizer), dtype=np.float32).reshape(-1, trained.d)
        return balanced_centroids(
            rows,
            lists,
            seed=seed,
            niter=int(self.params.get("niter", 20)),
            rounds=int(self.params.get("balance_rounds", BALANCE_ROUNDS)),
        )

    def with_segment(
        self, start: int, stop: int, index: Any, path: str | os.PathLike | None = None
    ) -> AnnIndex:
        """A new AnnIndex with one more segment (rows ``[start, stop)``; ``path``: its
        file, when ``index`` was memory-mapped from it by :meth:`read_segment`)."""
        if start != self.covered:
            raise ValueError(f"a new segment must start at row {self.covered}, not {start}")
        seg = Segment(start, stop, index, None if path is None else str(path))
        return AnnIndex(self.kind, self.params, [*self.segments, seg], dtype=self.dtype)

    @staticmethod
    def segment_to_bytes(index: Any) -> bytes:
        return faiss_module().serialize_index(index).tobytes()

    @staticmethod
    def segment_from_bytes(payload: bytes) -> Any:
        return faiss_module().deserialize_index(np.frombuffer(payload, dtype=np.uint8))

    @staticmethod
    def write_segment(path: str | os.PathLike, index: Any) -> str:
        """Write ``index`` to ``path`` atomically, streamed by FAISS (no serialised copy
        in memory); returns the file's SHA-256 for the manifest."""
        from ..files import atomic_write_with, sha256_file

        faiss = faiss_module()
        atomic_write_with(path, lambda tmp: faiss.write_index(index, tmp), suffix=".faiss")
        return sha256_file(path)

    @staticmethod
    def read_segment(path: str | os.PathLike) -> tuple[Any, str | None]:
        """A segment file as ``(index, mapped path or None)``: memory-mapped (its lists
        read from the page cache, never copied into the process) from
        :data:`MMAP_BYTES`, else read whole.  Check the file's checksum first."""
        faiss = faiss_module()
        path = str(path)
        if os.path.getsize(path) >= MMAP_BYTES:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP), path
        return faiss.read_index(path), None

    def _configure(self, index: Any) -> None:
        if self.kind == "ivf":
            nprobe = self.params.get("nprobe", default_nprobe(index.nlist))
            index.nprobe = min(int(nprobe), index.nlist)
        else:
            index.hnsw.efSearch = int(self.params.get("ef_search", 64))

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: np.ndarray,
        base,
        threshold: float,
        live: np.ndarray | None = None,
        *,
        nearest: bool = True,
    ) -> CrossResult:
        """Like :func:`~dedup_index.search.cross.cross_search` of ``queries`` against
        ``base`` (every row of the index, for rescoring): the segments' rows through
        FAISS (pairs found are exact, pairs may be missed, best scores are lower bounds),
        the tail's rows exactly.  ``live`` (bool per row) leaves rows out.
        ``nearest=False`` skips the search for best scores below the threshold and the
        base rows' best scores (``base_best`` is then empty): a read-only ``query`` needs
        only the pairs."""
        m = queries.shape[0]
        n = base.shape[0]
        covered = self.covered
        if covered > n:
            raise ValueError(f"the FAISS segments cover {covered} rows; the base has {n}")
        q = b = None
        if m and covered:
            q, b = self._candidates(queries, threshold, live, nearest)
        return self._assemble(queries, base, threshold, live, q, b, nearest=nearest)

    def _assemble(
        self, queries, base, threshold: float, live, q, b, *, nearest: bool
    ) -> CrossResult:
        """The result of :meth:`search` from the segments' candidates ``(q, b)`` (None:
        none searched): rescored canonically, plus the exact tail."""
        m = queries.shape[0]
        n = base.shape[0]
        covered = self.covered
        query_best = np.full(m, -np.inf)
        # Base rows' best scores only when asked: an N-long array per single-row query
        # costs more than the FAISS search itself at 1M rows (1 ms measured).
        base_best = np.full(n if nearest else 0, -np.inf)
        parts_q, parts_b, parts_s = [], [], []
        if q is not None:
            s = canonical_scores(queries, q, b, other=base)
            np.maximum.at(query_best, q, s)
            if nearest:
                np.maximum.at(base_best, b, s)
            hit = s >= threshold
            parts_q.append(q[hit])
            parts_b.append(b[hit])
            parts_s.append(s[hit])
        if m and n > covered:  # the tail, exactly
            tail = cross_search(
                queries,
                RowRange(base, covered, n),
                threshold,
                base_live=None if live is None else live[covered:n],
                base_best=nearest,
            )
            parts_q.append(tail.q)
            parts_b.append(tail.b + covered)
            parts_s.append(tail.s)
            query_best = np.maximum(query_best, tail.query_best)
            if nearest:
                base_best[covered:] = np.maximum(base_best[covered:], tail.base_best)
        if not parts_q:
            empty = np.zeros(0, np.int64)
            return CrossResult(empty, empty, np.zeros(0), query_best, base_best)
        q, b, s = np.concatenate(parts_q), np.concatenate(parts_b), np.concatenate(parts_s)
        order = np.lexsort((q, b))
        return CrossResult(q[order], b[order], s[order], query_best, base_best)

    def search_batch(
        self, queries: np.ndarray, base, threshold: float, live: np.ndarray | None = None
    ) -> tuple[CrossResult, PairSet, np.ndarray, np.ndarray, Any] | None:
        """A bulk add's whole search in one pass over the IVF lists: the new rows
        (``queries``) against ``base`` as :meth:`search` with ``nearest=True``, *and*
        against each other, through the same per-list products.

        The new rows are put in their nearest list of the shared coarse quantizer (a
        segment of their own, exactly the one an add would write for them), and each
        new row's ``nprobe`` lists are multiplied by the old rows *and* the new rows
        listed there: the batch's own pairs cost a share of the products already being
        made, instead of a separate clustering of the batch (``partitioned``), and have
        the recall of the cross pairs (both directions taken: a pair is found when
        either row probes the other's list).  Every pair reported is rescored
        canonically and exact; nearest and best-earlier scores are lower bounds.

        Returns ``(cross, within, nearest_in, earlier_in, segment)``: ``within`` the
        batch's pairs (batch row numbers), ``nearest_in`` / ``earlier_in`` each new row's
        best canonical score to another / an earlier new row found (``-inf`` where
        none), ``segment`` the FAISS index over the new rows; or None where this path
        does not apply (HNSW, no IVF segment yet, fewer than :data:`GEMM_QUERIES` rows):
        search the batch another way then."""
        m, d = queries.shape
        n = base.shape[0]
        covered = self.covered
        if self.kind != "ivf" or not covered or m < GEMM_QUERIES:
            return None
        if covered > n:
            raise ValueError(f"the FAISS segments cover {covered} rows; the base has {n}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        first = self.segments[0].index
        _, assign = first.quantizer.search(queries, first.nprobe)
        segment = self._segment_from_assignment(queries, assign[:, 0])
        batch = Segment(covered, covered + m, segment)  # labels after the segments' rows
        delta = candidate_delta(d)
        q, b = self._gemm_candidates(
            queries, threshold - delta, delta, live, True, batch=batch, assign=assign
        )
        inside = b >= covered
        # The batch's pairs, both directions as (lower, higher) batch row.
        bi, bj = q[inside], b[inside] - covered
        lo, hi = np.minimum(bi, bj), np.maximum(bi, bj)
        key = np.unique(lo * np.int64(m) + hi)
        lo, hi = key // m, key % m
        s_in = canonical_scores(queries, lo, hi)
        nearest_in = np.full(m, -np.inf)
        earlier_in = np.full(m, -np.inf)
        np.maximum.at(nearest_in, lo, s_in)
        np.maximum.at(nearest_in, hi, s_in)
        np.maximum.at(earlier_in, hi, s_in)
        hit = s_in >= threshold
        within = PairSet(lo[hit], hi[hit], s_in[hit])  # sorted by (i, j): from the keys
        # The cross side, as search() assembles it (the exact tail included).
        q, b = q[~inside], b[~inside]
        cross = self._assemble(queries, base, threshold, live, q, b, nearest=True)
        return cross, within, nearest_in, earlier_in, segment

    def _segment_from_assignment(self, rows: np.ndarray, lists: np.ndarray):
        """An IVF segment over ``rows`` on the shared quantizer, each row put in the list
        already found for it (FAISS's ``add_core`` with precomputed assignments: the
        coarse search is not repeated)."""
        first = self.segments[0].index
        quantizer = faiss_module().clone_index(first.quantizer)
        index = ivf_from_assignment(quantizer, rows, lists, fp16=is_fp16(first))
        self._configure(index)
        return index

    def _candidates(self, queries: np.ndarray, threshold: float, live, nearest: bool):
        """Distinct ``(query, row)`` candidates from every segment: range hits at
        ``threshold - delta`` and (``nearest``) each query's top-``k`` rows within
        ``delta`` of its float32 best, live rows only."""
        m, d = queries.shape
        delta = candidate_delta(d)
        block = QUERY_BLOCK
        if self.kind == "hnsw":
            from ..search.hnsw import safe_range_block

            block = min(256, *(safe_range_block(s.index) for s in self.segments))
        radius = threshold - delta
        if self.kind == "ivf" and m >= GEMM_QUERIES:
            return self._gemm_candidates(queries, radius, delta, live, nearest)
        qs, bs = [], []
        for a in range(0, m, block):
            chunk = np.ascontiguousarray(queries[a : a + block], dtype=np.float32)
            rows = np.arange(a, a + chunk.shape[0])
            assign = None
            # Several segments (or a top-k search as well) share one coarse assignment;
            # a single range search lets FAISS assign inside its own call (one call
            # fewer per query: the single-image query on a compacted index).
            if self.kind == "ivf" and (nearest or len(self.segments) > 1):
                first = self.segments[0].index
                assign = first.quantizer.search(chunk, first.nprobe)[::-1]  # (I, D)
            tops, top_scores = [], []
            for seg in self.segments:
                idx = seg.index
                if assign is not None:
                    lims, _, labels = idx.range_search_preassigned(
                        chunk, radius, assign[0], assign[1]
                    )
                else:
                    lims, _, labels = idx.range_search(chunk, radius)
                qs.append(np.repeat(rows, np.diff(lims.astype(np.int64))))
                bs.append(labels.astype(np.int64) + seg.start)
                if nearest:
                    k = min(NEAREST_K, seg.stop - seg.start)
                    if assign is not None:
                        scores, top = idx.search_preassigned(chunk, k, assign[0], assign[1])
                    else:
                        scores, top = idx.search(chunk, k)
                    top = top.astype(np.int64)
                    tops.append(np.where(top >= 0, top + seg.start, -1))
                    top_scores.append(scores)
            if nearest:
                top = np.concatenate(tops, axis=1)
                scores = np.concatenate(top_scores, axis=1)
                ok = top >= 0
                if live is not None:
                    ok &= live[np.where(ok, top, 0)]
                best = np.where(ok, scores, -np.inf).max(axis=1)
                near = ok & (scores >= (best - delta)[:, None])
                qs.append(np.broadcast_to(rows[:, None], top.shape)[near])
                bs.append(top[near])
        q = np.concatenate(qs)
        b = np.concatenate(bs)
        keep = b >= 0
        if live is not None:
            keep &= live[np.where(keep, b, 0)]
        q, b = q[keep], b[keep]
        span = np.int64(self.covered)
        key = np.unique(q * span + b)
        return key // span, key % span

    def _gemm_candidates(
        self, queries, radius: float, delta: float, live, nearest: bool, batch=None, assign=None
    ):
        """:meth:`_candidates` for a batch on IVF segments, as GEMM: each query is
        assigned to its ``nprobe`` lists once; then, list by list and segment by segment,
        the queries assigned to the list times the list's stored vectors (IVF-Flat codes
        are the float32 rows) give every candidate the FAISS scan would: scores above
        ``radius``, and the rows within ``delta`` of each query's best (nearest).

        ``batch``: a further segment holding the queries themselves (labels from its
        ``start``; :meth:`search_batch`): each query's own entry is left out, and its
        near-best rows there are kept against its best *in the batch*, apart from its
        best among the segments' rows (so neither side's nearest is lost to the other).
        ``assign``: the queries' lists, when already known."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        m = queries.shape[0]
        first = self.segments[0].index
        if assign is None:
            _, assign = first.quantizer.search(queries, first.nprobe)
        flat = assign.ravel()
        order = np.argsort(flat, kind="stable")
        lists, starts = np.unique(flat[order], return_index=True)
        ends = np.r_[starts[1:], order.shape[0]]
        segments = [*self.segments, batch] if batch is not None else list(self.segments)
        jobs = [
            (seg, lst, a, b)
            for seg in segments
            for lst, a, b in zip(lists.tolist(), starts.tolist(), ends.tolist(), strict=True)
            if lst >= 0
        ]

        readers = {id(seg): ListReader(seg.index, seg.path) for seg in segments}

        def run(chunk):
            """Products of one share of the lists: candidates and best scores (over the
            segments, and over the batch)."""
            qs, bs, ss = [], [], []
            best = np.full(m, -np.inf, dtype=np.float32)
            best_in = np.full(m, -np.inf, dtype=np.float32)
            for seg, lst, a, b in chunk:
                vectors, ids = readers[id(seg)].read(lst)
                if ids.shape[0] == 0:
                    continue
                ids += seg.start
                own = seg is batch
                dead = None if own or live is None else ~live[ids]
                everyone = order[a:b] // assign.shape[1]
                # Queries in tiles of at most TILE_ENTRIES scores: rows unlike the data
                # the quantizer was trained on crowd into a few lists, and a batch of
                # them met itself there in one (m/3 x m/10) product (4.4 GB traced for
                # 100k such rows at 1M).
                step = max(1, TILE_ENTRIES // ids.shape[0])
                for c in range(0, everyone.shape[0], step):
                    who = everyone[c : c + step]
                    scores = queries[who] @ vectors.T
                    if own:  # a query never pairs with itself
                        scores[who[:, None] == ids[None, :] - seg.start] = -np.inf
                    elif dead is not None:
                        scores[:, dead] = -np.inf
                    if nearest:
                        # Near-best entries against the running best of each query (not
                        # this list's): a query probes nprobe lists in every segment, and
                        # one entry per list kept until the end held m x nprobe x
                        # segments entries (2.4 GB for a 262k-row batch at 10M rows).
                        running = best_in if own else best
                        np.maximum.at(running, who, scores.max(axis=1))
                        keep = (scores > radius) | (scores >= (running[who] - delta)[:, None])
                        keep &= scores > -np.inf  # never itself, nor a removed row
                    else:
                        keep = scores > radius
                    qi, bi = np.nonzero(keep)
                    qs.append(who[qi])
                    bs.append(ids[bi])
                    ss.append(scores[qi, bi])
            return qs, bs, ss, best, best_in

        # Many small products: single-threaded BLAS in one worker per core (a threaded
        # BLAS spends more time waking its threads than multiplying, worst on a busy
        # machine: 5x measured).
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        workers = max(1, min(available_cpus(), len(jobs) // 16 or 1))
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                if workers == 1:
                    results = [run(jobs)]
                else:
                    with ThreadPoolExecutor(workers) as pool:
                        results = list(pool.map(run, [jobs[w::workers] for w in range(workers)]))
        finally:
            for reader in readers.values():
                reader.close()
        qs = [x for r in results for x in r[0]]
        bs = [x for r in results for x in r[1]]
        ss = [x for r in results for x in r[2]]
        best = np.max([r[3] for r in results], axis=0)
        best_in = np.max([r[4] for r in results], axis=0)
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        q, b, s = np.concatenate(qs), np.concatenate(bs), np.concatenate(ss)
        if nearest:  # range hits, and the rows within delta of each query's best
            near = best[q] if batch is None else np.where(b >= batch.start, best_in[q], best[q])
            keep = (s > radius) | (s >= near - delta)
            q, b = q[keep], b[keep]
        span = np.int64(segments[-1].stop)
        key = np.unique(q.astype(np.int64) * span + b)
        return key // span, key % span


def new_ivf(quantizer: Any, d: int, nlist: int, *, fp16: bool, own: bool = True) -> Any:
    """An empty, trained IVF index on ``quantizer`` (which it takes ownership of; with
    ``own=False`` the caller keeps it alive), inner product: IVF-Flat (float32 lists),
    or with ``fp16`` float16 lists
    (``IndexIVFScalarQuantizer`` ``QT_fp16``, no residuals: each code is the row itself,
    so a float16 index's rows are held exactly in half the bytes)."""
    faiss = faiss_module()
    if fp16:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    if own:
        index.own_fields = True
        quantizer.this.disown()
    index.is_trained = True
    return index


def ivf_from_assignment(
    quantizer: Any, rows: Any, lists: np.ndarray, *, fp16: bool, block: int = 1 << 14
) -> Any:
    """An IVF index on ``quantizer`` (:func:`new_ivf` takes it) holding ``rows`` (an
    array-like, read ``block`` rows at a time as float32: 16k rows, 32 MiB at D = 512;
    64k-row blocks raised a 512k-row segment's peak by ~190 MiB, at no gain in speed),
    row ``r`` in list ``lists[r]`` already found for it (FAISS's ``add_core``: no coarse
    search).

    Each list's capacity is reserved at its final size first (a resize up and back down
    to zero keeps the capacity): rows appended one by one grow a list's buffer by
    doubling, which held ~1.55x the rows' bytes (measured: 300k float16 rows in 15k
    lists, 455 MiB for 293 MiB of rows; reserved, 328 MiB with the quantizer), ~0.5 GiB
    too much for a 1M-row segment of a 10M-row build."""
    faiss = faiss_module()
    index = new_ivf(quantizer, quantizer.d, quantizer.ntotal, fp16=fp16)
    counts = np.bincount(np.asarray(lists, dtype=np.int64), minlength=quantizer.ntotal)
    invlists = faiss.extract_index_ivf(index).invlists
    for k in np.flatnonzero(counts).tolist():
        invlists.resize(k, int(counts[k]))
        invlists.resize(k, 0)
    for a in range(0, rows.shape[0], block):
        b = min(rows.shape[0], a + block)
        x = np.ascontiguousarray(rows[a:b], dtype=np.float32)
        at = np.ascontiguousarray(lists[a:b], dtype=np.int64)
        index.add_core(b - a, faiss.swig_ptr(x), None, faiss.swig_ptr(at))
    return index


def on_quantizer_of(first: Any, index: Any) -> Any:
    """IVF segment ``index`` on the coarse quantizer of segment ``first``: a new IVF
    object that takes over ``index``'s inverted lists (FAISS's own ``own_invlists``
    flag hands them on; nothing is copied) and searches ``first``'s quantizer, which it
    keeps alive; ``index`` and its copy of the centroids are freed with it.  Every
    segment file holds the whole quantizer (at 10M rows 49k x 512 float32, 100 MB), so
    ten loaded segments held ~1 GB of the same centroids.  ``index`` is returned as it
    is when it already searches ``first``'s quantizer, or when its centroids differ."""
    faiss = faiss_module()
    ivf, base = faiss.extract_index_ivf(index), faiss.extract_index_ivf(first)
    mine, shared = ivf.quantizer, base.quantizer
    if int(mine.this) == int(shared.this):
        return index
    if (mine.ntotal, mine.d) != (shared.ntotal, shared.d) or not np.array_equal(
        _centroids(mine), _centroids(shared)
    ):
        return index
    out = new_ivf(shared, int(ivf.d), int(ivf.nlist), fp16=is_fp16(index), own=False)
    out.referenced_objects = [first]  # the owner of the shared quantizer
    ivf.own_invlists = False
    out.replace_invlists(ivf.invlists, True)
    out.ntotal = ivf.ntotal
    return out


def _centroids(quantizer: Any) -> np.ndarray:
    """A flat quantizer's centroids, as a view of its storage (no copy)."""
    faiss = faiss_module()
    flat = faiss.downcast_index(quantizer)
    return faiss.rev_swig_ptr(flat.get_xb(), int(flat.ntotal) * int(flat.d))


def is_fp16(index: Any) -> bool:
    """Whether an IVF segment holds float16 lists (see :func:`new_ivf`)."""
    ivf = faiss_module().extract_index_ivf(index)
    return int(ivf.code_size) == 2 * int(ivf.d)


class ListReader:
    """Reads the inverted lists of one IVF segment (float32 or float16 lists) as float32
    rows and int64 labels.  For a segment memory-mapped from ``path`` the lists are read
    with ``pread`` (page cache, never the process's resident memory) instead of through
    the mapping.  The FAISS handles are looked up once, not per list (a 10M-row add reads
    hundreds of thousands of lists).  Use as a context manager (it holds ``path`` open)."""

    def __init__(self, index: Any, path: str | None = None) -> None:
        faiss = faiss_module()
        self._faiss = faiss
        ivf = faiss.extract_index_ivf(index)
        self.d, self.code_size = int(ivf.d), int(ivf.code_size)
        self.fp16 = self.code_size == 2 * self.d
        self._invlists = ivf.invlists
        self._fd = None
        if path is not None:
            self._lists = faiss.downcast_InvertedLists(ivf.invlists).lists
            self._fd = os.open(path, os.O_RDONLY)

    def __enter__(self) -> ListReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, lst: int) -> tuple[np.ndarray, np.ndarray]:
        """List ``lst``: its rows (float32; a read-only view of FAISS's memory for
        in-memory float32 lists, else a fresh array) and labels (a fresh int64 array)."""
        d, code_size, faiss = self.d, self.code_size, self._faiss
        size = int(self._invlists.list_size(lst))
        if size == 0:
            return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
        if self._fd is not None:
            entry = self._lists.at(lst)
            offset, capacity = int(entry.offset), int(entry.capacity)
            codes = np.frombuffer(os.pread(self._fd, size * code_size, offset), np.uint8)
            raw = os.pread(self._fd, size * 8, offset + capacity * code_size)
            ids = np.frombuffer(raw, np.int64).copy()
        else:
            codes = faiss.rev_swig_ptr(self._invlists.get_codes(lst), size * code_size)
            ids = faiss.rev_swig_ptr(self._invlists.get_ids(lst), size).astype(np.int64)
        if self.fp16:
            return codes.view(np.float16).reshape(size, d).astype(np.float32), ids
        return codes.view(np.float32).reshape(size, d), ids


def read_list(
    index: Any, lst: int, path: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One list of an IVF segment as :class:`ListReader` reads it (``path``: the file
    the segment is memory-mapped from, read with ``pread``)."""
    with ListReader(index, None if path is None else str(path)) as reader:
        return reader.read(lst)
