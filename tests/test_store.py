"""The on-disk store: embedding shards, manifest commits, crash safety, spilled pairs.

Everything runs on real files under ``tmp_path``; crash safety is proven by killing real
child processes (``os._exit`` at chosen points through the store's test-only hook, and
SIGKILL at a random moment) and reopening what they left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup_index.search.canonical import as_unit_float32
from dedup_index.search.pairs import PairSet
from dedup_index.store import (
    EmbeddingStore,
    PairFile,
    PairSink,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    open_or_array,
)
from dedup_index.store.embeddings import MANIFEST, shard_name

DIM = 5
ODD_KEYS = [
    "plain.jpg",
    "line\nbreak.jpg",
    'quote"and\\backslash',
    "unicode é 漢字 🙂",
    "",
    "sep\u2028para\u2029",
    "lone \ud800 surrogate",
    "tab\tand\r\ncrlf",
]


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return as_unit_float32(np.random.default_rng(seed).standard_normal((n, dim)))


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    out = {".": (0, path.stat().st_mtime_ns)}
    for p in sorted(path.iterdir()):
        s = p.stat()
        out[p.name] = (s.st_size, s.st_mtime_ns)
    return out


# ------------------------------------------------------------------ create, append, read


def test_appends_across_shards_reopen_and_read(tmp_path):
    path = tmp_path / "store"
    sizes = [3, 7, 1, 12, 0, 5]
    batches = [np.random.default_rng(b).standard_normal((n, DIM)) * 3 for b, n in enumerate(sizes)]
    with EmbeddingStore.create(path, DIM, shard_rows=7, meta={"model": "m"}) as store:
        assert store.shape == (0, DIM) and store.has_keys is None
        start = 0
        for x in batches:
            ids = store.append(x)
            assert ids.dtype == np.int64
            np.testing.assert_array_equal(ids, np.arange(start, start + len(x)))
            start += len(x)
        assert len(store) == 28
    expected = as_unit_float32(np.concatenate(batches))

    store = EmbeddingStore.open(path)
    assert store.shape == (28, DIM) and len(store) == 28 and store.ndim == 2
    assert store.dim == DIM and store.dtype == np.float32
    assert store.storage_dtype == np.float32 and store.meta == {"model": "m"}
    assert store.keys() is None and store.key_index() == {} and store.has_keys is False
    assert sorted(p.name for p in path.glob("shard-*")) == [shard_name(k) for k in range(4)]
    arr = store.to_array()
    assert arr.dtype == np.float32 and arr.flags.c_contiguous
    assert np.array_equal(arr, expected)
    assert np.array_equal(np.asarray(store), expected)
    assert np.array_equal(store.astype(np.float64), expected.astype(np.float64))
    np.testing.assert_array_equal(store[5], expected[5])
    blocks = list(store.iter_blocks(block_rows=4, start=3, stop=26))
    assert [b for b, _ in blocks] == list(range(3, 26, 4))
    assert np.array_equal(np.concatenate([x for _, x in blocks]), expected[3:26])
    assert store.nbytes_on_disk > 0
    # Each shard file holds exactly its rows, raw: full shards 7 rows, the last one 7 too.
    raw = np.fromfile(path / shard_name(0), dtype=np.float32).reshape(-1, DIM)
    assert raw.shape == (7, DIM) and np.array_equal(raw, expected[:7])
    assert [(path / shard_name(k)).stat().st_size for k in range(4)] == [7 * DIM * 4] * 4
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    n = 40
    arr = unit(n, seed=1)
    out = {}
    for dtype in ("float32", "float16"):
        path = tmp_path_factory.mktemp(dtype)
        with EmbeddingStore.create(path, DIM, dtype=dtype, shard_rows=7) as s:
            s.append(arr[:9])
            s.append(arr[9:30])
            s.append(arr[30:])
        ref = arr if dtype == "float32" else arr.astype(np.float16).astype(np.float32)
        out[dtype] = (EmbeddingStore.open(path), ref)
    yield out
    for store, _ in out.values():
        store.close()


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit for bit


index_arrays = st.lists(st.integers(-40, 39), max_size=30)
bounds = st.one_of(st.none(), st.integers(-45, 45))
slices = st.builds(slice, bounds, bounds, st.sampled_from([None, 1, 2, 3, -1, -4]))


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(["float32", "float16"]), idx=index_arrays, sl=slices)
def test_getitem_equals_ndarray(stores, dtype, idx, sl):
    store, ref = stores[dtype]
    _same(store[idx], ref[idx])
    _same(store[np.array(idx, dtype=np.int64)], ref[np.array(idx, dtype=np.int64)])
    _same(store[sl], ref[sl])
    if idx:
        _same(store[idx[0]], ref[idx[0]])
        _same(store[np.int32(idx[0])], ref[np.int32(idx[0])])
        two_d = np.array(idx[: len(idx) // 2 * 2], dtype=np.int64).reshape(2, -1)
        _same(store[two_d], ref[two_d])


def test_getitem_edges(stores):
    store, ref = stores["float32"]
    for bad in (40, -41, [0, 40], np.array([3, -41])):
        with pytest.raises(IndexError):
            store[bad]
        with pytest.raises(IndexError):
            ref[bad]
    _same(store[[]], ref[np.array([], dtype=np.int64)])
    _same(store[37:99], ref[37:99])
    mask = np.arange(40) % 3 == 0
    _same(store[mask], ref[mask])
    _same(store[3:20, 1:3], ref[3:20, 1:3])
    _same(store[[5, 9, 5], 2], ref[[5, 9, 5], 2])
    with pytest.raises(IndexError):
        store[np.array([1.0])]
    out = store[0:3]
    out[:] = 0  # results are copies: the store is untouched
    _same(store[0:3], ref[0:3])


def test_float16_halves_disk_and_rounds_once(tmp_path):
    x = unit(3000, dim=64, seed=2)
    sizes = {}
    for dtype in ("float32", "float16"):
        with EmbeddingStore.create(tmp_path / dtype, 64, dtype=dtype, shard_rows=1000) as s:
            s.append(x)
            sizes[dtype] = s.nbytes_on_disk
    s16 = EmbeddingStore.open(tmp_path / "float16")
    assert s16.storage_dtype == np.float16 and s16.dtype == np.float32
    _same(s16.to_array(), x.astype(np.float16).astype(np.float32))
    assert 0.4 < sizes["float16"] / sizes["float32"] < 0.6


def test_keys_round_trip(tmp_path):
    path = tmp_path / "k"
    keys = ODD_KEYS + ["plain.jpg"]  # a repeated key maps to its first row
    with EmbeddingStore.create(path, DIM, shard_rows=4) as s:
        s.append(unit(5), keys[:5])
        s.append(unit(4, seed=3), keys[5:])
        assert s.keys() == keys
        assert s.key_index()["plain.jpg"] == 0
        s.append(unit(1, seed=4), ["late"])
        assert s.key_index()["late"] == 9 and s.has_keys is True
    with EmbeddingStore.open(path, "a") as s:
        assert s.keys() == keys + ["late"]
        index = s.key_index()
        assert len(index) == len(set(keys)) + 1
        assert all(keys[index[k]] == k for k in keys)
        s.append(unit(1, seed=5), ["\n"])
        assert s.key_index()["\n"] == 10
    assert EmbeddingStore.open(path).keys()[-1] == "\n"
    # One JSON string per line: exactly one line per row, any characters inside.
    assert (path / "keys.jsonl").read_bytes().count(b"\n") == 11


# --------------------------------------------------------------------------- errors


def test_append_errors(tmp_path):
    s = EmbeddingStore.create(tmp_path / "s", DIM)
    with pytest.raises(ValueError, match=r"7 columns.*dim 5"):
        s.append(np.ones((2, 7)))
    bad = np.ones((4, DIM))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*: 2$"):
        s.append(bad)
    with pytest.raises(ValueError, match="zero-norm"):
        s.append(np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="got 1 keys for 2 rows"):
        s.append(unit(2), ["a"])
    with pytest.raises(TypeError, match="not a single string"):
        s.append(unit(2), "ab")
    with pytest.raises(TypeError, match="key 1 is int"):
        s.append(unit(2), ["a", 3])
    assert len(s) == 0
    s.append(unit(2), ["a", "b"])
    with pytest.raises(ValueError, match="must give keys"):
        s.append(unit(1))
    s2 = EmbeddingStore.create(tmp_path / "s2", DIM)
    s2.append(unit(2))
    with pytest.raises(ValueError, match="cannot give keys"):
        s2.append(unit(1), ["x"])
    assert len(s) == 2 and len(s2) == 2
    with pytest.raises(StoreError, match="read-only"):
        EmbeddingStore.open(tmp_path / "s").append(unit(1), ["c"])


def test_create_and_open_errors(tmp_path):
    path = tmp_path / "s"
    EmbeddingStore.create(path, DIM, dtype="float16").append(unit(3))
    with pytest.raises(StoreExistsError, match="already holds"):
        EmbeddingStore.create(path, DIM)
    with pytest.raises(StoreError, match=r"dim=5, dtype=float16.*dim=8, dtype=float16"):
        EmbeddingStore.create(path, 8, dtype="float16", exist_ok=True)
    with pytest.raises(StoreError, match=r"dtype=float16.*dtype=float32"):
        EmbeddingStore.create(path, DIM, exist_ok=True)
    with EmbeddingStore.create(path, DIM, dtype=np.float16, exist_ok=True) as s:
        assert len(s) == 3 and s.mode == "a"
    with pytest.raises(ValueError, match="dtype must be one of"):
        EmbeddingStore.create(tmp_path / "f64", DIM, dtype="float64")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="not empty"):
        EmbeddingStore.create(tmp_path / "other", DIM)
    with pytest.raises(StoreNotFoundError, match="not an embedding store"):
        EmbeddingStore.open(tmp_path / "other")
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        EmbeddingStore.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="mode"):
        EmbeddingStore.open(path, "w")
    with pytest.raises(TypeError, match="JSON"):
        EmbeddingStore.create(tmp_path / "m", DIM, meta={"f": object()})


def _store_with_shards(path: Path) -> None:
    with EmbeddingStore.create(path, DIM, shard_rows=7) as s:
        s.append(unit(20))


def test_damaged_store_errors(tmp_path):
    a, b, c, d = (tmp_path / x for x in "abcd")
    for p in (a, b, c, d):
        _store_with_shards(p)
    (a / shard_name(1)).unlink()
    with pytest.raises(StoreError, match=r"shard-00001\.bin is missing"):
        EmbeddingStore.open(a)
    with open(b / shard_name(2), "r+b") as f:
        f.truncate(20)
    with pytest.raises(StoreError, match=r"shard-00002\.bin is truncated"):
        EmbeddingStore.open(b)
    (c / MANIFEST).write_text('{"format": "dedup_index.Embed')
    with pytest.raises(StoreError, match=r"manifest .*manifest\.json is corrupt"):
        EmbeddingStore.open(c)
    m = json.loads((d / MANIFEST).read_text())
    m["version"] = 99
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="version 99"):
        EmbeddingStore.open(d)
    m["version"], m["count"] = 2, 30
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="corrupt"):
        EmbeddingStore.open(d)


def test_read_only_mode_writes_nothing(tmp_path):
    path = tmp_path / "s"
    with EmbeddingStore.create(path, DIM, shard_rows=7) as s:
        s.append(unit(17), [f"k{r}" for r in range(17)])
    before = snapshot(path)
    with EmbeddingStore.open(path, "r") as s:
        s.to_array(), s[[3, 15, 0]], s[2:16], s.keys(), s.key_index(), s.nbytes_on_disk
        list(s.iter_blocks(5))
        with pytest.raises(StoreError):
            s.append(unit(1), ["x"])
    assert open_or_array(str(path)).shape == (17, DIM)
    assert snapshot(path) == before


def test_open_or_array(tmp_path):
    arr = unit(3)
    assert open_or_array(arr) is arr
    with EmbeddingStore.create(tmp_path / "s", DIM) as s:
        s.append(arr)
        assert open_or_array(s) is s
    opened = open_or_array(tmp_path / "s")
    assert isinstance(opened, EmbeddingStore) and opened.mode == "r"
    assert open_or_array("not/a/dir") == "not/a/dir"
    with pytest.raises(StoreNotFoundError):
        open_or_array(tmp_path)


def test_store_imports_no_heavy_modules():
    code = (
        "import sys, dedup_index.store; "
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'faiss')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------- crash safety

SIZES = [3, 9, 4, 7, 2]  # with shard_rows=7, appends cross shard boundaries
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from dedup_index.store import EmbeddingStore

    path, data, loop = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
    keys = json.loads(open(sys.argv[4], encoding="utf-8").read())
    sizes = json.loads(sys.argv[5])
    starts = np.cumsum([0] + sizes)
    store = EmbeddingStore.open(path, "a")
    for b in range(loop * 5000 or len(sizes)):
        k = b % len(sizes)
        a, z = starts[k], starts[k + 1]
        store.append(data[a:z], keys[a:z])
        print(len(store), flush=True)
    """
)


