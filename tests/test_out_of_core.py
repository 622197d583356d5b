"""``partitioned`` over an on-disk float16 store, out of core (issue 11 item 6, 10M rows).

The store's rows are read in bounded pieces (k-means sample, assignment blocks, one
partition at a time) and its memory maps stay under ``MAX_MAPPED_BYTES``; results equal
those of the same search over the store's rows held in memory as float32 (the float16
values widened), and, at exhaustive settings, the dense oracle's.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.search.dense import dense_search_all
from dedup_index.search.partitioned import (
    PartitionParams,
    exhaustive_params,
    partitioned_search,
)
from dedup_index.store import EmbeddingStore
from dedup_index.store import embeddings as store_module
from dedup_index.testing import dense_clusters, mixed_adversarial

THRESHOLD = 0.9


def _clustered_with_copies(seed: int, n_clusters: int, size: int, d: int) -> np.ndarray:
    """Clusters (cosine ~0.75 inside) with near-copies planted (cosine ~0.95-1)."""
    rng = np.random.default_rng(seed)
    base = dense_clusters(rng, n_clusters, size, d, 0.6)
    k = len(base) // 8
    copies = base[rng.choice(len(base), k, replace=False)]
    copies = copies + (0.2 / np.sqrt(d)) * rng.standard_normal(copies.shape).astype(np.float32)
    x = np.concatenate([base, copies])[rng.permutation(len(base) + k)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _float16_store(path: Path, x: np.ndarray, shard_rows: int) -> EmbeddingStore:
    with EmbeddingStore.create(path, x.shape[1], dtype="float16", shard_rows=shard_rows) as s:
        for a in range(0, len(x), 997):
            s.append(x[a : a + 997])
    return EmbeddingStore.open(path)


def _mapped_rss(store_dir: Path) -> int:
    """Bytes of ``store_dir``'s files resident through this process's memory maps now
    (the ``Rss`` of their mappings in /proc/self/smaps): what they add to its RSS."""
    root = str(store_dir.resolve())
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line
                inside = root in line
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


class _MappedSampler:
    """The most of :func:`_mapped_rss` seen, sampled every few ms in a thread."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir, self.peak, self.samples = store_dir, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _mapped_rss(self.store_dir))
            self.samples += 1
            time.sleep(0.01)

    def __enter__(self) -> _MappedSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    shard_rows=st.sampled_from([64, 300, 5000]),
    mapped_shards=st.sampled_from([1, 2, 5]),
)
def test_float16_store_through_partitioned_equals_its_rows_in_memory(
    tmp_path_factory, seed, shard_rows, mapped_shards
):
    """Real partitioning (k-means, p = 2, oversize partitions split) over a float16 store
    with small shards and a map bound of a few shards: pairs, decisions, maxima and
    best-earlier scores equal those of the same search over ``store[:]`` in memory."""
    x = _clustered_with_copies(seed, 5, 160, 32)
    path = tmp_path_factory.mktemp("s") / "store"
    store = _float16_store(path, x, shard_rows)
    rows = store[:]  # float32 of the float16 values: what every stage computes on
    assert not np.array_equal(rows, x)  # the rounding happened
    params = PartitionParams(n_clusters=4, n_probe=2, max_partition=100, sample=len(x), seed=seed)
    opts = {"params": params}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "MAX_MAPPED_BYTES", mapped_shards * shard_rows * 32 * 2)
        on_disk = dedup_embeddings(store, THRESHOLD, backend="partitioned", backend_options=opts)
        # what the reads left mapped: within the bound plus the last shard read
        assert _mapped_rss(path) <= (mapped_shards + 1) * shard_rows * 32 * 2
    in_memory = dedup_embeddings(
        rows, THRESHOLD, backend="partitioned", backend_options=opts, normalize=False
    )
    assert on_disk.pairs.equals(in_memory.pairs) and len(on_disk.pairs) > 0
    assert np.array_equal(on_disk.keep, in_memory.keep)
    assert np.array_equal(on_disk.duplicate_of, in_memory.duplicate_of)
    assert np.array_equal(on_disk.max_similarity, in_memory.max_similarity)
    assert np.array_equal(on_disk.max_earlier_similarity, in_memory.max_earlier_similarity)
    assert on_disk.info["partitions"].splits > 0  # the split path ran too


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(2, 90), d=st.sampled_from([4, 16]))
def test_float16_store_at_exhaustive_settings_equals_the_oracle(tmp_path_factory, seed, n, d):
    """Every row in every partition: the float16 store's search is exact, equal to the
    dense oracle over the widened float16 rows (ties at the threshold included)."""
    x = mixed_adversarial(seed, n, d, THRESHOLD)
    store = _float16_store(tmp_path_factory.mktemp("s") / "store", x, 17)
    rows = store[:]
    pairs, nearest, earlier, _ = partitioned_search(
        store, THRESHOLD, params=exhaustive_params(3), threads=1
    )
    o_pairs, o_nearest, o_earlier = dense_search_all(rows, THRESHOLD, nearest=True)
    assert pairs.equals(o_pairs)
    assert np.array_equal(nearest, o_nearest) and np.array_equal(earlier, o_earlier)


@pytest.mark.slow  # ~60 s on the loaded 2-core machine (100k rows, 200+ partitions)
def test_store_maps_stay_bounded_and_the_search_reads_in_pieces(tmp_path, monkeypatch):
    """A 100k x 128 float16 store (25 MiB; 51 MiB as float32) searched under a map bound
    of 2 MiB: the store's pages resident through this process's maps (its RSS; the page
    cache keeps them) never pass the bound plus one read (an assignment block of 16384
    rows, 4 MiB) and a shard, and ``partitioned``'s own allocations (the store's reads, row lists,
    assignment blocks, tiles, pairs) peak under half the store's float32 size: it is
    read in pieces, never whole."""
    d, cap, shard_rows = 128, 2 << 20, 5_000
    x = _clustered_with_copies(3, 140, 640, d)[:100_000]
    n = len(x)
    path = tmp_path / "store"
    store = _float16_store(path, x, shard_rows)
    del x
    monkeypatch.setattr(store_module, "MAX_MAPPED_BYTES", cap)
    store.verify()  # hashes every block now, one shard at a time
    assert _mapped_rss(path) <= cap
    params = PartitionParams(n_clusters=32, n_probe=2, max_partition=2048, sample=32 * 64)
    partitioned_search(store[:3000], THRESHOLD, params=params, threads=1)  # imports, compiles
    tracemalloc.start()
    try:
        with _MappedSampler(path) as mapped:
            pairs, _, _, info = partitioned_search(store, THRESHOLD, params=params, threads=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = n * d * 4
    assert len(pairs) > 1000 and info.splits > 0
    bound = cap + 16384 * d * 2 + shard_rows * d * 2
    assert mapped.samples > 10 and 0 < mapped.peak <= bound, mapped.peak
    assert peak < size / 2, f"peak {peak} bytes vs the store's {size} as float32"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_float16_stores(tmp_path, n):
    x = mixed_adversarial(1, max(n, 2), 8, THRESHOLD)[:n]
    with EmbeddingStore.create(tmp_path / "s", 8, dtype="float16") as s:
        if n:
            s.append(x)
    store = EmbeddingStore.open(tmp_path / "s")
    got = dedup_embeddings(store, THRESHOLD, backend="partitioned")
    want = dedup_embeddings(store[:], THRESHOLD, backend="dense", normalize=False)
    assert got.pairs.equals(want.pairs) and np.array_equal(got.keep, want.keep)
