"""Recall of an approximate search, measured against exact search on a row sample.

Approximate backends (``ivf``, ``hnsw``, ``partitioned``) report only pairs they found;
every reported pair is rescored canonically, so what they can get wrong is *missing*
pairs.  This module measures how many, without the cost of an exact all-pairs run:
``sample`` rows are drawn at random and the exact set of pairs that involve at least one
of them is computed (sampled rows against all rows, float32 tiles at
``threshold - delta``, then canonical rescoring and ``>= threshold``, as every exact
backend does).  Comparing it with the found pairs that involve a sampled row gives an
unbiased estimate of the pair recall; with all rows sampled it is the exact recall.

Cost: ``sample x N x D`` multiply-adds; memory ``O(row_block x col_block)`` floats plus
the pairs, whatever N (the embeddings may live on disk).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..validation import check_positive_int
from .backends import check_backend, search
from .canonical import as_unit_float32, candidate_delta, canonical_scores
from .pairs import PairSet

__all__ = [
    "RecallReport",
    "exact_pairs_of_rows",
    "measure_recall",
    "measure_recall_of",
    "sample_rows",
]

#: Sampled rows per float32 tile, and database columns per tile: 1024 x 8192 x 4 bytes
#: = 32 MiB of scores at a time.
ROW_BLOCK = 1024
COL_BLOCK = 8192
#: Sampled rows held at once (32 MiB at D = 512): every column block is read once for
#: all of them.  (Read once per 1024 sampled rows before, measuring 6000 rows against a
#: 10M-row float16 store read it 6 times: ~55 s a pass, the store's float16 -> float32
#: reads, not the GEMM, setting the pace.)
QUERY_ROWS = 16384


@dataclass(frozen=True)
class RecallReport:
    """Found pairs vs the exact pairs that involve at least one sampled row.

    Attributes:
        recall: share of the exact pairs that were found (1.0 when there are none).
        precision: share of the found pairs (involving a sampled row) that are exact
            pairs (1.0 when none were found); below 1 means the found pairs were scored
            on different vectors or a different threshold.
        n_exact: exact pairs involving a sampled row.
        n_found: found pairs involving a sampled row.
        n_missed: exact pairs not found.
        sampled_rows: rows sampled (N when N <= sample).
        seconds: time spent measuring (the exact side; not the search being measured).
    """

    recall: float
    precision: float
    n_exact: int
    n_found: int
    n_missed: int
    sampled_rows: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"recall {self.recall:.4f} ({self.n_exact - self.n_missed}/{self.n_exact} exact "
            f"pairs found, {self.n_missed} missed), precision {self.precision:.4f} "
            f"({self.n_found} found), {self.sampled_rows} sampled rows, {self.seconds:.2f} s"
        )


def measure_recall(
    embeddings: Any,
    threshold: float,
    found: Any,
    *,
    sample: int = 1000,
    seed: int = 0,
) -> RecallReport:
    """Recall (and precision) of ``found`` on the pairs involving ``sample`` random rows.

    Args:
        embeddings: the ``(N, D)`` rows the search ran on (unit float32, as the backends
            get them; any float dtype works, blocks are cast to float32), or anything
            indexable like them (``x[a:b]``, ``x[int_array]``, ``.shape``).
        threshold: the threshold the search used.
        found: the pairs found, a :class:`PairSet` or anything with ``iter_chunks()``
            yielding them (a spilled pair file).
        sample: rows to sample (all rows when ``N <= sample``).
        seed: seeds the sample.
    """
    sample = check_positive_int(sample, "sample")
    start = time.perf_counter()
    n = embeddings.shape[0]
    rows = sample_rows(n, sample, seed)
    exact = exact_pairs_of_rows(embeddings, threshold, rows)
    sampled = np.zeros(n, dtype=bool)
    sampled[rows] = True
    exact_keys = exact.i * n + exact.j
    found_keys = _keys_involving(found, sampled, n)
    n_hit = int(np.isin(found_keys, exact_keys, assume_unique=True).sum())
    n_exact, n_found = int(exact_keys.size), int(found_keys.size)
    return RecallReport(
        recall=n_hit / n_exact if n_exact else 1.0,
        precision=n_hit / n_found if n_found else 1.0,
        n_exact=n_exact,
        n_found=n_found,
        n_missed=n_exact - n_hit,
        sampled_rows=int(rows.size),
        seconds=time.perf_counter() - start,
    )


def sample_rows(n: int, sample: int, seed: int = 0) -> np.ndarray:
    """The rows :func:`measure_recall` samples: ``sample`` distinct rows of ``n`` drawn
    with ``seed``, ascending (all rows when ``n <= sample``)."""
    if n <= sample:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


def exact_pairs_of_rows(embeddings: Any, threshold: float, rows: np.ndarray) -> PairSet:
    """Every pair ``i < j`` with canonical similarity ``>= threshold`` and ``i`` or ``j``
    in ``rows``: ``rows`` against all rows in float32 tiles, candidates at
    ``threshold - delta``, then canonical rescoring (exact, like the exact backends)."""
    n, d = embeddings.shape
    rows = np.asarray(rows, dtype=np.int64)
    radius = threshold - candidate_delta(d)
    parts: list[np.ndarray] = []
    for g in range(0, rows.size, QUERY_ROWS):
        group = rows[g : g + QUERY_ROWS]
        queries = np.asarray(embeddings[group], dtype=np.float32)
        for c in range(0, n, COL_BLOCK):
            e = min(n, c + COL_BLOCK)
            columns = np.asarray(embeddings[c:e], dtype=np.float32)
            for a in range(0, group.size, ROW_BLOCK):
                scores = queries[a : a + ROW_BLOCK] @ columns.T
                qi, qj = np.nonzero(scores > radius)
                qi, qj = group[a + qi], qj.astype(np.int64) + c
                other = qi != qj
                qi, qj = qi[other], qj[other]
                # A pair of two sampled rows is seen from both: one key per pair.
                parts.append(np.minimum(qi, qj) * n + np.maximum(qi, qj))
    keys = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    i, j = keys // n, keys % n
    s = canonical_scores(embeddings, i, j) if keys.size else np.zeros(0, np.float64)
    hit = s >= threshold
    return PairSet(i[hit], j[hit], s[hit])


def _keys_involving(found: Any, sampled: np.ndarray, n: int) -> np.ndarray:
    """Distinct keys ``i * n + j`` of the found pairs with ``i`` or ``j`` sampled."""
    chunks = found.iter_chunks() if hasattr(found, "iter_chunks") else [found]
    parts = []
    for chunk in chunks:
        i = np.asarray(chunk.i, dtype=np.int64)
        j = np.asarray(chunk.j, dtype=np.int64)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        mine = sampled[lo] | sampled[hi]
        parts.append(lo[mine] * n + hi[mine])
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def measure_recall_of(
    embeddings: Any,
    threshold: float,
    backend: str,
    *,
    sample: int = 1000,
    seed: int = 0,
    **backend_options: Any,
) -> RecallReport:
    """Run ``backend`` over ``embeddings`` (pairs only) and measure its recall.

    The rows are normalised as :func:`dedup_index.dedup_embeddings` normalises them
    (:func:`~dedup_index.search.canonical.as_unit_float32`) when ``embeddings`` is an
    ndarray; other array-likes (an :class:`~dedup_index.store.EmbeddingStore`) are taken
    as unit float32 rows and searched as they are.  The search runs through the backend
    registry (:func:`dedup_index.search.backends.search`): any registered name works.
    ``backend_options`` are the backend's options (e.g. ``nprobe=4`` for ``ivf``,
    ``ef_search=32`` for ``hnsw``), plus ``threads`` and ``device`` for the search itself.
    """
    check_backend(backend)
    unit = as_unit_float32(embeddings) if isinstance(embeddings, np.ndarray) else embeddings
    options = dict(backend_options)
    threads = options.pop("threads", None)
    device = options.pop("device", None)
    found = search(
        unit,
        threshold,
        backend=backend,
        nearest=False,
        threads=threads,
        device=device,
        options=options,
    )
    return measure_recall(unit, threshold, found.pairs, sample=sample, seed=seed)
