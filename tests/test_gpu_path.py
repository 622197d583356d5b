"""The torch (GPU) tile loop, held on the CPU through the same code (issue 16 items 4, 7, 8).

``engine="torch"`` runs the loop a CUDA device runs, on the CPU: the tile sizing from the
device's free memory (``torch.cuda.mem_get_info`` patched to a device's numbers), the
maxima kept on the device, one compacted copy back per tile (counted by the loop's own
transfer helper, :class:`~dedup_index.search.blocked.Transfers`), a store streamed in
chunks (the host's peak memory measured with ``tracemalloc``: store rows come back as
numpy arrays, which it counts), float64 input.  Every result is compared with the dense
oracle, bit for bit.  The tests at the end need a real CUDA device.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from dedup_index.search import blocked  # noqa: E402
from dedup_index.search.blocked import (  # noqa: E402
    GPU_COLS,
    GPU_ROWS,
    TILE_ENTRY_BYTES,
    TILE_MEMORY_SHARE,
    blocked_search,
    device_free_memory,
    gpu_tile,
)
from dedup_index.search.dense import dense_search_all  # noqa: E402
from dedup_index.store import EmbeddingStore  # noqa: E402
from dedup_index.testing import mixed_adversarial  # noqa: E402

THRESHOLD = 0.9
TILINGS = ((5, 11), (64, 96), 64)
PRECISIONS = ("fp32", "bf16", "fp16")
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("DEDUP_INDEX_PRECISION_CACHE", "0")


def _same(got, want) -> None:
    assert got[0].equals(want[0])
    assert np.array_equal(got[1], want[1])
    assert np.array_equal(got[2], want[2])


def _rows(seed: int, n: int, d: int, dtype=np.float32) -> np.ndarray:
    """Unit rows with planted copies and near-threshold pairs (``dtype`` rows are unit in
    that dtype: float64 rows are not rounded to float32)."""
    x = mixed_adversarial(seed, n, d, THRESHOLD).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


def _store(path, x: np.ndarray, dtype: str = "float32") -> EmbeddingStore:
    """A store of ``x`` (it normalises rows as they come: the oracle reads them back)."""
    with EmbeddingStore.create(path, x.shape[1], dtype=dtype, shard_rows=997) as s:
        s.append(x)
    return EmbeddingStore.open(path)


# ------------------------------------------------------------------ item 4: tile sizing


def test_device_tiles_are_sized_from_free_device_memory(monkeypatch):
    free = {"bytes": 140 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free["bytes"], 141 << 30))
    assert device_free_memory(torch.device("cuda:0")) == 140 << 30
    assert device_free_memory("cpu") is None
    assert gpu_tile(10_000_000, device_free_memory("cuda:0")) == (GPU_ROWS, GPU_COLS)
    for free["bytes"] in (8 << 30, 1 << 30, 96 << 20, 4 << 20):
        rows, cols = gpu_tile(10_000_000, device_free_memory("cuda"))
        assert rows * cols * TILE_ENTRY_BYTES <= TILE_MEMORY_SHARE * free["bytes"]
        assert rows % 64 == 0 and cols % 64 == 0 and cols >= rows
        # the widest tile that fits: 64 more columns would not
        budget = TILE_MEMORY_SHARE * free["bytes"]
        assert cols == GPU_COLS or rows * (cols + 64) * TILE_ENTRY_BYTES > budget
    assert gpu_tile(10_000_000, 1 << 30) == (4096, 8192)
    assert gpu_tile(1000, 140 << 30) == (1024, 1024)  # small N: one tile
    with pytest.raises(MemoryError, match="not enough for the smallest tile"):
        gpu_tile(10_000_000, 10_000)


# ------------------------------------------------------------------ item 4: one copy per tile


def test_one_compacted_copy_back_per_tile_and_maxima_stay_on_the_device():
    x = _rows(1, 700, 24)
    oracle = dense_search_all(x, THRESHOLD, nearest=True)
    for tile in TILINGS:
        report: dict = {}
        got = blocked_search(x, THRESHOLD, engine="torch", tile=tile, report=report)
        _same(got, oracle)
        moved = report["device_tiles"]
        rows, cols = (tile, tile) if isinstance(tile, int) else tile
        cols = max(rows, cols)
        blocks = -(-700 // rows)
        assert moved["tiles"] == sum(-(-(700 - a * rows) // cols) for a in range(blocks))
        # at most one copy back per tile (none for a tile with nothing to send), plus
        # one for the maxima at the end; nothing to the device for in-memory rows
        assert 2 <= moved["to_host"] <= moved["tiles"] + 1
        assert moved["to_device"] == 0
        assert moved["syncs"] == 0  # the CPU: no device to wait for
        assert moved["rows"] == "resident"


# ------------------------------------------------------------------ item 7: store streaming


def test_store_is_streamed_and_equals_the_oracle(tmp_path):
    store = _store(tmp_path / "s", _rows(2, 400, 32))
    oracle = dense_search_all(store[:], THRESHOLD, nearest=True)
    for tile in TILINGS:
        for p in PRECISIONS if tile != TILINGS[0] else ("fp32",):  # tiny tiles: slow
            report: dict = {}
            got = blocked_search(
                store, THRESHOLD, engine="torch", tile=tile, precision=p, report=report
            )
            _same(got, oracle)
            moved = report["device_tiles"]
            assert moved["rows"] == "streamed"
            assert moved["largest_read"] <= (max(tile) if isinstance(tile, tuple) else tile)


def test_resident_rows_are_filled_chunk_by_chunk(tmp_path, monkeypatch):
    store = _store(tmp_path / "s", _rows(3, 900, 32))
    oracle = dense_search_all(store[:], THRESHOLD, nearest=True)
    monkeypatch.setattr(blocked, "STAGING_BYTES", 100 * 32 * 4)  # 100-row staging chunks
    report: dict = {}
    got = blocked_search(
        store, THRESHOLD, engine="torch", tile=(64, 256), resident=True, report=report
    )
    _same(got, oracle)
    moved = report["device_tiles"]
    assert moved["rows"] == "resident"
    assert moved["to_device"] == 9 and moved["largest_read"] == 100


@pytest.mark.slow
def test_store_never_read_whole_into_host_memory(tmp_path):
    """A 16k x 384 store (24 MiB) searched in 512 x 2048 tiles: the host's peak extra
    memory (numpy allocations: store reads, pairs, near-best lists, the rescoring's
    scratch) stays near one column block (3 MiB) plus the O(N) bookkeeping, well below
    the store; the results equal the in-memory numpy search's."""
    rng = np.random.default_rng(4)
    n, d = 16_000, 384
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[1::97] = x[::97][: x[1::97].shape[0]]  # planted exact copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = _store(tmp_path / "s", x)
    del x
    tracemalloc.start()
    try:
        report: dict = {}
        got = blocked_search(store, THRESHOLD, engine="torch", tile=(512, 2048), report=report)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = n * d * 4
    assert report["device_tiles"]["largest_read"] == 2048
    assert peak < size / 2, f"peak {peak} bytes vs store {size}"
    _same(got, blocked_search(store[:], THRESHOLD, tile=(512, 2048)))


