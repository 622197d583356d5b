"""``ivf`` and ``hnsw`` backends: exact when exhaustive, high recall when not, no aborts."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index.search import as_unit_float32
from dedup_index.search.dense import dense_search
from dedup_index.search.flat import flat_pairs_and_nearest
from dedup_index.search.hnsw import (
    build_hnsw_index,
    copy_groups,
    hnsw_search,
    safe_range_block,
)
from dedup_index.search.ivf import build_ivf_index, default_nlist, ivf_search
from dedup_index.search.recall import measure_recall


@pytest.fixture(autouse=True)
def _restore_faiss_threads():
    """The tests pass ``threads=1`` (fast on a busy machine); FAISS's thread count is
    process-wide, so put it back for the tests that follow."""
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


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
def small_sets(draw):
    """Up to 60 rows, D 4..32: random rows plus planted exact copies, near copies and
    rows within 1e-7 of the threshold, shuffled."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d = draw(st.integers(4, 32))
    threshold = draw(st.sampled_from([0.5, 0.9, 0.99, 0.999, 1.0]))
    rows = list(unit_rows(rng, draw(st.integers(0, 20)), d))
    for _ in range(draw(st.integers(0, 4))):
        base = rows[draw(st.integers(0, len(rows) - 1))] if rows else unit_rows(rng, 1, d)[0]
        kind = draw(st.sampled_from(["copy", "near", "edge"]))
        if kind == "copy":
            rows += [base.copy() for _ in range(draw(st.integers(1, 18)))]
        elif kind == "near":
            rows += [at_cosine(rng, base, draw(st.floats(0.9, 1.0))) for _ in range(3)]
        else:
            eps = draw(st.sampled_from([-1e-7, 0.0, 1e-7]))
            rows.append(at_cosine(rng, base, min(1.0, threshold + eps)))
    rows = rows[:60]
    order = rng.permutation(len(rows))
    E = np.array([rows[k] for k in order], dtype=np.float64).reshape(len(rows), d)
    return as_unit_float32(E), threshold


def assert_matches_oracle(unit, threshold, pairs, near) -> None:
    want_pairs, want_near = dense_search(unit, threshold)
    assert pairs.equals(want_pairs)
    assert np.array_equal(near, want_near)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_sets(), st.integers(1, 8))
def test_ivf_exhaustive_equals_oracle(case, nlist):
    unit, threshold = case
    pairs, near = ivf_search(unit, threshold, nlist=nlist, nprobe=nlist, threads=1)
    assert_matches_oracle(unit, threshold, pairs, near)
    only, none = ivf_search(
        unit, threshold, nlist=nlist, nprobe=nlist, nearest=False, query_block=7, threads=1
    )
    assert none is None and only.equals(pairs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_sets(), st.booleans())
def test_hnsw_large_ef_equals_oracle(case, collapse):
    unit, threshold = case
    ef = max(1, unit.shape[0])
    pairs, near = hnsw_search(
        unit, threshold, ef_search=ef, collapse_copies=collapse, query_block=5, threads=1
    )
    assert_matches_oracle(unit, threshold, pairs, near)


@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_tiny_inputs(n, backend):
    unit = as_unit_float32(np.random.default_rng(n).standard_normal((n, 8)))
    run = ivf_search if backend == "ivf" else hnsw_search
    for threshold in (0.0, 0.9, 1.0):
        pairs, near = run(unit, threshold, threads=1)
        assert_matches_oracle(unit, threshold, pairs, near)
        only, none = run(unit, threshold, nearest=False, threads=1)
        assert none is None and only.equals(pairs)
    # Two exact copies: a pair at their self-score, each the other's nearest neighbour.
    twins = np.repeat(unit[:1], 2, axis=0) if n else np.ones((2, 8), np.float32) / np.sqrt(8)
    pairs, near = run(twins, 0.99, threads=1)
    assert_matches_oracle(twins, 0.99, pairs, near)
    assert len(pairs) == 1


def test_ivf_defaults_follow_n():
    assert default_nlist(10) == 1 and default_nlist(78) == 2
    assert default_nlist(10_000) == 256 and default_nlist(1_000_000) == 4000
    unit = as_unit_float32(np.random.default_rng(0).standard_normal((50, 8)))
    assert build_ivf_index(unit, nlist=200, threads=1).nlist == 50  # clamped to the rows


def test_hnsw_copy_islands_are_collapsed():
    """66 exact copies among 93 rows at m = 32 make a level-0 island (their 64 links all
    point at each other); re-encodes of the copied vector descend into it and miss each
    other.  Collapsing copies keeps the result equal to the oracle at efSearch >= N."""
    rng = np.random.default_rng(23)
    others = rng.standard_normal((24, 16))
    near = [others[0] + s * rng.standard_normal(16) for s in (0.01, 0.05, 0.2)]
    E = np.vstack([others, near, np.tile(others[0], (66, 1))])
    unit = as_unit_float32(E[rng.permutation(len(E))])
    reps, group = copy_groups(unit)
    assert reps.size == 27 and np.array_equal(unit[reps[group]], unit)
    for threshold in (0.9, 0.99, 1.0):
        pairs, near_s = hnsw_search(unit, threshold, ef_search=len(unit), threads=1)
        assert_matches_oracle(unit, threshold, pairs, near_s)


