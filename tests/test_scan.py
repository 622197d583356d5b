"""The fused tile scan (dedup_index/search/scan.py) against a plain numpy reference.

The kernel's contract is exact, not approximate: for every row in order it gathers the
entries above ``radius``, the entries within ``delta`` of the row's running maximum
(earlier tiles, then the whole row) and of each column's running maximum (every row
before, this one included), in float32 as ``prune_near`` computes ``best - delta``.  The
reference below does exactly that with numpy one row at a time, so the two must agree
entry for entry, in order, on tiles built to hit every edge: values on a coarse grid
(ties everywhere), entries exactly at the radius and exactly at ``best - delta``, ``-inf``
entries (the cross search's removed rows), diagonal offsets of every sign, tiles wider
than a block, buffers small enough to spill mid-tile, and bf16 tiles read as bits.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index.search.blocked import blocked_search
from dedup_index.search.dense import dense_search_all
from dedup_index.search.scan import BLOCK, TileScan, scan_tile

torch = pytest.importorskip("torch")


def reference(tile, radius, delta, row_best, col_best, diag, row0, col0):
    """The scan's contract, row by row in numpy (``row_best``/``col_best`` raised in
    place; ``col_best`` None: no column side)."""
    radius, delta = np.float32(radius), np.float32(delta)
    ra, rc = tile.shape
    pairs, near, far = [], [], []
    for r in range(ra):
        j0 = max(0, r + diag + 1) if diag is not None else 0
        if j0 >= rc:
            continue
        x = tile[r, j0:]
        js = np.arange(j0, rc)
        row_best[r] = max(row_best[r], x.max())
        bound = np.float32(row_best[r] - delta)
        for j, v in zip(js, x, strict=True):
            if v > radius:
                pairs.append((row0 + r, col0 + j))
            if v >= bound and v > -np.inf:
                near.append((row0 + r, col0 + j, v))
            if col_best is not None:
                col_best[j] = max(col_best[j], v)
                if v > -np.inf and v >= np.float32(col_best[j] - delta):
                    far.append((col0 + j, row0 + r, v))
    return pairs, near, far


def as_lists(got):
    pairs, near, far = got
    p = [] if pairs is None else list(zip(*(a.tolist() for a in pairs), strict=True))
    n = [] if near is None else list(zip(*(a.tolist() for a in near), strict=True))
    f = [] if far is None else list(zip(*(a.tolist() for a in far), strict=True))
    return p, n, f


def to_lists(ref):
    pairs, near, far = ref
    return (
        [(int(a), int(b)) for a, b in pairs],
        [(int(a), int(b), float(v)) for a, b, v in near],
        [(int(a), int(b), float(v)) for a, b, v in far],
    )


#: Grid values (multiples of 1/64 in [-1, 1], exact in bf16 and float32) and -inf.
GRID = st.one_of(st.integers(-64, 64).map(lambda k: k / 64), st.just(-np.inf))


@st.composite
def cases(draw):
    ra = draw(st.integers(1, 12))
    rc = draw(st.integers(1, 2 * BLOCK + 9))
    values = draw(st.lists(GRID, min_size=ra * rc, max_size=ra * rc))
    tile = np.array(values, dtype=np.float32).reshape(ra, rc)
    if draw(st.booleans()):  # mostly finite tiles, like the GEMM's
        tile[~np.isfinite(tile)] = 0.25
    # radius and delta on the grid too: entries land exactly on both bounds.
    radius = draw(st.integers(-64, 64)) / 64
    delta = draw(st.sampled_from([0.0, 1 / 64, 3 / 64, 0.0118]))
    diag = draw(st.one_of(st.none(), st.integers(-rc - 2, ra + 2)))
    row_best = np.array(draw(st.lists(GRID, min_size=ra, max_size=ra)), dtype=np.float32)
    cols = draw(st.booleans())
    col_best = np.array(draw(st.lists(GRID, min_size=rc, max_size=rc)), dtype=np.float32)
    capacity = draw(st.sampled_from([None, rc, rc + 3, 3 * rc]))
    return tile, radius, delta, diag, row_best, col_best if cols else None, capacity


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=cases(), row0=st.integers(0, 10**6), col0=st.integers(0, 10**6))
def test_kernel_equals_the_numpy_reference(case, row0, col0):
    tile, radius, delta, diag, row_best, col_best, capacity = case
    rb_ref, rb = row_best.copy(), row_best.copy()
    cb_ref = None if col_best is None else col_best.copy()
    cb = None if col_best is None else col_best.copy()
    want = to_lists(reference(tile, radius, delta, rb_ref, cb_ref, diag, row0, col0))
    scan = TileScan(tile.shape[1], capacity)
    kwargs = dict(radius=radius, delta=delta, diag=diag, row0=row0, col0=col0)
    scan.scan(tile, row_best=rb, col_best=cb, **kwargs)
    assert as_lists(scan.take()) == want
    assert np.array_equal(rb, rb_ref)
    if cb is not None:
        assert np.array_equal(cb, cb_ref)
    # The same tile as bf16 bits (every grid value is exact in bf16): the same entries.
    t16 = torch.from_numpy(tile).to(torch.bfloat16)
    rb16 = row_best.copy()
    cb16 = None if col_best is None else col_best.copy()
    assert as_lists(scan_tile(t16, row_best=rb16, col_best=cb16, **kwargs)) == want
    assert np.array_equal(rb16, rb_ref)
    # Buffers reused after take(): a second scan starts empty.
    scan.scan(tile, row_best=row_best.copy(), col_best=None, **kwargs)
    assert as_lists(scan.take())[0] == want[0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rc=st.integers(1, 300))
def test_random_bf16_tiles_widen_exactly(seed, rc):
    rng = np.random.default_rng(seed)
    t16 = torch.from_numpy(rng.uniform(-1, 1, (7, rc)).astype(np.float32)).to(torch.bfloat16)
    t32 = t16.to(torch.float32).numpy()
    radius, delta = 0.5, 0.03
    args = dict(radius=radius, delta=delta, diag=-3)
    a = scan_tile(
        t16, row_best=np.full(7, -np.inf, np.float32), col_best=np.zeros(rc, np.float32), **args
    )
    b = scan_tile(
        t32, row_best=np.full(7, -np.inf, np.float32), col_best=np.zeros(rc, np.float32), **args
    )
    assert as_lists(a) == as_lists(b)


def test_bad_arguments_are_named():
    scan = TileScan(8)
    with pytest.raises(ValueError, match="12 columns"):
        scan.scan(
            np.zeros((2, 12), np.float32), radius=0.5, delta=0.1, row_best=np.zeros(2, np.float32)
        )
    with pytest.raises(ValueError, match="row_best"):
        scan.scan(
            np.zeros((2, 8), np.float32), radius=0.5, delta=0.1, row_best=np.zeros(3, np.float32)
        )
    with pytest.raises(ValueError, match="float32"):
        scan.scan(np.zeros((2, 8)), radius=0.5, delta=0.1, row_best=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="width"):
        TileScan(0)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), tile=st.sampled_from([(64, 40), (40, 64), (96, 96), (64, 200)]))
def test_blocked_workers_with_any_tile_shape_equal_the_oracle(seed, tile):
    """Tiles narrower than the row block (the diagonal reaches into later tiles) and
    wider, float32 and bf16: the workers' fused scans give the oracle's bits."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((60, 24))
    rows = np.concatenate([base, base + 0.05 * rng.standard_normal(base.shape), base[:20]])
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    rows = rows[rng.permutation(len(rows))]
    pairs_o, near_o, early_o = dense_search_all(rows, 0.95, nearest=True)
    for precision in ("fp32", "bf16"):
        pairs, near, early = blocked_search(rows, 0.95, precision=precision, tile=tile, threads=2)
        assert pairs.equals(pairs_o)
        assert np.array_equal(near, near_o)
        assert np.array_equal(early, early_o)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**16), precision=st.sampled_from(["fp32", "bf16"]))