# ------------------------------------------------------------------ item 8: float64 input


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), d=st.sampled_from([3, 16, 40]))
def test_float64_input_on_the_torch_path_equals_the_oracle(seed, d):
    x = _rows(seed, 120, d, dtype=np.float64)
    oracle = dense_search_all(x, THRESHOLD, nearest=True)
    _same(blocked_search(x, THRESHOLD, tile=(32, 64)), oracle)  # the numpy path
    for tile in TILINGS:
        for p in PRECISIONS if tile != TILINGS[0] else ("fp32",):
            _same(blocked_search(x, THRESHOLD, engine="torch", tile=tile, precision=p), oracle)


def test_float64_memmap_is_streamed(tmp_path):
    x = _rows(5, 500, 16, dtype=np.float64)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float64, shape=x.shape)
    mm[:] = x
    mm.flush()
    oracle = dense_search_all(x, THRESHOLD, nearest=True)
    report: dict = {}
    _same(blocked_search(mm, THRESHOLD, engine="torch", tile=64, report=report), oracle)
    assert report["device_tiles"]["rows"] == "streamed"


# ------------------------------------------------------------------ real CUDA


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("resident", [None, True, False])
def test_cuda_store_streamed_equals_the_oracle(tmp_path, resident):
    store = _store(tmp_path / "s", _rows(6, 3000, 64))
    oracle = dense_search_all(store[:], THRESHOLD, nearest=True)
    for p in ("fp32", "bf16", "fp16"):
        report: dict = {}
        got = blocked_search(
            store, THRESHOLD, device="cuda", precision=p, resident=resident, report=report
        )
        _same(got, oracle)
        moved = report["device_tiles"]
        assert moved["rows"] == ("streamed" if resident is False else "resident")
        assert moved["to_host"] <= moved["tiles"] + 1
        # one wait per tile (nonzero's count) and one per copy back, no more
        assert moved["syncs"] <= 2 * moved["tiles"] + moved["to_device"] + 1


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_float64_input_and_tiles_from_device_memory():
    x = _rows(7, 2000, 48, dtype=np.float64)
    oracle = dense_search_all(x, THRESHOLD, nearest=True)
    report: dict = {}
    _same(blocked_search(x, THRESHOLD, device="cuda", report=report), oracle)
    assert report["device_tiles"]["tile"] == list(gpu_tile(2000, device_free_memory("cuda")))


