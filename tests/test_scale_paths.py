"""Scale paths: approximate backends at exhaustive settings, stores, spilled pairs,
removal counts at every threshold, and auto's choice."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.search import as_unit_float32
from dedup_index.search.partitioned import exhaustive_params
from dedup_index.search.recall import measure_recall
from dedup_index.store import EmbeddingStore, PairFile
from dedup_index.testing import check_equivalence, dense_clusters, mixed_adversarial

EXHAUSTIVE = {
    "partitioned": {"params": exhaustive_params(3), "threads": 1},
    "ivf": {"nlist": 3, "nprobe": 3, "threads": 1},
    "hnsw": {"ef_search": 512, "threads": 1},
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 60),
    d=st.sampled_from([4, 16, 32]),
    threshold=st.sampled_from([0.5, 0.9, 0.99, 1.0]),
)
def test_approximate_backends_at_exhaustive_settings_equal_the_oracle(seed, n, d, threshold):
    E = mixed_adversarial(seed, n, d, threshold)
    report = check_equivalence(E, threshold, backends=list(EXHAUSTIVE), backend_options=EXHAUSTIVE)
    report.raise_if_failed()


def test_partitioned_defaults_measure_high_recall():
    rng = np.random.default_rng(5)
    base = dense_clusters(rng, 40, 60, 64, 0.35)
    copies = base[rng.choice(len(base), 200, replace=False)]
    copies = copies + 0.02 * rng.standard_normal(copies.shape).astype(np.float32)
    E = as_unit_float32(np.concatenate([base, copies])[rng.permutation(len(base) + 200)])
    result = dedup_embeddings(E, 0.9, backend="partitioned", normalize=False)
    assert not result.exact and "approximate" in result.summary()
    assert result.info["summary"].startswith("C=")
    report = measure_recall(E, 0.9, result.pairs, sample=len(E))
    assert report.recall >= 0.99 and report.precision == 1.0, report
    exact = dedup_embeddings(E, 0.9, backend="blocked", normalize=False)
    # Every pair it reports is exact; its maxima are lower bounds.
    found = set(zip(result.pairs.i, result.pairs.j, strict=True))
    assert found <= set(zip(exact.pairs.i, exact.pairs.j, strict=True))
    assert np.all(result.max_similarity <= exact.max_similarity)


def test_partitioned_splits_oversize_partitions_on_a_small_sample_without_faiss_warnings(capfd):
    """Oversize partitions are split again, their k-means trained on
    SPLIT_TRAIN_PER_CENTROID rows a centroid (never fewer than FAISS's 39: nothing on
    stderr); every pair reported is exact and recall stays high."""
    from dedup_index.search.partitioned import (
        MIN_TRAIN_PER_CENTROID,
        SPLIT_TRAIN_PER_CENTROID,
        PartitionParams,
        partitioned_search,
    )

    assert SPLIT_TRAIN_PER_CENTROID >= MIN_TRAIN_PER_CENTROID
    rng = np.random.default_rng(11)
    base = dense_clusters(rng, 6, 700, 64, 0.6)
    copies = base[rng.choice(len(base), 300, replace=False)]
    copies = copies + 0.02 * rng.standard_normal(copies.shape).astype(np.float32)
    E = as_unit_float32(np.concatenate([base, copies])[rng.permutation(len(base) + 300)])
    params = PartitionParams(n_clusters=3, n_probe=2, max_partition=600, sample=len(E))
    pairs, nearest, _, info = partitioned_search(E, 0.9, params=params, threads=1)
    assert info.splits > 0 and info.largest < len(E)
    assert "please provide at least" not in capfd.readouterr().err
    exact = dedup_embeddings(E, 0.9, backend="blocked", normalize=False)
    truth = {(i, j): s for i, j, s in zip(exact.pairs.i, exact.pairs.j, exact.pairs.s, strict=True)}
    for i, j, s in zip(pairs.i, pairs.j, pairs.s, strict=True):
        assert truth[(i, j)] == s
    assert len(set(zip(pairs.i, pairs.j, strict=True))) == len(pairs)
    assert measure_recall(E, 0.9, pairs, sample=len(E)).recall >= 0.95
    assert np.all(nearest <= exact.max_similarity)


@pytest.mark.parametrize("backend", ["blocked", "flat", "dense", "partitioned"])
def test_a_store_on_disk_gives_the_same_result_as_the_array(tmp_path, backend):
    rng = np.random.default_rng(1)
    E = as_unit_float32(np.concatenate([rng.standard_normal((150, 24))] * 2))
    store = EmbeddingStore.create(tmp_path / "store", 24, shard_rows=37)
    for a in range(0, len(E), 41):
        store.append(E[a : a + 41], normalize=False)
    options = {"blocked": {"tile": (16, 40)}, "partitioned": {"params": exhaustive_params(2)}}
    kwargs = {"backend": backend, "backend_options": options.get(backend)}
    from_disk = dedup_embeddings(EmbeddingStore.open(tmp_path / "store"), 0.8, **kwargs)
    from_path = dedup_embeddings(str(tmp_path / "store"), 0.8, **kwargs)
    in_memory = dedup_embeddings(E, 0.8, normalize=False, **kwargs)
    for r in (from_disk, from_path):
        assert r.pairs.equals(in_memory.pairs)
        assert np.array_equal(r.keep, in_memory.keep)
        assert np.array_equal(r.max_similarity, in_memory.max_similarity)
    assert from_disk.n_removed == 150


@pytest.mark.parametrize("backend", ["blocked", "partitioned"])
@pytest.mark.parametrize("policy", ["reference", "greedy", "component"])
def test_pairs_spill_to_parquet_and_decisions_do_not_change(tmp_path, backend, policy):
    rng = np.random.default_rng(2)
    E = dense_clusters(rng, 6, 40, 16, 0.15)
    options = {"partitioned": {"params": exhaustive_params(2)}, "blocked": {"tile": (32, 64)}}
    kwargs = {"backend": backend, "policy": policy, "backend_options": options[backend]}
    in_memory = dedup_embeddings(E, 0.9, **kwargs)
    spilled = dedup_embeddings(
        E, 0.9, pairs_memory_budget=256, pairs_path=tmp_path / "pairs.parquet", **kwargs
    )
    assert isinstance(spilled.pairs, PairFile) and len(in_memory.pairs) > 100
    assert spilled.pairs.to_pairset().equals(in_memory.pairs)
    assert len(spilled.pairs) == len(in_memory.pairs)  # no pair written twice
    for field in ("keep", "duplicate_of", "group", "max_similarity"):
        assert np.array_equal(getattr(spilled, field), getattr(in_memory, field)), field


def test_removed_at_every_threshold_without_rerunning():
    rng = np.random.default_rng(3)
    E = dense_clusters(rng, 10, 30, 16, 0.3)
    thresholds = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
    for backend in ("blocked", "dense"):
        once = dedup_embeddings(E, 0.9, backend=backend)
        counts = once.removed_at(thresholds)
        for t, count in zip(thresholds, counts, strict=True):
            assert count == dedup_embeddings(E, t, backend="dense").n_removed, (backend, t)
    with pytest.raises(ValueError, match="best-earlier"):
        dedup_embeddings(E, 0.9, backend="flat").removed_at(0.5)


def test_auto_says_what_it_picked(caplog):
    with caplog.at_level(logging.INFO, logger="dedup_index"):
        result = dedup_embeddings(np.eye(4), 0.9)
    assert result.backend == "blocked"
    assert "backend='auto' picked 'blocked'" in caplog.text
    from dedup_index.search import choose_backend

    assert choose_backend(1_000_000, 512)[0] == "partitioned"