def test_cross_search_paths_give_the_same_bits(monkeypatch, seed, precision):
    """The CPU cross search's workers (own GEMMs, own running maxima merged at the end),
    one thread, and numpy's tile operations (small searches) give the same bits: pairs,
    both bests, with removed base rows and a floor."""
    from dedup_index.search import cross

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((300, 24))
    rows = np.concatenate([base, base[:120] + 0.04 * rng.standard_normal((120, 24))])
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    rows = rows[rng.permutation(len(rows))]
    queries, old = rows[:140], rows[140:]
    live = rng.random(len(old)) < 0.9
    floor = np.where(rng.random(len(old)) < 0.5, 0.97, -np.inf)
    kwargs = dict(rows=32, cols=48, base_live=live, base_floor=floor, precision=precision)
    monkeypatch.setattr(cross, "SCAN_MIN_WORK", 0.0)
    monkeypatch.setattr(cross, "THREADED_WORK", 1e30)  # one thread
    one = cross.cross_search(queries, old, 0.95, **kwargs)
    monkeypatch.setattr(cross, "THREADED_WORK", 1.0)  # a worker per core
    many = cross.cross_search(queries, old, 0.95, **kwargs)
    # A small search in a process without the compiled scan: numpy's tile operations.
    monkeypatch.setattr(cross, "SCAN_MIN_WORK", 1e30)
    monkeypatch.delitem(sys.modules, "dedup_index.search.scan")
    small = cross.cross_search(queries, old, 0.95, **kwargs)
    assert "dedup_index.search.scan" not in sys.modules  # the small path did not load it
    for f in ("q", "b", "s", "query_best", "base_best"):
        assert np.array_equal(getattr(one, f), getattr(many, f)), f
        assert np.array_equal(getattr(one, f), getattr(small, f)), f
    assert one.q.size > 0
