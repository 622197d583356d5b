"""The exact searches' end phase: compiled canonical rescoring, maxima folded as they
become final, and memory that does not grow with the near-best entries.

- ``rescore.canonical_pairs`` (numba) gives the bits of the numpy definition
  (``canonical.canonical_scores_numpy``) for any rows: equal rows, rows off unit norm,
  float64 rows, two matrices, a store.
- ``blocked``'s CPU loop folds each row block's maxima when the block is done and each
  column's when every block before it is done (``blocked._Columns``): the same pairs,
  nearest and best-earlier scores as the dense oracle whatever the merge schedule.
- A search over a store keeps its traced memory bounded as ``N`` grows (child process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index.search import as_unit_float32
from dedup_index.search import blocked as blocked_mod
from dedup_index.search.blocked import blocked_search
from dedup_index.search.canonical import canonical_scores, canonical_scores_numpy
from dedup_index.search.dense import dense_search_all
from dedup_index.search.rescore import canonical_pairs, dots32
from dedup_index.search.tiles import fold_best
from dedup_index.store import EmbeddingStore
from dedup_index.testing import mixed_adversarial

THRESHOLD = 0.9
SETTINGS = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.one_of(st.integers(1, 70), st.sampled_from([255, 256, 257, 512, 768])),
    scale=st.floats(0.999, 1.001),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_compiled_canonical_scores_are_the_numpy_definition(seed, d, scale, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((60, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = (x * scale).astype(dtype)
    x[1] = x[0]  # equal rows: exactly 1.0
    x[3] = -x[2]
    x[4, : d // 2] = 0.0
    i = rng.integers(0, 60, 500)
    j = rng.integers(0, 60, 500)
    i[:4], j[:4] = [0, 1, 2, 5], [1, 0, 3, 5]
    want = canonical_scores_numpy(x, i, j)
    assert np.array_equal(_bits(canonical_scores(x, i, j)), _bits(want))
    assert np.array_equal(_bits(canonical_pairs(x, x, i, j)), _bits(want))
    # two matrices (queries against a base), and a strided view: gathered first
    y = np.asfortranarray(x[::-1])
    want_xy = canonical_scores_numpy(x, i, j, other=y)
    assert np.array_equal(_bits(canonical_scores(x, i, j, other=y)), _bits(want_xy))
    # the float32 dots of tighten: within the float32 bound of the exact product
    if dtype == np.float32:
        exact = (x[i].astype(np.float64) * x[j].astype(np.float64)).sum(axis=1)
        got = dots32(x, x, i, j).astype(np.float64)
        assert np.all(np.abs(got - exact) <= 1.01 * d * 2.0**-24 * scale**2 + 1e-12)


def test_canonical_scores_read_a_store_like_an_array(tmp_path):
    rng = np.random.default_rng(7)
    x = as_unit_float32(rng.standard_normal((300, 24)))
    with EmbeddingStore.create(tmp_path / "s", 24, shard_rows=64) as store:
        store.append(x)
    store = EmbeddingStore.open(tmp_path / "s")
    i = rng.integers(0, 300, 20000)  # more than one gathered call (GATHER_PAIRS)
    j = rng.integers(0, 300, 20000)
    assert np.array_equal(_bits(canonical_scores(store, i, j)), _bits(canonical_scores(x, i, j)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batches=st.integers(1, 6))
def test_folding_rows_batch_by_batch_gives_the_bits_of_one_fold(seed, batches):
    """``fold_best`` over disjoint sets of rows, in any order, equals one fold of all."""
    rng = np.random.default_rng(seed)
    d, n = 32, 80
    base = as_unit_float32(rng.standard_normal((n, d)))
    near = as_unit_float32(base[rng.integers(0, n, 400)] + 0.08 * rng.standard_normal((400, d)))
    E = np.concatenate([base, near])
    rows = rng.integers(0, n, 400)
    partners = np.arange(n, n + 400)
    exact = canonical_scores(E, rows, partners)
    values = (exact + rng.uniform(-0.004, 0.004, 400)).astype(np.float32)
    best = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(best, rows, values)
    window = np.float32(0.01)
    whole = np.full(n, -np.inf)
    fold_best(E, [(rows, partners, values)], best, window, whole)
    split = np.full(n, -np.inf)
    group = rng.integers(0, batches, n)  # each row's entries all in one batch
    for g in rng.permutation(batches):
        sel = group[rows] == g
        fold_best(E, [(rows[sel], partners[sel], values[sel])], best, window, split)
    assert np.array_equal(whole, split)
    # a row's entries spread over batches, each pruned against a running lower bound
    spread = np.full(n, -np.inf)
    piece = rng.integers(0, batches, rows.size)
    running = np.full(n, -np.inf, dtype=np.float32)
    for g in range(batches):
        sel = piece == g
        np.maximum.at(running, rows[sel], values[sel])
        fold_best(E, [(rows[sel], partners[sel], values[sel])], running, window, spread)
    assert np.array_equal(whole, spread)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one constant, set alike
)
@given(
    seed=st.integers(0, 2**31 - 1),
    window=st.sampled_from([1.2e-4, 0.004, 0.017]),
    workers=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_the_compiled_fold_keeps_the_survivors_of_the_numpy_steps(
    seed, window, workers, dtype, monkeypatch
):
    """``rescore.fold_entries`` (one compiled pass per step) raises every row to the bits
    the numpy steps give (``prune_near``, ``tighten``, ``rescore_keys``,
    ``np.maximum.at``), for float32 and low-precision windows, on rows whose partners
    crowd within the window (ties included), split over threads by row range."""
    from dedup_index.search import rescore
    from dedup_index.search.canonical import candidate_delta
    from dedup_index.search.tiles import prune_near, rescore_keys, tighten

    monkeypatch.setattr(rescore, "FOLD_THREAD_ENTRIES", 16)
    rng = np.random.default_rng(seed)
    d, n, m = 24, 60, 900
    base = as_unit_float32(rng.standard_normal((n, d)))
    near = as_unit_float32(base[rng.integers(0, n, m)] + 0.05 * rng.standard_normal((m, d)))
    near[::7] = near[1::7][: near[::7].shape[0]]  # repeated partners: equal scores
    E = np.concatenate([base, near]).astype(dtype)
    rows = rng.integers(0, n, m)
    partners = np.arange(n, n + m)
    exact = canonical_scores(E, rows, partners)
    values = (exact + rng.uniform(-window / 4, window / 4, m)).astype(np.float32)
    values[::5] = np.float32(np.round(values[::5], 2))  # ties in the tile values
    best = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(best, rows, values)
    best -= np.float32(rng.uniform(0, window / 2))  # a running lower bound
    w = np.float32(window)
    want = np.full(n, -np.inf)
    kept = prune_near([(rows, partners, values)], best, w)
    if kept:
        r, p, v = kept[0]
        r, p = tighten(E, r.astype(np.int64), p.astype(np.int64), v, window=w)
        np.maximum.at(want, r, rescore_keys(E, r, p))
    got = np.full(n, -np.inf)
    rescore.fold_entries(E, E, rows, partners, values, best, w, candidate_delta(d), got, workers)
    assert np.array_equal(_bits(got), _bits(want))
    via = np.full(n, -np.inf)
    fold_best(
        E,
        [(rows[:400], partners[:400], values[:400]), (rows[400:], partners[400:], values[400:])],
        best,
        w,
        via,
        workers=workers,
    )
    assert np.array_equal(_bits(via), _bits(want))


def _rows(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [mixed_adversarial(seed, n // 2, d, THRESHOLD)]
    centres = rng.standard_normal((6, d))
    parts.append(
        centres[rng.integers(0, 6, n - n // 2)] + 0.35 * rng.standard_normal((n - n // 2, d))
    )
    x = as_unit_float32(np.concatenate(parts))
    return x[rng.permutation(n)]


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    merge=st.sampled_from([1, 50, 1 << 20]),
    threads=st.sampled_from([1, 2]),
    precision=st.sampled_from(["fp32", "bf16"]),
    seeded=st.booleans(),
)
def test_blocked_over_a_store_folds_maxima_as_they_become_final(
    tmp_path_factory, monkeypatch, seed, merge, threads, precision, seeded
):
    """Column entries merged and folded after every block, every few blocks, or only at
    the end (``MERGE_ENTRIES``; ``PENDING_ENTRIES`` folding non-final columns early),
    columns' running maxima seeded or not (``column_seed``), one or two workers, a store
    or an array: the oracle's bits."""
    monkeypatch.setattr(blocked_mod, "MERGE_ENTRIES", merge)
    monkeypatch.setattr(blocked_mod, "PENDING_ENTRIES", 4 * merge)
    monkeypatch.setattr(blocked_mod, "SEED_FROM", 1 if seeded else 1 << 30)
    monkeypatch.setattr(blocked_mod, "SEED_ROWS", 90)
    x = _rows(seed, 700, 24)
    path = tmp_path_factory.mktemp("store") / "s"
    with EmbeddingStore.create(path, 24, shard_rows=256) as store:
        store.append(x, normalize=False)
    store = EmbeddingStore.open(path)
    oracle = dense_search_all(x, THRESHOLD, nearest=True)
    for source in (store, x):
        pairs, nearest, earlier = blocked_search(
            source, THRESHOLD, precision=precision, tile=(64, 128), threads=threads
        )
        assert pairs.equals(oracle[0])
        assert np.array_equal(nearest, oracle[1])
        assert np.array_equal(earlier, oracle[2])


