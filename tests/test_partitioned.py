"""``partitioned``'s partitioning rules: balanced centroids, the compiled top-p selection,
and pairs across a partition border."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.search import as_unit_float32
from dedup_index.search.partitioned import PartitionParams, _assign, partitioned_search
from dedup_index.search.recall import measure_recall
from dedup_index.testing import dense_clusters


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    m=st.integers(1, 40),
    c=st.integers(1, 12),
    p=st.integers(1, 12),
    margin=st.sampled_from([0.0, 0.01, 0.5, 2.0]),
)
def test_top_p_within_margin_equals_a_stable_sort(seed, m, c, p, margin):
    """The compiled selection of ``_assign`` equals the oracle: a stable descending sort
    of each row's centroid scores (ties: the lower centroid first), the first ``p``,
    then -1 for those below the best minus ``margin``.  Coarse coordinates make ties."""
    p = min(p, c)
    rng = np.random.default_rng(seed)
    rows = rng.integers(-2, 3, size=(m, 4)).astype(np.float32)
    cents = rng.integers(-2, 3, size=(c, 4)).astype(np.float32)
    got = _assign(None, rows, np.arange(m), cents, p, margin)
    sims = rows @ cents.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :p]
    vals = np.take_along_axis(sims, want, axis=1)
    want[vals < vals[:, :1] - np.float32(margin)] = -1
    assert got.dtype.kind == "i" and np.array_equal(got, want)


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


def test_skewed_clusters_get_balanced_partitions_and_keep_recall():
    """Zipf-like cluster sizes (one cluster a third of the rows): the balanced centroids
    give the big cluster several partitions, so no partition holds much of it, while
    the planted copies are still found (recall >= 0.99, every reported pair exact) with
    ``n_probe = 3``, the default above 500k rows (2 finds 0.97 here: inside the big
    cluster many centroids are about equally near)."""
    rng = np.random.default_rng(3)
    big = dense_clusters(rng, 1, 1500, 48, 0.6)
    rest = dense_clusters(rng, 30, 100, 48, 0.6)
    base = np.concatenate([big, rest])
    src = rng.choice(len(base), 300, replace=False)
    copies = base[src] + 0.02 * rng.standard_normal((300, 48)).astype(np.float32)
    E = as_unit_float32(np.concatenate([base, copies])[rng.permutation(len(base) + 300)])
    params = PartitionParams(n_clusters=24, n_probe=3, max_partition=10**9, sample=len(E))
    pairs, nearest, _, info = partitioned_search(E, 0.9, params=params, threads=1)
    assert info.splits == 0  # balanced by the centroids alone, no recursive split
    assert info.largest < 0.5 * 1500, info.summary(len(E))
    exact = dedup_embeddings(E, 0.9, backend="blocked", normalize=False)
    truth = {(i, j): s for i, j, s in zip(exact.pairs.i, exact.pairs.j, exact.pairs.s, strict=True)}
    for i, j, s in zip(pairs.i, pairs.j, pairs.s, strict=True):
        assert truth[(i, j)] == s
    assert measure_recall(E, 0.9, pairs, sample=len(E)).recall >= 0.99
    assert np.all(nearest <= exact.max_similarity)
