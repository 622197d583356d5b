"""The index's key table (Arrow strings + sorted hash runs) and the store's streamed keys:
what a row's key is and where a key is, in bounded memory (issue 15 item 4)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup_index.index import DedupIndex
from dedup_index.index import keys as keys_module
from dedup_index.index.keys import KeyTable, hash_keys, repeated_keys
from dedup_index.store import EmbeddingStore, StoreCorruptError, StoreError

MASK = (1 << 64) - 1


def reference_hash(key: str) -> int:
    """FNV-1a over the UTF-8 bytes, then the splitmix64 finaliser: the documented hash."""
    h = 0xCBF29CE484222325
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 31)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=40), st.integers(0, 5))
def test_the_hash_of_each_key_is_fnv1a_of_its_utf8_bytes_in_any_arrow_layout(keys, cut):
    monkeypatch = pytest.MonkeyPatch()
    try:
        check_hashes(keys, cut, monkeypatch)
    finally:
        monkeypatch.undo()


def check_hashes(keys, cut, monkeypatch):
    want = np.array([reference_hash(k) for k in keys], dtype=np.uint64)
    assert np.array_equal(hash_keys(keys), want)
    monkeypatch.setattr(keys_module, "PYTHON_HASH_KEYS", 0)  # the compiled kernel
    assert np.array_equal(hash_keys(keys), want)
    arr = pa.array(["pad"] * cut + keys, type=pa.string()).slice(cut)  # offset, int32 offsets
    assert np.array_equal(hash_keys(arr), want)
    chunked = pa.chunked_array([keys[:cut], keys[cut:]], type=pa.large_string())
    assert np.array_equal(hash_keys(chunked), want)


keys_of_few_letters = st.lists(st.text(alphabet="abc", max_size=3), max_size=60)


@settings(max_examples=80, deadline=None)
@given(
    keys_of_few_letters,
    st.lists(st.integers(0, 60), max_size=6),
    st.lists(st.text(alphabet="abcd", max_size=3), max_size=20),
    st.data(),
)
def test_rows_of_is_the_first_row_below_stop_as_extends_and_lookups_interleave(
    keys, cuts, queries, data
):
    """Oracle: a scan for the first row < stop.  The table grows part by part, with
    lookups between the parts (the hash index then exists and takes each part as a
    run, merged as the runs' sizes require)."""
    bounds = sorted({0, len(keys), *(min(c, len(keys)) for c in cuts)})
    table = KeyTable()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        table.extend(keys[a:b])
        if data.draw(st.booleans()):
            stop = data.draw(st.integers(0, len(table)))
            got = table.rows_of(queries, stop=stop)
            want = [next((r for r in range(stop) if keys[r] == q), -1) for q in queries]
            assert got.tolist() == want
    assert len(table) == len(keys) and table.to_list() == keys
    got = table.rows_of(queries + keys)
    want = [keys.index(q) if q in keys else -1 for q in queries + keys]
    assert got.tolist() == want
    if keys:
        rows = data.draw(st.lists(st.integers(0, len(keys) - 1), max_size=10))
        assert table.take(rows) == [keys[r] for r in rows]
        a = data.draw(st.integers(0, len(keys)))
        assert table.to_list(a, len(keys)) == keys[a:]


def test_a_table_of_many_small_appends_keeps_few_runs_and_finds_every_key():
    table = KeyTable.from_parts([[f"k{r}" for r in range(1000)]])
    assert table.rows_of(["k5"]).tolist() == [5]  # the hash index is built here
    for r in range(1000, 1300):
        table.extend([f"k{r}"])
    runs = table._runs()
    assert len(runs) <= 12 and sum(len(run) for run in runs) == 1300
    assert all(np.all(run.hashes[1:] >= run.hashes[:-1]) for run in runs)
    probe = [f"k{r}" for r in range(0, 1300, 7)] + ["k1300", "nope"]
    assert table.rows_of(probe).tolist() == [*range(0, 1300, 7), -1, -1]
    assert table.rows_of(["k1200"], stop=1200).tolist() == [-1]
    with pytest.raises(IndexError, match=r"\[0, 1300\)"):
        table.take([1300])


@settings(max_examples=40, deadline=None)
@given(keys_of_few_letters)
def test_repeated_keys_names_the_keys_that_occur_more_than_once(keys):
    want = {k for k, c in Counter(keys).items() if c > 1}
    got = repeated_keys(keys, limit=len(keys) + 1)
    assert set(got) == want and len(got) == len(want)
    assert len(repeated_keys(keys, limit=1)) == min(1, len(want))


def keyed_store(path, n: int) -> tuple[EmbeddingStore, list[str]]:
    """A store whose keys file spans several checksum blocks (1 MiB each)."""
    rng = np.random.default_rng(0)
    keys = [f"photos/{r % 97:03d}/é-{r:07d}-" + "x" * (r % 50) + ".jpg" for r in range(n)]
    store = EmbeddingStore.create(path, 4)
    store.append(rng.standard_normal((n, 4)).astype(np.float32), keys=keys)
    store.close()
    return EmbeddingStore.open(path), keys


def test_store_keys_stream_in_chunks_checked_block_by_block(tmp_path):
    store, keys = keyed_store(tmp_path / "s", 40_000)
    assert (tmp_path / "s" / "keys.jsonl").stat().st_size > 2 << 20  # three blocks at least
    chunks = list(store.iter_keys(rows=7_000))
    assert [len(c) for c in chunks] == [7_000] * 5 + [5_000]
    assert [k for c in chunks for k in c] == keys == store.keys()
    store.close()
    path = tmp_path / "s" / "keys.jsonl"
    data = bytearray(path.read_bytes())
    data[(2 << 20) + 10] ^= 1  # a byte of the third block
    path.write_bytes(bytes(data))
    with EmbeddingStore.open(tmp_path / "s") as damaged:
        stream = damaged.iter_keys(rows=1_000)
        first = next(stream)
        assert first == keys[:1_000]  # what precedes the damage reads
        with pytest.raises(StoreCorruptError, match=r"keys\.jsonl is damaged: bytes 2097152"):
            list(stream)
    path.write_bytes(bytes(data[: 1 << 20]))  # cut short: refused when opened
    with pytest.raises(StoreError, match="has 1048576 bytes"):
        EmbeddingStore.open(tmp_path / "s")


def test_an_index_finds_its_keys_after_a_one_pass_build_from_a_keyed_store(tmp_path):
    """The build reads the store's keys in chunks (checked distinct by their hashes),
    writes them with the rows and drops them; the reopened index finds every key, skips
    or refuses indexed ones, and names duplicates' keys."""
    store, keys = keyed_store(tmp_path / "s", 3_000)
    rows = store.to_array()
    with DedupIndex.create(tmp_path / "i", 4, 0.999, backend="ivf") as index:
        assert index.add_store(store, one_pass=True)["batches"] == 1
    with DedupIndex.open(tmp_path / "i", mode="a") as index:
        assert index.keys() == keys
        assert index._rows_of([keys[2999], keys[0]]).tolist() == [2999, 0]
        with pytest.raises(KeyError, match="1 key"):
            index._rows_of(["missing"])
        added = index.add(rows[[10, 20]], keys=[keys[10], "fresh"], on_duplicate_key="skip")
        assert added.keys == ["fresh"] and added.skipped == [keys[10]]
        assert added.duplicate_of == [keys[20]]
        with pytest.raises(Exception, match="already in the index"):
            index.add(rows[:1], keys=[keys[0]])
        assert index._rows_of(["fresh"]).tolist() == [3000]
        hits = index.query(rows[[5]])[0]
        assert hits[0][0] == keys[5]


def test_a_store_whose_keys_repeat_is_refused_a_one_pass_build(tmp_path):
    rng = np.random.default_rng(1)
    store = EmbeddingStore.create(tmp_path / "s", 4)
    store.append(rng.standard_normal((30, 4)).astype(np.float32), keys=["a", "b", "c"] * 10)
    store.close()
    with (
        EmbeddingStore.open(tmp_path / "s") as store,
        DedupIndex.create(tmp_path / "i", 4, 0.9, backend="ivf") as index,
    ):
        with pytest.raises(ValueError, match="keys repeat"):
            index.add_store(store, one_pass=True)