def _crash_setup(tmp_path: Path) -> tuple[Path, np.ndarray, list[str], list[str]]:
    """An empty store, the child's command line, its raw rows and keys."""
    path = tmp_path / "store"
    EmbeddingStore.create(path, 4, shard_rows=7).close()
    raw = np.random.default_rng(7).standard_normal((sum(SIZES), 4))
    keys = [f"{ODD_KEYS[r % len(ODD_KEYS)]}#{r}" for r in range(len(raw))]
    np.save(tmp_path / "data.npy", raw)
    (tmp_path / "keys.json").write_text(json.dumps(keys), encoding="utf-8")
    argv = [sys.executable, "-c", CHILD, str(path), str(tmp_path / "data.npy")]
    argv += ["{loop}", str(tmp_path / "keys.json"), json.dumps(SIZES)]
    return path, raw, keys, argv


def _check_prefix(path: Path, data: np.ndarray, keys: list[str]) -> int:
    """Reopen the store; its rows must be a committed prefix of the appends, intact."""
    with EmbeddingStore.open(path) as s:
        n = len(s)
        assert s.keys() == keys[:n]
        _same(s.to_array(), data[:n])
    return n


@pytest.mark.parametrize(
    ("point", "committed"),
    [
        ("shard_chunk:4", 12),  # third append: first shard written, second not
        ("shard_chunk:5", 12),  # third append: a new shard file created and written
        ("shards_written:3", 12),  # all rows written, keys not
        ("keys_written:3", 12),  # rows and keys written, manifest not
        ("manifest_partial:3", 12),  # half of the manifest temp file written
        ("manifest_tmp:3", 12),  # temp manifest complete, not renamed
        ("manifest_replaced:3", 16),  # renamed, directory not yet fsynced: committed
    ],
)
def test_crash_at_each_point_leaves_a_committed_store(tmp_path, point, committed):
    path, raw, keys, argv = _crash_setup(tmp_path)
    data = as_unit_float32(raw)  # row-wise: what the store holds, whatever the batching
    argv[argv.index("{loop}")] = "0"
    env = {**os.environ, "DEDUP_INDEX_CRASH_AT": point}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 77, proc.stderr
    left = {p.name for p in path.iterdir()}
    if point == "shard_chunk:5":  # a shard file the manifest does not count yet
        assert shard_name(2) in left and json.loads((path / MANIFEST).read_text())["n_shards"] == 2
    if point.startswith(("keys_written", "manifest_partial", "manifest_tmp")):
        assert (path / "keys.jsonl").read_bytes().count(b"\n") == 16  # uncommitted keys
    assert (".manifest.json.tmp" in left) == point.startswith(("manifest_partial", "manifest_tmp"))
    assert _check_prefix(path, data, keys) == committed
    # The next writer overwrites whatever the crashed append left beyond the commit.
    with EmbeddingStore.open(path, "a") as s:
        s.append(raw[committed:], keys[committed:])
    assert _check_prefix(path, data, keys) == len(data)


