"""``partitioned``'s partitioning rules: balanced centroids, the compiled top-p selection,
and pairs across a partition border."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.search import as_unit_float32
from dedup_index.search.partitioned import (
    DEFAULT_MARGIN,
    DEFAULT_TIE_MARGIN,
    REGION_ROWS,
    REGION_TIES,
    REGIONS_FROM_ROWS,
    PartitionParams,
    _assign,
    _groups,
    assign_many,
    default_params,
    partitioned_search,
)
from dedup_index.search.recall import measure_recall
from dedup_index.testing import dense_clusters


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 40),
    c=st.integers(1, 12),
    p=st.integers(1, 12),
    margin=st.sampled_from([0.0, 0.01, 0.5, 2.0]),
    ties=st.integers(0, 4),
    tie=st.sampled_from([0.0, 1.0, 3.0]),
)
def test_top_p_within_margin_equals_a_stable_sort(seed, m, c, p, margin, ties, tie):
    """The compiled selection of ``_assign`` equals the oracle: a stable descending sort
    of each row's centroid scores (ties: the lower centroid first), the first ``p +
    ties``, then -1 for those below the best minus ``margin`` and, from the ``p``-th on
    (near-ties), below the best minus ``min(tie, margin)``.  Coarse coordinates make
    ties."""
    p = min(p, c)
    rng = np.random.default_rng(seed)
    rows = rng.integers(-2, 3, size=(m, 4)).astype(np.float32)
    cents = rng.integers(-2, 3, size=(c, 4)).astype(np.float32)
    got = _assign(rows, np.arange(m), cents, p, margin, ties=ties, tie=tie)
    sims = rows @ cents.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, : p + ties]
    vals = np.take_along_axis(sims, want, axis=1)
    width = np.where(np.arange(want.shape[1]) < p, margin, min(tie, margin))
    want[vals < vals[:, :1] - width.astype(np.float32)] = -1
    assert got.dtype.kind == "i" and np.array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(0, 60), c=st.integers(1, 9), p=st.integers(1, 4))
def test_groups_list_each_centroids_rows_in_ascending_order(seed, m, c, p):
    """``_groups``: per centroid, the rows (ascending, as given) whose table row names it;
    -1 joins nothing; centroids nobody joins are left out."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(10 * m + 1, size=m, replace=False)).astype(np.int32)
    assign = (
        np.stack([rng.permutation(np.arange(-1, c))[:p] for _ in range(m)])
        if m
        else (np.zeros((0, p), dtype=np.int32))
    )
    want = [rows[np.any(assign == k, axis=1)] for k in range(c)]
    got = _groups(rows, assign.astype(np.int32), c)
    assert [g.tolist() for g in got] == [w.tolist() for w in want if w.size]


