"""Every byte we store is checked (issue 13, item 3): real flipped bytes in embedding-store
shards, in keys files and in an embedding cache give an error naming the file, never a
score; stores of format 1 (no checksums) are still read and upgraded when appended to;
shards grow as they fill, so a small store works under a real file-size limit (item 7)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import COPY_THRESHOLD, MemoryStorage, jpeg_bytes, photo, write_version_1_index
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import ImageDeduplicateFilter, dedup_embeddings
from dedup_index.encode.cache import CacheCorruptError, EmbeddingCache
from dedup_index.search.canonical import as_unit_float32
from dedup_index.store import EmbeddingStore, StoreCorruptError, StoreError
from dedup_index.store.embeddings import BLOCK_BYTES, KEYS_FILE, MANIFEST, shard_name

DIM = 2048  # 8 KiB rows: 128 rows per 1 MiB block, so small stores have several blocks
BLOCK = BLOCK_BYTES // (DIM * 4)


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return as_unit_float32(np.random.default_rng(seed).standard_normal((n, dim)))


def flip(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of the file at ``offset``: real damage on disk."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def make_store(path: Path, n: int = 300, shard_rows: int = 1000, keys: bool = True) -> np.ndarray:
    x = unit(n)
    with EmbeddingStore.create(path, DIM, shard_rows=shard_rows) as s:
        for a in range(0, n, 70):  # several appends, some ending inside a block
            s.append(
                x[a : a + 70], [f"img-{r}.jpg" for r in range(a, min(a + 70, n))] if keys else None
            )
    return x


def test_a_flipped_byte_in_a_shard_gives_an_error_naming_it_never_a_score(tmp_path):
    path = tmp_path / "s"
    x = make_store(path)
    row = 200  # in the second block (rows 128-255)
    flip(path / shard_name(0), row * DIM * 4 + 7, bit=6)  # an exponent bit: a huge value
    store = EmbeddingStore.open(path)  # opening stays cheap: nothing is hashed yet
    np.testing.assert_array_equal(store[0:BLOCK], x[:BLOCK])  # undamaged blocks still read
    np.testing.assert_array_equal(store[[5, 260, 299]], x[[5, 260, 299]])
    for read in (
        lambda: store[row],
        lambda: store[100:140],
        lambda: store[[3, row]],
        lambda: store.to_array(),
        lambda: list(store.iter_blocks(64)),
        lambda: dedup_embeddings(store, 0.9, backend="blocked"),
        lambda: dedup_embeddings(str(path), 0.9, backend="flat"),
        store.verify,
    ):
        with pytest.raises(StoreCorruptError, match=r"shard-00000\.bin is damaged: .*rows 128-255"):
            read()
    # A damaged block stays refused on every later read (it is never marked as checked).
    with pytest.raises(StoreCorruptError, match="Rebuild it"):
        store[row]


def test_a_flipped_byte_in_the_keys_file_is_an_error(tmp_path):
    path = tmp_path / "s"
    make_store(path)
    # "img-12.jpg" -> "img-13.jpg": still valid JSON, a key silently becoming another key.
    data = (path / KEYS_FILE).read_bytes()
    flip(path / KEYS_FILE, data.index(b'"img-12.jpg"') + 6, bit=0)
    store = EmbeddingStore.open(path)
    for read in (store.keys, store.key_index, store.verify):
        with pytest.raises(StoreCorruptError, match=r"keys file .*keys\.jsonl is damaged"):
            read()
    with EmbeddingStore.open(path, "a") as s, pytest.raises(StoreCorruptError):
        s.append(unit(1, seed=9), ["late"])  # the grown block would hash the damage in


def test_appending_never_hashes_damage_into_a_new_checksum(tmp_path):
    path = tmp_path / "s"
    make_store(path, n=290)  # the last block (256-289) is partly filled
    flip(path / shard_name(0), 270 * DIM * 4 + 100)
    with EmbeddingStore.open(path, "a") as s:
        with pytest.raises(StoreCorruptError, match="rows 256-289"):
            s.append(unit(5, seed=3), [f"new-{r}" for r in range(5)])
        assert len(s) == 290  # nothing was committed
    with EmbeddingStore.open(path, "a") as s:
        with pytest.raises(StoreCorruptError):
            s.truncate(280)  # truncating inside the damaged block: refused as well


def test_damage_past_the_committed_rows_is_ignored_and_appends_still_verify(tmp_path):
    path = tmp_path / "s"
    x = make_store(path, n=100, keys=False)
    with open(path / shard_name(0), "ab") as f:  # an append cut before its commit
        f.write(b"\xff" * (DIM * 4 * 3))
    y = unit(40, seed=5)
    with EmbeddingStore.open(path, "a") as s:
        assert s.verify() == {"rows": 100, "blocks": 1, "bytes": 100 * DIM * 4}
        s.append(y)
        np.testing.assert_array_equal(s.to_array(), np.concatenate([x, y]))
        s.truncate(130)
        s.append(y[:3])
    with EmbeddingStore.open(path) as s:
        assert s.verify()["rows"] == 133
        np.testing.assert_array_equal(s.to_array(), np.concatenate([x, y[:30], y[:3]]))
    assert (path / shard_name(0)).stat().st_size == 133 * DIM * 4  # the tail was cut off


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["shard0", "shard1", "keys"]), pos=st.floats(0, 1), bit=st.integers(0, 7)
)
def test_any_flipped_bit_anywhere_is_caught(tmp_path_factory, which, pos, bit):
    path = tmp_path_factory.mktemp("s") / "s"
    make_store(path, n=300, shard_rows=160)  # two shards, blocks of 128 rows, keys
    target = {"shard0": shard_name(0), "shard1": shard_name(1), "keys": KEYS_FILE}[which]
    size = (path / target).stat().st_size
    flip(path / target, min(size - 1, int(pos * size)), bit)
    with EmbeddingStore.open(path) as store, pytest.raises(StoreCorruptError, match=target):
        store.to_array() if which != "keys" else store.keys()
    with EmbeddingStore.open(path) as store, pytest.raises(StoreCorruptError, match=target):
        store.verify()


def _cache_with_rows(path: Path, n: int = 200) -> tuple[list[str], np.ndarray]:
    fps = [f"sha256:{r:064x}" for r in range(n)]
    x = unit(n, seed=4)
    with EmbeddingCache(path, model_name="m", dim=DIM) as cache:
        cache.add(fps, x, pixels=[100] * n)
    return fps, x


def test_a_flipped_byte_in_a_cache_shard_is_an_error_saying_to_delete_the_cache(tmp_path):
    path = tmp_path / "cache"
    fps, x = _cache_with_rows(path)
    with EmbeddingCache(path, model_name="m") as cache:  # undamaged: bit for bit
        found, rows = cache.lookup(fps)
        assert found.all() and np.array_equal(rows, x)
    flip(path / shard_name(0), 150 * DIM * 4 + 3, bit=5)
    with EmbeddingCache(path, model_name="m") as cache:
        found, rows = cache.lookup(fps[:100])  # rows 0-99: an undamaged block
        assert found.all() and np.array_equal(rows, x[:100])
        with pytest.raises(
            CacheCorruptError, match=rf"{path}.*shard-00000\.bin.*Delete the folder"
        ):
            cache.lookup(fps[140:160])
        with pytest.raises(StoreError):  # also a StoreError (and a DedupIndexError)
            cache.lookup([fps[150]])


def test_a_flipped_byte_in_the_cache_keys_is_an_error_at_open(tmp_path):
    path = tmp_path / "cache"
    _cache_with_rows(path)
    flip(path / KEYS_FILE, 5000)
    with pytest.raises(CacheCorruptError, match=r"keys\.jsonl is damaged.*Delete the folder"):
        EmbeddingCache(path, model_name="m")
    # The failed open released the writer lock: a fresh cache elsewhere works, and after
    # deleting the folder, as the message says, this path works again.
    import shutil

    shutil.rmtree(path)
    _cache_with_rows(path, n=3)


def test_a_run_with_a_damaged_cache_stops_with_the_error_not_wrong_scores(tmp_path, encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name)))
    paths = [str(p) for p in sorted(folder.glob("*.jpg"))]
    cache_dir = tmp_path / "cache"

    def run() -> pd.DataFrame:
        storage = MemoryStorage(pd.DataFrame({"image": paths}))
        ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, cache_dir=cache_dir).run(
            storage
        )
        return storage.written[0]

    first = run()
    assert len(first) == 3
    shard = cache_dir / shard_name(0)
    flip(shard, shard.stat().st_size // 2, bit=6)
    with pytest.raises(CacheCorruptError, match="Delete the folder"):
        run()


# --------------------------------------------------------------------------- format 1


def _write_v1_store(path: Path, x: np.ndarray, keys: list[str], shard_rows: int) -> None:
    """A store exactly as format 1 wrote it: sparse fixed-capacity .npy shards, no checksums."""
    path.mkdir()
    n, dim = x.shape
    n_shards = -(-n // shard_rows)
    for k in range(n_shards):
        mm = np.lib.format.open_memmap(
            path / f"shard-{k:05d}.npy", mode="w+", dtype=np.float32, shape=(shard_rows, dim)
        )
        part = x[k * shard_rows : (k + 1) * shard_rows]
        mm[: len(part)] = part
        mm.flush()
        del mm
    payload = "".join(json.dumps(k) + "\n" for k in keys).encode()
    (path / KEYS_FILE).write_bytes(payload)
    manifest = {
        "format": "dedup_index.EmbeddingStore",
        "version": 1,
        "dim": dim,
        "dtype": "float32",
        "shard_rows": shard_rows,
        "count": n,
        "n_shards": n_shards,
        "keys": {"file": KEYS_FILE, "count": n, "bytes": len(payload)},
        "meta": {
            "format": "dedup_index.EmbeddingCache",
            "version": 1,
            "model_name": "m",
            "dim": dim,
        },
    }
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_a_format_1_store_is_read_with_a_warning_and_upgraded_when_appended_to(tmp_path, caplog):
    path = tmp_path / "old"
    x = unit(50, dim=16)
    keys = [f"sha256:{r:064x}\t100" for r in range(50)]
    _write_v1_store(path, x, keys, shard_rows=32)
    caplog.set_level(logging.WARNING, logger="dedup_index")
    with EmbeddingStore.open(path) as s:  # read-only: read as it is, and said so
        assert not s.checksummed and s.keys() == keys
        np.testing.assert_array_equal(s.to_array(), x)
    assert "without checksums" in caplog.text and str(path) in caplog.text
    assert sorted(p.name for p in path.glob("shard-*")) == ["shard-00000.npy", "shard-00001.npy"]
    caplog.clear()
    # The cache opens it for appending: upgraded in place, logged.
    with EmbeddingCache(path, model_name="m") as cache:
        found, rows = cache.lookup([k.split("\t")[0] for k in keys])
        assert found.all() and np.array_equal(rows, x)
        cache.add(["sha256:new"], unit(1, dim=16, seed=1), pixels=[4])
    assert "upgraded the embedding store" in caplog.text
    assert sorted(p.name for p in path.glob("shard-*")) == ["shard-00000.bin", "shard-00001.bin"]
    with EmbeddingStore.open(path) as s:
        assert s.checksummed and len(s) == 51 and s.verify()["rows"] == 51
        np.testing.assert_array_equal(s[:50], x)
    flip(path / shard_name(1), 10)
    with EmbeddingStore.open(path) as s, pytest.raises(StoreCorruptError):
        s[40]


# ----------------------------------------------------------------- growing shards


GROW_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, not death
    limit = 64 << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from dedup_index.store import EmbeddingStore
    x = np.random.default_rng(0).standard_normal((3000, 512)).astype(np.float32)
    with EmbeddingStore.create(sys.argv[1], 512) as s:  # default shard_rows: 512 MiB cap
        for a in range(0, 3000, 1000):
            s.append(x[a : a + 1000], [f"k{r}" for r in range(a, a + 1000)])
    with EmbeddingStore.open(sys.argv[1]) as s:
        assert s.verify()["rows"] == 3000 and s.keys()[-1] == "k2999"
        print(len(s), s.nbytes_on_disk)
    """
)