def test_sigkill_at_a_random_moment(tmp_path):
    path, raw, keys, argv = _crash_setup(tmp_path)
    data = as_unit_float32(raw)
    argv[argv.index("{loop}")] = "1"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        printed = [int(proc.stdout.readline()) for _ in range(40)]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with EmbeddingStore.open(path) as s:
        n = len(s)
        got, got_keys = s.to_array(), s.keys()
    # Rebuild what the appends committed: batch b is rows SIZES-block b % 5 of data.
    starts = np.cumsum([0] + SIZES)
    want, want_keys, counts = [], [], [0]
    while counts[-1] < n:
        k = (len(counts) - 1) % len(SIZES)
        want.append(data[starts[k] : starts[k + 1]])
        want_keys += keys[starts[k] : starts[k + 1]]
        counts.append(counts[-1] + SIZES[k])
    assert n == counts[-1] and n >= printed[-1]  # a committed count, never less
    _same(got, np.concatenate(want))
    assert got_keys == want_keys


# ---------------------------------------------------------------------------- pairs


def _random_pairs(rng: np.random.Generator, n: int) -> PairSet:
    i = rng.integers(0, 30, n)
    j = i + rng.integers(1, 30, n)
    return PairSet(i, j, np.round(rng.random(n), 3) + i)  # s is a function of (i, ...)