def test_prepare_measures_a_store_and_copies_no_large_array(tmp_path, monkeypatch):
    """A store's rounding error is measured (the tighter window) without a rounded copy;
    an array over ``WHOLE_COPY_BYTES`` is rounded as read; the same bits either way."""
    from dedup_index.search import precision as prec

    x = _rows(3, 600, 32)
    with EmbeddingStore.create(tmp_path / "s", 32) as store:
        store.append(x, normalize=False)
    store = EmbeddingStore.open(tmp_path / "s")
    arith = prec.Arithmetic("bf16", "numpy", "cpu", 32)
    rows, measured = arith.prepare(store)
    assert isinstance(rows, prec.RoundedRows)
    copy, whole = arith.prepare(x)
    assert isinstance(copy, np.ndarray)
    assert measured.row_error == whole.row_error and measured.window < arith.window
    monkeypatch.setattr(prec, "WHOLE_COPY_BYTES", 1024)
    rows, big = arith.prepare(x)
    assert isinstance(rows, prec.RoundedRows) and big.row_error == whole.row_error
    assert np.array_equal(rows[10:20], copy[10:20])
    ref = blocked_search(x, THRESHOLD, precision="fp32", tile=(64, 128))
    got = blocked_search(x, THRESHOLD, precision="bf16", tile=(64, 128))
    assert got[0].equals(ref[0])
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[2], ref[2])