def test_a_small_store_works_under_a_64mb_file_size_limit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", GROW_CHILD, str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows, nbytes = map(int, done.stdout.split())
    assert rows == 3000
    assert nbytes < 3000 * 512 * 4 + (1 << 20)  # 6 MB of rows take 6 MB, not 512 MiB
    assert (tmp_path / "s" / shard_name(0)).stat().st_size == 3000 * 512 * 4


def test_index_verify_checks_a_version_1_index_store_block_by_block(tmp_path):
    """``dedup-index index verify`` covers everything an index stores: in a version-1 index
    that includes its embedding store, which the manifest lists without a checksum."""
    from dedup_index.index import DedupIndex, IndexCorruptError

    root = tmp_path / "i"
    write_version_1_index(root, unit(40, dim=16, seed=7), [f"k{r}" for r in range(40)], 0.99)
    with DedupIndex.open(root) as index:
        assert index.verify()["files"] == 3
    flip(root / "embeddings" / shard_name(0), 100)
    with DedupIndex.open(root) as index, pytest.raises(IndexCorruptError, match="embeddings"):
        index.verify()


def test_an_index_never_answers_from_a_damaged_rows_file(tmp_path):
    """The index's rows files are checked against their SHA-256 when first read (a query
    returned similarity 6.5e35 from one flipped byte; ``index verify`` alone caught it)."""
    from dedup_index.index import DedupIndex

    E = unit(50, dim=16, seed=3)
    path = tmp_path / "i"
    with DedupIndex.create(path, 16, 0.9) as index:
        index.add(E)
    with DedupIndex.open(path) as reader:  # undamaged: answers as before
        assert reader.query(E[-1:])[0][0][0] == "49"
    rows = sorted((path / "rows").glob("rows-*.npy"))[0]
    flip(rows, rows.stat().st_size - 5, bit=6)
    with DedupIndex.open(path) as reader:  # opening stays cheap: shape checks only
        with pytest.raises(StoreCorruptError, match=rf"{rows.name} is damaged"):
            reader.query(E[-1:])
    with DedupIndex.open(path, mode="a") as index, pytest.raises(StoreCorruptError):
        index.add(E[:1] * 2.0, keys=["new"])


