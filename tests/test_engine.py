"""The engine: flat backend == dense oracle == a brute-force reading of the spec, exactly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import TooLargeForBackendError, dedup_embeddings
from dedup_index.search import DENSE_MAX_ROWS, as_unit_float32, canonical_scores, search
from dedup_index.search.blocked import blocked_search
from dedup_index.search.flat import flat_pairs, flat_pairs_and_nearest


def brute_force(unit: np.ndarray, threshold: float):
    """The spec, literally: every pair scored canonically, the i < j scan, the true max."""
    n = unit.shape[0]
    ii, jj = np.triu_indices(n, k=1)
    s = canonical_scores(unit, ii, jj)
    hit = s >= threshold
    removed = sorted(set(jj[hit].tolist()))
    dup_of = {}
    for i, j in zip(ii[hit], jj[hit], strict=True):
        dup_of.setdefault(int(j), int(i))  # triu order: earliest i first for each j
    best = np.full(n, -np.inf)
    np.maximum.at(best, ii, s)
    np.maximum.at(best, jj, s)
    nearest = np.maximum(best, 0.0) if n else best
    if n == 1:
        nearest = np.zeros(1)
    return removed, dup_of, (ii[hit], jj[hit], s[hit]), nearest


def assert_same(a, b):
    assert np.array_equal(a.keep, b.keep)
    assert np.array_equal(a.duplicate_of, b.duplicate_of)
    assert np.array_equal(a.duplicate_similarity, b.duplicate_similarity, equal_nan=True)
    assert a.pairs.equals(b.pairs)
    assert np.array_equal(a.max_similarity, b.max_similarity)


def check_all(E: np.ndarray, threshold: float) -> None:
    unit = as_unit_float32(E)
    removed, dup_of, (pi, pj, ps), nearest = brute_force(unit, threshold)
    ii_all, pj_all = np.triu_indices(len(unit), k=1)
    s_all = canonical_scores(unit, ii_all, pj_all)
    for score in ("nearest", "pairs"):
        oracle = dedup_embeddings(E, threshold, backend="dense", score=score)
        for backend in ("flat", "blocked"):
            assert_same(oracle, dedup_embeddings(E, threshold, backend=backend, score=score))
        assert oracle.removed.tolist() == removed
        assert {int(j): int(oracle.duplicate_of[j]) for j in removed} == dup_of
        assert np.array_equal(oracle.pairs.i, pi) and np.array_equal(oracle.pairs.j, pj)
        assert np.array_equal(oracle.pairs.s, ps)
        if score == "nearest":
            assert np.array_equal(oracle.max_similarity, nearest)
        else:
            upstream = np.where(nearest >= threshold, nearest, 0.0)
            assert np.array_equal(oracle.max_similarity, upstream)
    # Tiny tiles exercise every tiling edge of the flat backend.
    tiled = flat_pairs(unit, threshold, query_block=3, db_block=5)
    assert tiled.equals(dedup_embeddings(E, threshold, backend="dense").pairs)
    # Every tiling of the blocked backend, with the best-earlier score per row.
    dense = search(unit, threshold, backend="dense")
    earlier_spec = np.full(len(unit), -np.inf)
    np.maximum.at(earlier_spec, pj_all, s_all)
    assert np.array_equal(dense.earlier, earlier_spec)
    for tile, engine in (
        (1, None),
        (2, None),
        ((2, 5), None),
        ((3, 64), None),
        (64, None),
        ((3, 7), "torch"),
        ((8, 16), "torch"),
        (64, "torch"),
    ):
        pairs, near, earlier = blocked_search(unit, threshold, tile=tile, engine=engine)
        assert pairs.equals(tiled)
        assert np.array_equal(near, nearest if len(unit) else near)
        assert np.array_equal(earlier, dense.earlier)
    for k in (1, 2, 16):
        both, near = flat_pairs_and_nearest(unit, threshold, k=k, query_block=2, db_block=4)
        assert both.equals(tiled)
        assert np.array_equal(near, nearest if len(unit) else near)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def at_cosine(rng: np.random.Generator, base: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine ``cos`` from unit ``base``."""
    u = rng.standard_normal(base.shape[0])
    u -= (u @ base) * base
    u /= np.linalg.norm(u)
    return cos * base + np.sqrt(max(0.0, 1.0 - cos * cos)) * u