def _border_pair(d: int = 32, n: int = 400, seed: int = 0):
    """Two tight clusters around orthogonal centres ``a`` and ``b``, plus a pair
    ``(x, y)`` straddling their bisector: ``x`` nearer ``a`` by ~0.007 (inside the
    margin), ``y`` as much nearer ``b``; the pair's rows are the last two."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(d, dtype=np.float64)[:2]
    members = [c + 0.25 * rng.standard_normal((n, d)) / np.sqrt(d) for c in (a, b)]
    mid = (a + b) / np.sqrt(2)
    side = (a - b) / np.sqrt(2)
    w = np.zeros(d)
    w[5] = 1.0  # orthogonal to a, b: moves the pair off the plane, keeps it on the border
    x = mid + 0.005 * side + 0.1 * w
    y = mid - 0.005 * side + 0.1 * w
    rows = as_unit_float32(np.concatenate([*members, [x, y]]))
    assert float(rows[-2] @ rows[-1]) > 0.99
    return rows


def test_a_pair_on_a_partition_border_is_found_by_probing_the_next_partition():
    """A near-duplicate pair split by the border of two partitions: each row's nearest
    centroid differs, the second is within the margin, so with ``n_probe = 2`` both rows
    join both partitions and the pair is found (once); without probing it is missed."""
    rows = _border_pair()
    n = len(rows)
    pair = (n - 2, n - 1)
    found = {}
    for probe in (1, 2):
        params = PartitionParams(n_clusters=2, n_probe=probe, max_partition=10 * n, sample=n)
        pairs, _, _, info = partitioned_search(rows, 0.95, params=params, threads=1)
        keys = list(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
        assert len(keys) == len(set(keys))  # a pair is reported by one partition only
        found[probe] = pair in keys
        assert info.partitions == 2
    assert found == {1: False, 2: True}


def _skewed_with_copies(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    big = dense_clusters(rng, 1, 1500, 48, 0.6)
    rest = dense_clusters(rng, 30, 100, 48, 0.6)
    base = np.concatenate([big, rest])
    src = rng.choice(len(base), 300, replace=False)
    copies = base[src] + 0.02 * rng.standard_normal((300, 48)).astype(np.float32)
    return as_unit_float32(np.concatenate([base, copies])[rng.permutation(len(base) + 300)])


def _exact_with_recall(E: np.ndarray, pairs, nearest: np.ndarray):
    """The exact search of ``E`` at 0.9, after checking ``pairs`` against it: each pair's
    score is the exact one, recall >= 0.99, and ``nearest`` never exceeds the exact
    nearest scores."""
    exact = dedup_embeddings(E, 0.9, backend="blocked", normalize=False)
    truth = {(i, j): s for i, j, s in zip(exact.pairs.i, exact.pairs.j, exact.pairs.s, strict=True)}
    for i, j, s in zip(pairs.i, pairs.j, pairs.s, strict=True):
        assert truth[(i, j)] == s
    assert measure_recall(E, 0.9, pairs, sample=len(E)).recall >= 0.99
    assert np.all(nearest <= exact.max_similarity)
    return exact


def test_skewed_clusters_get_balanced_partitions_and_keep_recall():
    """Zipf-like cluster sizes (one cluster a third of the rows): the balanced centroids
    give the big cluster several partitions, so no partition holds much of it, while
    the planted copies are still found (recall >= 0.99, every reported pair exact) with
    ``n_probe = 3``, the default above 500k rows (2 finds 0.97 here: inside the big
    cluster many centroids are about equally near)."""
    E = _skewed_with_copies()
    params = PartitionParams(n_clusters=24, n_probe=3, max_partition=10**9, sample=len(E))
    pairs, nearest, _, info = partitioned_search(E, 0.9, params=params, threads=1)
    assert info.splits == 0  # balanced by the centroids alone, no recursive split
    assert info.largest < 0.5 * 1500, info.summary(len(E))
    _exact_with_recall(E, pairs, nearest)


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_regions_give_each_row_its_nearest_centroids_of_all_regions(precision):
    """``n_regions``: coarse regions first, each with centroids of its own; every row is
    compared with all regions' centroids (in bf16 when asked: the assignment's own
    candidates rescored in float32) and joins the nearest by the margin rule, whichever
    region they belong to (and up to ``n_ties`` more near-ties).  Every pair reported
    is exact and reported once; recall
    stays >= 0.99 on Zipf-like clusters; the nearest scores are lower bounds."""
    E = _skewed_with_copies()
    params = PartitionParams(
        n_clusters=8, n_probe=3, max_partition=10**9, sample=len(E), n_regions=3, n_ties=2
    )
    pairs, nearest, earlier, info = partitioned_search(
        E, 0.9, params=params, threads=1, precision=precision
    )
    assert len(info.regions) >= 3 and sum(info.regions) == len(E)  # each row's nearest
    assert info.partitions >= len(info.regions)
    keys = list(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
    assert len(keys) == len(set(keys))
    exact = _exact_with_recall(E, pairs, nearest)
    assert np.all(earlier <= exact.max_earlier_similarity)
    # every row in every region and every partition: exact, and the same as blocked
    everything = PartitionParams(
        n_clusters=2, n_probe=3, max_partition=10**9, sample=len(E), margin=2.0, n_regions=3
    )
    assert everything.exhaustive
    got = dedup_embeddings(
        E, 0.9, backend="partitioned", backend_options={"params": everything}, normalize=False
    )
    assert np.array_equal(got.max_similarity, exact.max_similarity)
    assert got.pairs.i.tolist() == exact.pairs.i.tolist()


def test_default_params_cut_large_collections_into_regions_with_their_own_centroids():
    """One level below ``REGIONS_FROM_ROWS`` rows, regions of about ``REGION_ROWS`` from
    there (or when asked for); each region gets the centroids of a collection of its size
    (so the 1M parameters for 1M-row regions)."""
    one = default_params(1_000_000)
    assert one.n_regions == 1 and one.n_clusters == 2048 and one.n_probe == 3
    assert default_params(REGIONS_FROM_ROWS - 1).n_regions == 1
    ten = default_params(10_000_000)
    assert ten.n_regions == 10 == 10_000_000 // REGION_ROWS
    assert default_params(10_000_000, n_regions=1).n_regions == 1
    assert (ten.n_clusters, ten.n_probe, ten.sample) == (one.n_clusters, 3, one.sample)
    # near-ties: only with regions (their centroids near the data's common direction
    # repeat from region to region), never wider than the margin
    assert (one.n_ties, ten.n_ties) == (0, REGION_TIES)
    assert ten.tie_margin_for(512) == DEFAULT_TIE_MARGIN < ten.margin_for(512)
    assert default_params(10_000_000, n_ties=0).n_ties == 0
    assert default_params(10_000, tie_margin=0.5).tie_margin_for(512) == DEFAULT_MARGIN
    with pytest.raises(ValueError, match="n_ties must be an integer >= 0; got -1"):
        default_params(10, n_ties=-1)
    with pytest.raises(ValueError, match="tie_margin must be in"):
        default_params(10, tie_margin=3.0)


def _clip_like(n: int, clusters: int, d: int, seed: int) -> np.ndarray:
    """Unit rows sharing one common direction (as CLIP embeddings do) plus a cluster
    centre and noise: centroid scores crowd together, the hard case for a bf16 ranking."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(d)
    centres = rng.standard_normal((clusters, d)) / np.sqrt(d)
    label = rng.integers(clusters, size=n)
    noise = 0.6 * rng.standard_normal((n, d)) / np.sqrt(d)
    return as_unit_float32(mean / np.linalg.norm(mean) + 0.55 * centres[label] + noise)


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_assignment_to_many_centroids_equals_the_float32_one(threads):
    """``assign_many`` in bf16 (candidates from centred bf16 products, rescored in
    float32) joins every row to the same centroids as the float32 ``_assign`` on
    CLIP-like rows, whose centroid scores crowd within the bf16 rounding of each other;
    blocks and worker splits do not change the answer."""
    E = _clip_like(3000, 300, 64, seed=5)
    cents = _clip_like(1200, 300, 64, seed=6)  # many centroids, all near the common one
    want = _assign(E, np.arange(len(E)), cents, 3, 0.02)
    got = assign_many(E, cents, 3, 0.02, "bf16", threads=threads, block=700)
    assert got.shape == want.shape and got.dtype == np.int32
    same = np.all(np.sort(got, axis=1) == np.sort(want, axis=1), axis=1)
    assert same.mean() >= 0.999
    assert np.array_equal(got[:, 0], want[:, 0])  # the nearest, always
    fp32 = assign_many(E, cents, 3, 0.02, "fp32", threads=threads)
    assert np.array_equal(fp32, want)
    # with near-ties (up to 4 more within 0.005): the same rows and the same rule
    want = _assign(E, np.arange(len(E)), cents, 3, 0.02, ties=4, tie=0.005)
    got = assign_many(E, cents, 3, 0.02, "bf16", threads=threads, block=700, ties=4, tie=0.005)
    assert got.shape == want.shape == (len(E), 7)
    same = np.all(np.sort(got, axis=1) == np.sort(want, axis=1), axis=1)
    assert same.mean() >= 0.995 and (want[:, 3:] >= 0).any()