def test_an_index_key_never_silently_becomes_another_key(tmp_path):
    """One flipped byte in an index's keys file ("img-12" -> "img-13", still valid JSON)."""
    from dedup_index.index import DedupIndex, IndexCorruptError

    E = unit(50, dim=16, seed=3)
    path = tmp_path / "i"
    with DedupIndex.create(path, 16, 0.9) as index:
        index.add(E, keys=[f"img-{r}" for r in range(50)])
    keys = sorted((path / "rows").glob("keys-*.json"))[0]
    flip(keys, keys.read_bytes().index(b'"img-12"') + 6, bit=0)
    with DedupIndex.open(path) as reader:
        with pytest.raises(IndexCorruptError, match=rf"{keys.name} fails its checksum"):
            reader.query(E[12:13])
        with pytest.raises(IndexCorruptError, match=keys.name):
            reader.verify()


# ------------------------------------------------ index rows: per-block checksums (issue 13)
def _index(path: Path, E: np.ndarray, **options) -> None:
    from dedup_index.index import DedupIndex

    with DedupIndex.create(path, E.shape[1], 0.99, **options) as index:
        index.add(E)


def _rows_file(path: Path) -> tuple[Path, int]:
    """The index's first rows file and the offset of its rows in the file."""
    rows = sorted((path / "rows").glob("rows-*.npy"))[0]
    arr = np.load(rows, mmap_mode="r")
    offset = int(arr.offset)
    del arr
    return rows, offset