def clustered_with_duplicates(seed: int = 0, n: int = 2400, d: int = 32) -> np.ndarray:
    """Rows around 20 cluster centres (uneven IVF lists, dense HNSW neighbourhoods), plus
    1-4 near copies (cosine 0.93-0.9999) of 400 of them: ~3000 rows, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = list(x)
    for g in rng.choice(n, 400, replace=False):
        rows += [at_cosine(rng, x[g], rng.uniform(0.93, 0.9999)) for _ in range(rng.integers(1, 5))]
    return as_unit_float32(np.array(rows)[rng.permutation(len(rows))])


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_default_settings_have_high_recall(backend):
    unit = clustered_with_duplicates()
    threshold = 0.9
    run = ivf_search if backend == "ivf" else hnsw_search
    pairs, near = run(unit, threshold, threads=1)
    report = measure_recall(unit, threshold, pairs, sample=1000, seed=1)
    assert report.n_exact > 500, report
    assert report.recall >= 0.95, report
    assert report.precision == 1.0, report
    # max_similarity is a lower bound of the true nearest score, and almost always equal.
    exact_pairs, exact_near = flat_pairs_and_nearest(unit, threshold, threads=1)
    assert np.all(near <= exact_near)
    assert np.mean(near == exact_near) >= 0.95
    assert len(pairs) <= len(exact_pairs)


def test_hnsw_range_search_in_query_blocks_never_aborts():
    """FAISS aborts an HNSW range search over more queries than its interrupt-check
    period (here 10**8 // (max_level * 128 * 256 + 1), about 1500 for 2000 rows):
    2000 queries, asked for in one block, must be cut into safe blocks.  Run in a child
    process so that a regression fails this test instead of killing the test run."""
    code = """
import numpy as np
from dedup_index.search import as_unit_float32
from dedup_index.search.hnsw import build_hnsw_index, hnsw_search, safe_range_block
unit = as_unit_float32(np.random.default_rng(0).standard_normal((2000, 128)))
index = build_hnsw_index(unit, ef_construction=40, threads=1)
index.hnsw.efSearch = 256
assert safe_range_block(index) < 2000, safe_range_block(index)
big, _ = hnsw_search(unit, 0.3, ef_construction=40, ef_search=256, query_block=4096,
                     nearest=False, threads=1)
small, _ = hnsw_search(unit, 0.3, ef_construction=40, ef_search=256, nearest=False,
                       threads=1)
assert len(big) > 0 and big.equals(small), (len(big), len(small))
print("ok", len(big))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


def test_safe_range_block_follows_efsearch():
    unit = as_unit_float32(np.random.default_rng(1).standard_normal((500, 16)))
    index = build_hnsw_index(unit, ef_construction=40, threads=1)
    index.hnsw.efSearch = 64
    wide = safe_range_block(index)
    index.hnsw.efSearch = 640
    assert wide // 11 <= safe_range_block(index) <= wide // 9
    assert safe_range_block(index) >= 1


_QUIET_CODE = """
import numpy as np
from dedup_index import dedup_embeddings
from dedup_index.index import DedupIndex
from dedup_index.search import as_unit_float32
from dedup_index.search.partitioned import partitioned_search

rng = np.random.default_rng(0)
centres = rng.standard_normal((400, {d}))
rows = centres[rng.integers(0, 400, {n})] + 0.6 * rng.standard_normal(({n}, {d}))
unit = as_unit_float32(rows)
path = {path!r}
if path == "partitioned":
    partitioned_search(unit, 0.9, threads=1)
elif path in ("ivf", "hnsw"):
    dedup_embeddings(unit, 0.9, backend=path, normalize=False, score="pairs", threads=1)
else:  # the persistent index: a bulk add, a small add, a compaction
    index = DedupIndex.create(path, {d}, 0.9, backend="ivf")
    index.add(unit[:-300])
    index.add(unit[-300:])
    index.compact(retain_seconds=0)
print("ok")
"""


@pytest.mark.parametrize("path", ["partitioned", "ivf", "hnsw", "index"])
def test_no_faiss_warning_reaches_stderr(path, tmp_path):
    """FAISS prints from C++ straight to file descriptor 2 ("WARNING clustering N points
    to K centroids: please provide at least M training points"): a child process's whole
    stderr must hold none of it, at a size where the partitioned k-means used to sample
    only 20 rows a centroid (above ~16k rows)."""
    where = str(tmp_path / "idx") if path == "index" else path
    n, d = (20_500, 16) if path != "hnsw" else (4000, 16)
    code = _QUIET_CODE.format(n=n, d=d, path=where)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    assert "WARNING" not in done.stderr and "please provide" not in done.stderr, done.stderr