# ------------------------------------------- issue 16 item 3: the index's cross search


def _same_cross(got, want) -> None:
    for name in ("q", "b", "s", "query_best", "base_best"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 150),
    split=st.floats(0.05, 0.95),
    tile=st.sampled_from([(None, None), (5, 11), (64, 32), (1, 7)]),
    precision=st.sampled_from(PRECISIONS),
    live=st.booleans(),
    floor=st.booleans(),
    base_best=st.booleans(),
    stored=st.booleans(),
)
def test_cross_search_on_the_torch_tiles_equals_numpy(
    tmp_path_factory, seed, n, split, tile, precision, live, floor, base_best, stored
):
    """``cross_search(engine="torch")``: the index's queries-x-base search through the
    device tile loop (:class:`TorchTiles`, rectangular) gives the numpy tiles' bits, with
    removed base rows, a floor on the base rows' bests, no base bests, and a store base
    read block by block."""
    from dedup_index.search.cross import cross_search

    x = _rows(seed, n, 16)
    m = min(n - 1, max(1, int(n * split)))
    q, base = x[n - m :], x[: n - m]
    rng = np.random.default_rng(seed)
    kw = {"rows": tile[0], "cols": tile[1], "precision": precision, "base_best": base_best}
    if live:
        kw["base_live"] = rng.random(len(base)) > 0.3
    if floor and base_best:
        kw["base_floor"] = rng.uniform(0.5, 1.0, len(base))
    want = cross_search(q, base, THRESHOLD, **kw)
    if stored:
        base = _store(tmp_path_factory.mktemp("cross") / "s", base)
    _same_cross(cross_search(q, base, THRESHOLD, engine="torch", **kw), want)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_cross_search_equals_the_cpu(tmp_path):
    """On a GPU: the index's cross search (a store base, removed rows, a floor) gives the
    CPU's bits in every precision."""
    from dedup_index.search.cross import cross_search

    x = _rows(8, 3000, 64)
    q, store = x[2500:], _store(tmp_path / "s", x[:2500])
    rng = np.random.default_rng(8)
    live = rng.random(2500) > 0.1
    floor = rng.uniform(0.5, 1.0, 2500)
    for p in PRECISIONS:
        want = cross_search(q, store, THRESHOLD, base_live=live, base_floor=floor, precision=p)
        got = cross_search(
            q, store, THRESHOLD, base_live=live, base_floor=floor, precision=p, device="cuda"
        )
        _same_cross(got, want)