def test_a_flipped_byte_in_an_index_row_block_fails_only_the_reads_that_touch_it(tmp_path):
    """400 rows of 8 KiB: blocks of 128 rows.  One flipped bit in row 200 (block 128-255):
    every read touching that block raises an error naming the file and rows, never a
    score; reads of the other blocks still answer (a query of an IVF index gathers only
    its candidates' rows)."""
    from dedup_index.index import DedupIndex, IndexCorruptError
    from dedup_index.store.blocks import hashed_bytes

    E = unit(400, seed=5)
    path = tmp_path / "i"
    _index(path, E, backend="ivf", backend_options={"nlist": 4, "nprobe": 1, "tail_rows": 0})
    rows, offset = _rows_file(path)
    flip(rows, offset + 200 * DIM * 4 + 7, bit=6)  # an exponent bit: a huge value
    damaged = rf"{rows.name} is damaged: the bytes of its rows 128-255 do not match"
    with DedupIndex.open(path) as reader:
        before = hashed_bytes()
        assert reader.query(E[5:6]) == [[("5", 1.0)]]  # block 0: answers
        assert hashed_bytes() - before == BLOCK * DIM * 4  # that block only was hashed
        np.testing.assert_array_equal(reader.embeddings(256, 400), E[256:])
        for read in (
            lambda: reader.query(E[200:201]),
            lambda: reader.embeddings(250, 260),
            lambda: reader.embeddings(),
        ):
            with pytest.raises(StoreCorruptError, match=damaged):
                read()
        with pytest.raises(IndexCorruptError, match=rows.name):
            reader.verify()
    with DedupIndex.open(path, mode="a") as index:
        with pytest.raises(StoreCorruptError, match=damaged):  # compact reads every row
            index.compact()
    # An exact index reads every row for each query: a damaged block fails all of them.
    exact = tmp_path / "exact"
    _index(exact, E)
    rows, offset = _rows_file(exact)
    flip(rows, offset + 200 * DIM * 4 + 7, bit=6)
    with DedupIndex.open(exact) as reader, pytest.raises(StoreCorruptError, match=damaged):
        reader.query(E[5:6])
    with DedupIndex.open(exact, mode="a") as index:
        with pytest.raises(StoreCorruptError, match=damaged):
            index.add(unit(3, seed=9), keys=["a", "b", "c"])
        assert len(index) == 400  # nothing was committed


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(row=st.integers(0, 299), byte=st.integers(0, DIM * 4 - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_in_index_rows_fails_its_block_and_only_its_block(
    tmp_path_factory, row, byte, bit
):
    from dedup_index.index import DedupIndex

    E = unit(300, seed=6)
    path = tmp_path_factory.mktemp("i") / "i"
    _index(path, E)
    rows, offset = _rows_file(path)
    flip(rows, offset + row * DIM * 4 + byte, bit)
    b = row // BLOCK
    with DedupIndex.open(path) as reader:
        with pytest.raises(StoreCorruptError, match=rows.name):
            reader.embeddings(row, row + 1)
        for other in {0, BLOCK, 2 * BLOCK} - {b * BLOCK}:
            stop = other + BLOCK
            np.testing.assert_array_equal(reader.embeddings(other, stop), E[other:stop])


def test_opening_and_stats_of_an_index_hash_none_of_its_rows(tmp_path):
    """The structural check that a big index opens fast: opening, ``stats`` (which checks
    keys, pairs and state) and a read of one row hash no row block but that row's."""
    from dedup_index.cli import main
    from dedup_index.index import DedupIndex
    from dedup_index.store.blocks import hashed_bytes

    E = unit(600, seed=8)
    path = tmp_path / "i"
    with DedupIndex.create(path, DIM, 0.99) as index:
        for a in range(0, 600, 200):
            index.add(E[a : a + 200])
    before = hashed_bytes()
    with DedupIndex.open(path) as reader:
        assert main(["index", "stats", str(path)]) == 0
        assert hashed_bytes() == before
        np.testing.assert_array_equal(reader.embeddings(450, 451), E[450:451])
        assert hashed_bytes() - before == BLOCK * DIM * 4
        reader.query(E[:2])  # an exact query reads, so checks, every block once
        once = hashed_bytes() - before
        assert once == 600 * DIM * 4
        reader.query(E[:2])
        assert hashed_bytes() - before == once  # checked blocks are never hashed again


def test_block_checksum_files_are_listed_checked_and_named(tmp_path):
    from dedup_index.index import DedupIndex, IndexCorruptError

    E = unit(200, seed=2)
    path = tmp_path / "i"
    _index(path, E)
    manifest = json.loads((path / MANIFEST).read_text())
    (entry,) = manifest["rows"]
    sums = path / entry["blocks"]
    assert entry["blocks"] in manifest["checksums"]
    record = json.loads(sums.read_text())
    assert (record["count"], record["block_rows"], len(record["sha256"])) == (200, BLOCK, 2)
    flip(sums, sums.read_bytes().index(b'"sha256"') + 20)
    with pytest.raises(IndexCorruptError, match=rf"{sums.name} is damaged"):
        DedupIndex.open(path)


def _strip_block_files(path: Path) -> None:
    """Make the index look as one written before block-checksum files (whole-file
    SHA-256 of each rows file only)."""
    from dedup_index.files import write_json_atomic

    manifest = json.loads((path / MANIFEST).read_text())
    for entry in manifest["rows"]:
        name = entry.pop("blocks")
        del manifest["checksums"][name]
        (path / name).unlink()
    write_json_atomic(path / MANIFEST, manifest)


def test_an_index_written_before_block_files_is_still_checked_whole_and_compacted_to_blocks(
    tmp_path,
):
    from dedup_index.index import DedupIndex
    from dedup_index.store.blocks import hashed_bytes

    E = unit(300, seed=4)
    path = tmp_path / "i"
    _index(path, E)
    _strip_block_files(path)
    with DedupIndex.open(path) as reader:  # the old form reads and answers as before
        assert reader.query(E[7:8])[0][0] == ("7", 1.0)
    rows, offset = _rows_file(path)
    flip(rows, offset + 290 * DIM * 4 + 3, bit=6)
    with DedupIndex.open(path) as reader:
        with pytest.raises(StoreCorruptError, match=rf"{rows.name} is damaged: its SHA-256"):
            reader.embeddings(0, 1)  # the whole file is checked, whichever row is read
    flip(rows, offset + 290 * DIM * 4 + 3, bit=6)  # repaired
    with DedupIndex.open(path, mode="a") as index:
        index.compact(retain_seconds=0)
    manifest = json.loads((path / MANIFEST).read_text())
    (entry,) = manifest["rows"]
    assert entry["blocks"] in manifest["checksums"]  # compact writes the new form
    before = hashed_bytes()
    with DedupIndex.open(path) as reader:
        np.testing.assert_array_equal(reader.embeddings(0, 1), E[:1])
        assert hashed_bytes() - before == BLOCK * DIM * 4


def test_a_missing_block_file_falls_back_to_the_whole_file_check(tmp_path, caplog):
    """A block file an older dedup_index deleted (it did not list it): the rows are still
    never read unchecked, and ``index verify`` names the missing file."""
    from dedup_index.index import DedupIndex, IndexCorruptError

    E = unit(100, seed=1)
    path = tmp_path / "i"
    _index(path, E)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / manifest["rows"][0]["blocks"]).unlink()
    rows, offset = _rows_file(path)
    with caplog.at_level(logging.WARNING), DedupIndex.open(path) as reader:
        np.testing.assert_array_equal(reader.embeddings(0, 100), E)
        with pytest.raises(IndexCorruptError, match=r"blocks\.json is missing"):
            reader.verify()
    assert "checked whole on its first read" in caplog.text
    flip(rows, offset + 5)
    with DedupIndex.open(path) as reader, pytest.raises(StoreCorruptError, match=rows.name):
        reader.embeddings(99, 100)


@pytest.mark.parametrize("which", ["keys", "pairs"])
def test_index_stats_exits_nonzero_naming_a_damaged_keys_or_pairs_file(tmp_path, capsys, which):
    from dedup_index.cli import main
    from dedup_index.index import DedupIndex

    E = unit(60, dim=16, seed=3)
    E[30] = E[3]  # one pair, so the pair part holds a row
    path = tmp_path / "i"

    with DedupIndex.create(path, 16, 0.99) as index:
        index.add(E, keys=[f"img-{r}" for r in range(60)])
    assert main(["index", "stats", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 60 and out["checked"]["files"] >= 4
    assert "row blocks are verified when read" in out["checked"]["rows"]
    assert "index verify" in out["checked"]["rows"]
    pattern = {"keys": "keys-*.json", "pairs": "part-*.parquet"}[which]
    target = sorted(path.rglob(pattern))[0]
    flip(target, target.stat().st_size // 2)
    assert main(["index", "stats", str(path)]) == 1
    err = capsys.readouterr().err
    assert target.name in err and "checksum" in err


def test_a_scan_checks_ahead_but_only_reads_of_a_damaged_block_fail(tmp_path):
    """A range read of many unchecked blocks (an exact search's tile) also checks the
    blocks after it (hashing in long stretches, not between GEMM tiles); a damaged block
    met ahead is left unchecked, so the scan that did not ask for it still answers."""
    from dedup_index.store.blocks import SCAN_BLOCKS, hashed_bytes
    from dedup_index.store.segments import blocks_name, open_rows_file, write_rows_segment

    E = unit(16 * BLOCK, seed=11)
    sums = write_rows_segment(tmp_path, "rows.npy", E)
    arr = np.load(tmp_path / "rows.npy", mmap_mode="r")
    offset = int(arr.offset)
    del arr
    bad = SCAN_BLOCKS + 3
    flip(tmp_path / "rows.npy", offset + (bad * BLOCK + 5) * DIM * 4 + 1)
    rows = open_rows_file(
        tmp_path / "rows.npy",
        len(E),
        DIM,
        blocks=tmp_path / blocks_name("rows.npy"),
        blocks_sha256=sums[blocks_name("rows.npy")],
    )
    before = hashed_bytes()
    np.testing.assert_array_equal(rows[: SCAN_BLOCKS * BLOCK], E[: SCAN_BLOCKS * BLOCK])
    assert hashed_bytes() - before == (bad + 1) * BLOCK * DIM * 4  # ahead up to the damage
    np.testing.assert_array_equal(rows[(bad - 1) * BLOCK], E[(bad - 1) * BLOCK])
    assert hashed_bytes() - before == (bad + 1) * BLOCK * DIM * 4  # checked ahead: no rehash
    lo, hi = bad * BLOCK, (bad + 1) * BLOCK - 1
    with pytest.raises(StoreCorruptError, match=rf"rows\.npy is damaged: .*rows {lo}-{hi}"):
        rows[[0, bad * BLOCK + 100]]
    np.testing.assert_array_equal(rows[(bad + 1) * BLOCK :], E[(bad + 1) * BLOCK :])