@st.composite
def adversarial_sets(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    d = draw(st.sampled_from([2, 3, 8, 33, 64]))
    threshold = draw(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]))
    rows = [r for r in unit_rows(rng, draw(st.integers(0, 12)), d)]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["copy", "near", "chain", "edge", "scaled", "tie"]))
        base = rows[draw(st.integers(0, len(rows) - 1))] if rows else unit_rows(rng, 1, d)[0]
        if kind == "copy":
            rows += [base.copy() for _ in range(draw(st.integers(1, 20)))]
        elif kind == "scaled":
            rows.append(base * draw(st.sampled_from([0.5, 3.0, 1e3])))
        elif kind == "near":
            rows.append(at_cosine(rng, base, draw(st.floats(0.9, 1.0))))
        elif kind == "chain":
            # A ~ B ~ C with A !~ C for thresholds up to ~0.95
            step = np.arccos(min(1.0, max(threshold, 0.5) + 0.01))
            b = at_cosine(rng, base, np.cos(step))
            c = np.cos(step) * b + np.sin(step) * (b - (b @ base) * base) / max(
                np.linalg.norm(b - (b @ base) * base), 1e-12
            )
            rows += [b, c / np.linalg.norm(c)]
        elif kind == "tie":
            # two neighbours whose scores differ by less than float32 noise: the nearest
            # neighbour must be decided canonically, not by FAISS's ordering
            cos = draw(st.floats(0.3, 0.99))
            for eps in (0.0, draw(st.sampled_from([0.0, 1e-8, 5e-8, 1e-7]))) * 2:
                rows.append(at_cosine(rng, base, cos + eps))
        else:  # planted within 1e-7 of the threshold, both sides
            eps = draw(st.sampled_from([-1e-7, -3e-8, 0.0, 3e-8, 1e-7]))
            rows.append(at_cosine(rng, base, min(1.0, threshold + eps)))
    order = draw(st.permutations(range(len(rows)))) if rows else []
    E = np.array([rows[k] for k in order], dtype=np.float64).reshape(len(rows), d)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return E.astype(dtype), threshold


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adversarial_sets())
def test_flat_equals_oracle_equals_spec(case):
    E, threshold = case
    check_all(E, threshold)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(n):
    E = unit_rows(np.random.default_rng(n), n, 4)
    if n == 2:
        E[1] = E[0]
    for backend in ("dense", "flat"):
        r = dedup_embeddings(E, 0.9, backend=backend)
        assert r.n == n
        assert r.max_similarity.shape == (n,)
        if n == 1:
            assert r.max_similarity.tolist() == [0.0] and r.keep.tolist() == [True]
        if n == 2:
            assert r.keep.tolist() == [True, False] and r.duplicate_of.tolist() == [-1, 0]
    check_all(E, 0.9)


def test_chain_follows_reference_semantics():
    rng = np.random.default_rng(7)
    a = unit_rows(rng, 1, 16)[0]
    b = at_cosine(rng, a, 0.95)
    u = rng.standard_normal(16)
    u -= (u @ a) * a + (u @ b) * b
    c = 0.95 * b + np.sqrt(1 - 0.95**2) * u / np.linalg.norm(u)
    c /= np.linalg.norm(c)
    E = np.stack([a, b, c, unit_rows(rng, 1, 16)[0]])
    assert (a @ b) >= 0.9 and (b @ c) >= 0.9 and (a @ c) < 0.9
    for backend in ("dense", "flat"):
        r = dedup_embeddings(E, 0.9, backend=backend)
        assert r.removed.tolist() == [1, 2]  # C goes although only B, itself removed, is near
        assert r.duplicate_of.tolist() == [-1, 0, 1, -1]


def test_many_exact_copies_at_threshold_one():
    # 30 identical rows: float32 can put their product just under 1.0, and the top-k list
    # of every row is all ties, so the nearest search must fall back to a full row.
    rng = np.random.default_rng(3)
    E = np.concatenate([np.repeat(unit_rows(rng, 1, 24), 30, axis=0), unit_rows(rng, 10, 24)])
    check_all(E, 1.0)
    check_all(E, 0.999)


def test_pairs_frame_and_summary():
    E = np.eye(3)
    E = np.vstack([E, E[0]])
    r = dedup_embeddings(E, 0.9)
    frame = r.pairs.to_frame()
    assert frame.to_dict("list") == {"i": [0], "j": [3], "similarity": [1.0]}
    assert "1 removed" in r.summary() and r.backend == "blocked" and r.exact


def test_dense_refuses_large_inputs_with_a_clear_message():
    E = np.ones((DENSE_MAX_ROWS + 1, 2), dtype=np.float32)
    with pytest.raises(TooLargeForBackendError, match="backend='flat'"):
        dedup_embeddings(E, 0.9, backend="dense")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\].*1.5"),
        ({"threshold": -0.1}, ValueError, "threshold"),
        ({"threshold": "high"}, TypeError, "threshold"),
        ({"backend": "gpu"}, ValueError, "backend must be one of .*'gpu'"),
        ({"score": "max"}, ValueError, "score must be one of"),
        ({"threads": 0}, ValueError, "threads"),
    ],
)
def test_bad_parameters_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        dedup_embeddings(np.eye(3), **kwargs)


def test_bad_embeddings_are_named():
    E = np.eye(5)
    E[3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite .* 1 row\(s\): 3"):
        dedup_embeddings(E)
    E = np.eye(5)
    E[2] = 0
    with pytest.raises(ValueError, match=r"zero-norm row\(s\).*: 2"):
        dedup_embeddings(E)
    with pytest.raises(ValueError, match="2-D"):
        dedup_embeddings(np.ones(4))
    with pytest.raises(ValueError, match="not unit norm"):
        dedup_embeddings(np.eye(3) * 2, normalize=False)


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(11)
    base = unit_rows(rng, 200, 64)
    E = np.concatenate([base, base[:50] + 0.01 * rng.standard_normal((50, 64))])
    for backend in ("flat", "blocked"):
        one = dedup_embeddings(E, 0.95, backend=backend, threads=1)
        two = dedup_embeddings(E, 0.95, backend=backend, threads=2)
        assert_same(one, two)
        assert one.n_removed >= 50


def test_array_api_does_not_import_torch():
    code = (
        "import sys, numpy as np, dedup_index as d;"
        "d.dedup_embeddings(np.eye(4), 0.9, backend='flat');"
        "d.dedup_embeddings(np.random.rand(3000, 8), 0.9);"
        "import dedup_index.io, dedup_index.search, dedup_index.policy, dedup_index.encode;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