def _reference(chunks: list[PairSet]) -> PairSet:
    i = np.concatenate([c.i for c in chunks])
    j = np.concatenate([c.j for c in chunks])
    s = np.concatenate([c.s for c in chunks])
    order = np.lexsort((j, i))
    keep = np.ones(len(i), bool)
    keep[1:] = np.diff(i[order]) != 0
    keep[1:] |= np.diff(j[order]) != 0
    return PairSet(i[order][keep], j[order][keep], s[order][keep])


def test_pair_sink_below_budget_returns_sorted_unique_pairset(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [_random_pairs(rng, 40) for _ in range(3)]
    chunks.append(chunks[0])  # the same pairs again, as overlapping tiles give them
    sink = PairSink(tmp_path / "pairs.parquet")
    for c in chunks:
        sink.add(c)
    sink.add(PairSet.empty())
    assert sink.n_pairs == 160 and not sink.spilled
    out = sink.finish()
    assert isinstance(out, PairSet) and out.equals(_reference(chunks))
    assert len(out) < 120
    assert not (tmp_path / "pairs.parquet").exists()
    assert PairSink().finish().equals(PairSet.empty())
    with pytest.raises(ValueError, match="finished"):
        sink.add(chunks[0])


def test_pair_sink_spills_beyond_budget(tmp_path):
    rng = np.random.default_rng(1)
    chunks = [_random_pairs(rng, int(rng.integers(1, 90))) for _ in range(30)]
    chunks.append(chunks[3])
    path = tmp_path / "pairs.parquet"
    sink = PairSink(path, memory_budget=1024)
    for c in chunks:
        sink.add(c)
    assert sink.spilled and not path.exists()  # written to path + ".tmp" until finish
    out = sink.finish()
    assert isinstance(out, PairFile) and out.path == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]
    total = sum(len(c) for c in chunks)
    assert len(out) == sink.n_pairs == total
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    got = list(out.iter_chunks(rows=50))
    assert all(0 < len(c) <= 50 for c in got)
    for name in ("i", "j", "s"):  # file order = the order added, repeats kept
        joined = np.concatenate([getattr(c, name) for c in got])
        assert np.array_equal(joined, np.concatenate([getattr(c, name) for c in chunks]))
        assert joined.dtype == (np.float64 if name == "s" else np.int64)
    ref = _reference(chunks)
    assert out.to_pairset().equals(ref)
    frame = out.to_frame()
    assert list(frame.columns) == ["i", "j", "similarity"] and len(frame) == len(ref)
    assert PairFile(path).to_pairset().equals(ref)


def test_pair_sink_temp_file_and_abort(tmp_path):
    rng = np.random.default_rng(2)
    sink = PairSink(memory_budget=100)
    sink.add(_random_pairs(rng, 10))
    out = sink.finish()
    assert isinstance(out, PairFile) and out.path.exists() and len(out) == 10
    folder = out.path.parent
    out.cleanup()
    assert not folder.exists()

    path = tmp_path / "p.parquet"
    with pytest.raises(RuntimeError), PairSink(path, memory_budget=100) as sink:
        sink.add(_random_pairs(rng, 10))
        assert sink.spilled
        raise RuntimeError("search failed")
    assert list(tmp_path.iterdir()) == []


def test_pair_file_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        PairFile(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="not a readable Parquet"):
        PairFile(tmp_path / "junk.parquet")
    pq.write_table(PairSet.empty().to_frame().drop(columns="j").pipe(_table), tmp_path / "x.pq")
    with pytest.raises(StoreError, match=r"lacks column\(s\) \['j'\]"):
        PairFile(tmp_path / "x.pq")


def _table(frame):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)