_CHILD = textwrap.dedent(
    """
    import json, sys, tracemalloc
    import numpy as np
    from dedup_index.search import as_unit_float32
    from dedup_index.search import blocked
    from dedup_index.search.blocked import blocked_search
    from dedup_index.store import EmbeddingStore

    n, path = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64))
    with EmbeddingStore.create(path, 64) as store:
        for a in range(0, n, 4096):
            m = min(4096, n - a)
            rows = centres[rng.integers(0, 40, m)] + 0.6 * rng.standard_normal((m, 64))
            store.append(as_unit_float32(rows))
    store = EmbeddingStore.open(path)
    blocked_search(store[:300], 0.9, precision="bf16")  # compile and import first
    blocked.MERGE_ENTRIES, blocked.PENDING_ENTRIES = 8192, 16384  # small N, small caps
    tracemalloc.start()
    pairs, nearest, earlier = blocked_search(
        store, 0.95, precision="bf16", tile=(256, 1024), threads=2
    )
    print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "pairs": len(pairs)}))
    """
)


@pytest.mark.slow
def test_store_search_memory_does_not_grow_with_the_near_best_entries(tmp_path):
    """Traced (numpy) peak of a bf16 search over a store at N and 4N rows: what grows
    is per-row arrays and one row block's column entries in flight (~0.6 KiB a row
    here), not the near-best entries held to the end (~460 a row on these clustered
    rows, 20 bytes each: ~9 KiB a row before the maxima were folded as they became
    final)."""
    peaks = {}
    for n in (10000, 40000):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(n), str(tmp_path / f"s{n}")],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    grown = peaks[40000] - peaks[10000]
    assert grown < 30000 * 1024, peaks  # under 1 KiB per added row


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), precision=st.sampled_from(["fp32", "bf16", "fp16"]))
def test_column_seed_is_a_lower_bound_of_every_columns_tile_maximum(seed, precision):
    """``column_seed`` never exceeds a column's maximum tile value over its earlier rows,
    for tile values anywhere within the precision's bound of the canonical scores."""
    from dedup_index.search import precision as prec
    from dedup_index.search.blocked import column_seed

    x = _rows(seed, 400, 32)
    arith = prec.Arithmetic(precision, "numpy", "cpu", 32, output_unit=2.0**-8)
    seed_vals = column_seed(x, 60, arith.margin)
    exact = canonical_scores_numpy(x, *np.triu_indices(400, 1))
    sims = np.full((400, 400), -np.inf)
    sims[np.triu_indices(400, 1)] = exact
    lowest = (sims - arith.bound).max(axis=0)  # the lowest any tile maximum can be
    assert np.all(seed_vals[:60] == -np.inf)
    assert np.all(seed_vals[60:].astype(np.float64) <= lowest[60:])
    assert np.all(np.isfinite(seed_vals[60:]))
