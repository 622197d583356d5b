"""An index built from an on-disk store in bounded batches (``DedupIndex.add_store``),
float16 rows and IVF lists, FAISS segments memory-mapped from disk (issue 15 item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.index import DedupIndex, core
from dedup_index.index import ann as ann_module
from dedup_index.store import EmbeddingStore

IVF = {"nlist": 8, "nprobe": 64, "tail_rows": 16}  # exhaustive: every list probed


def unit_rows(n: int, d: int, seed: int = 0, copies: float = 0.25) -> np.ndarray:
    """Random unit rows with a share of noisy near-copies (pairs at 0.95)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    k = int(copies * n)
    near = base[rng.choice(n, k)] + rng.uniform(0.01, 0.2) * rng.standard_normal((k, d))
    E = np.concatenate([base, near])[rng.permutation(n + k)]
    return (E / np.linalg.norm(E, axis=1, keepdims=True)).astype(np.float32)


def float16_store(path, E: np.ndarray, keys: list[str] | None = None) -> EmbeddingStore:
    store = EmbeddingStore.create(path, E.shape[1], dtype="float16")
    store.append(E, keys=keys)
    store.close()
    return EmbeddingStore.open(path)


@pytest.fixture
def mapped(monkeypatch):
    """Every FAISS segment file memory-mapped (the 10M path at test size)."""
    monkeypatch.setattr(core, "MMAP_BYTES", 1)
    monkeypatch.setattr(ann_module, "MMAP_BYTES", 1)


@pytest.mark.parametrize("backend, options", [("blocked", {}), ("ivf", IVF)])
@pytest.mark.parametrize("mmap", [False, True])
def test_an_index_built_from_a_float16_store_equals_the_in_memory_index(
    tmp_path, monkeypatch, backend, options, mmap
):
    """Batches from a float16 store give the pairs, decisions and scores of one ``add``
    of the same rows in memory, and of the dense oracle on the rows the index stores;
    the index keeps float16 rows (and float16 IVF lists), and a reopened index, its
    segments memory-mapped or not, answers the same."""
    if mmap:
        monkeypatch.setattr(core, "MMAP_BYTES", 1)
        monkeypatch.setattr(ann_module, "MMAP_BYTES", 1)
    monkeypatch.setattr(core, "ANN_BULK_ROWS", 200)  # bulk IVF adds at test size
    E = unit_rows(1200, 32)
    keys = [f"img-{r}" for r in range(len(E))]
    store = float16_store(tmp_path / "s", E, keys)
    E16 = store.to_array()  # the store's rows, as float32
    assert np.array_equal(E16, E.astype(np.float16).astype(np.float32))
    threshold = 0.95
    kwargs = dict(backend=backend, dtype="float16", backend_options=options)
    with DedupIndex.create(tmp_path / "a", 32, threshold, **kwargs) as built:
        done = built.add_store(store, batch_rows=350)
        assert done["rows"] == len(E) and done["batches"] == 5
        assert built.keys() == keys
        got = built.pairs(), built.decisions()
        assert built.stats()["dtype"] == "float16"
        S = built.embeddings()  # the add's unit rows, rounded to float16 as stored
        assert np.array_equal(S, S.astype(np.float16).astype(np.float32))
        if backend == "ivf":
            segments = built._view.ann.segments
            assert len(segments) == 5
            assert all(ann_module.is_fp16(s.index) for s in segments)
            assert all((s.path is not None) == mmap for s in segments)
    with DedupIndex.create(tmp_path / "b", 32, threshold, **kwargs) as whole:
        whole.add(E16, keys=keys)
        one = whole.pairs(), whole.decisions()
        assert np.array_equal(whole.embeddings(), S)
    ref = dedup_embeddings(S, threshold, backend="dense", normalize=False)
    for pairs, state in (got, one):
        assert pairs.equals(ref.pairs)
        assert np.array_equal(state["keep"], ref.keep)
        assert np.array_equal(state["duplicate_of"], ref.duplicate_of)
    if backend == "blocked":  # exact: every nearest score too
        assert np.array_equal(got[1]["nearest"], one[1]["nearest"])
        assert np.array_equal(got[1]["nearest"], ref.max_similarity)
    with DedupIndex.open(tmp_path / "a") as reader:
        assert reader.pairs().equals(ref.pairs)
        hits = reader.query(S[:50])
        assert len(ref.pairs) > 20
        for q, found in enumerate(hits):
            want = {keys[j] for i, j in zip(ref.pairs.i, ref.pairs.j, strict=True) if i == q}
            want |= {keys[i] for i, j in zip(ref.pairs.i, ref.pairs.j, strict=True) if j == q}
            assert {k for k, _ in found} - {keys[q]} == want


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    batch_rows=st.integers(20, 400),
    start=st.integers(0, 300),
    backend=st.sampled_from(["blocked", "ivf"]),
)
def test_add_store_in_any_batches_equals_the_oracle(
    tmp_path_factory, mapped, seed, batch_rows, start, backend
):
    """Whatever the batch size, and after rows added by hand first (a resumed build:
    ``start=len(index)``), the index equals dense one-shot dedup of the rows it stores
    (the store's, as :meth:`DedupIndex.add` takes them: unit, rounded to float16)."""
    E = unit_rows(300, 16, seed=seed)
    n = len(E)
    start = min(start, n)
    root = tmp_path_factory.mktemp("st")
    store = float16_store(root / "s", E)
    with DedupIndex.create(
        root / "i", 16, 0.95, backend=backend, dtype="float16", backend_options=IVF
    ) as index:
        if start:
            index.add(store[:start])
        index.add_store(store, batch_rows=batch_rows, start=len(index))
        assert len(index) == n
        S = index.embeddings()
        ref = dedup_embeddings(S, 0.95, backend="dense", normalize=False)
        assert index.pairs().equals(ref.pairs)
        assert np.array_equal(index.decisions()["keep"], ref.keep)


def test_add_store_validates_its_arguments(tmp_path):
    E = unit_rows(40, 8)
    store = float16_store(tmp_path / "s", E)
    with DedupIndex.create(tmp_path / "i", 8, 0.95) as index:
        with pytest.raises(ValueError, match="batch_rows must be an integer >= 1, got 0"):
            index.add_store(store, batch_rows=0)
        with pytest.raises(ValueError, match=r"start=10, stop=5: need 0 <= start <= stop <= 50"):
            index.add_store(store, start=10, stop=5)
        with pytest.raises(ValueError, match="holds 8-dimensional embeddings; the store holds 4"):
            index.add_store(np.zeros((3, 4), np.float32))
        with pytest.raises(ValueError, match="an EmbeddingStore, its path, or an"):
            index.add_store([1, 2, 3])
        assert index.add_store(tmp_path / "s", stop=20)["rows"] == 20  # a path, a range
        assert len(index) == 20
    with DedupIndex.open(tmp_path / "i") as reader:
        with pytest.raises(Exception, match="read-only"):
            reader.add_store(store)


def test_mapped_segments_read_lists_with_pread_as_faiss_holds_them(tmp_path, mapped):
    """A memory-mapped segment's lists read with ``pread`` are, row for row and label
    for label, what FAISS holds (float16 and float32 lists), and FAISS's own range
    search on the mapped segment finds what the in-memory one finds."""
    import faiss

    E = unit_rows(2000, 32)
    for dtype in ("float16", "float32"):
        empty = ann_module.AnnIndex("ivf", {"nlist": 16, "nprobe": 16}, dtype=dtype)
        rows = E.astype(dtype).astype(np.float32)
        index = empty.build_segment(rows, fresh=True)
        assert ann_module.is_fp16(index) == (dtype == "float16")
        path = tmp_path / f"seg-{dtype}.faiss"
        empty.write_segment(path, index)
        loaded, where = empty.read_segment(path)
        assert where == str(path)
        with ann_module.ListReader(loaded, where) as reader:
            for lst in range(index.nlist):
                v0, i0 = ann_module.read_list(index, lst)
                v1, i1 = reader.read(lst)
                assert np.array_equal(i0, i1) and np.array_equal(v0, v1)
                assert np.array_equal(v1, rows[i1])  # the codes are the rows themselves
                assert ann_module.read_list(loaded, lst, path)[1].shape == i1.shape
        loaded.nprobe = index.nprobe = 16
        a = index.range_search(rows[:20], 0.9)
        b = loaded.range_search(rows[:20], 0.9)
        assert np.array_equal(a[0], b[0]) and np.array_equal(np.sort(a[2]), np.sort(b[2]))
        assert isinstance(
            faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded).invlists),
            faiss.OnDiskInvertedLists,
        )


def store_build_peak(root, n: int, d: int = 512, batch: int = 4096) -> int:
    """Python-side peak memory (numpy arrays included: tracemalloc) of building a
    float16 IVF index from a float16 store of ``n`` random unit rows."""
    rng = np.random.default_rng(n)
    store = EmbeddingStore.create(root / "s", d, dtype="float16")
    for a in range(0, n, 8192):
        x = rng.standard_normal((min(8192, n - a), d)).astype(np.float32)
        store.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    store.close()
    store = EmbeddingStore.open(root / "s")
    options = {"nlist": 32, "nprobe": 4, "tail_rows": 0}
    with DedupIndex.create(
        root / "i", d, 0.9, backend="ivf", dtype="float16", backend_options=options
    ) as index:
        tracemalloc.start()
        try:
            index.add_store(store, batch_rows=batch)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(index) == n
        assert all(s.path is not None for s in index._view.ann.segments)
    return peak


@pytest.mark.slow
def test_add_store_memory_is_bounded_by_the_batch_not_the_store(tmp_path, mapped):
    """Building from a store three times larger raises the peak memory by a small part
    of the extra rows' float32 size (only the per-row state and keys grow with N): rows
    are read a batch at a time and the FAISS lists live in memory-mapped segment files
    (their pages are the kernel's page cache, outside the process's allocations)."""
    small, large, d = 12_288, 36_864, 512
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p_small = store_build_peak(tmp_path / "a", small, d)
    p_large = store_build_peak(tmp_path / "b", large, d)
    extra = (large - small) * d * 4  # 50 MB
    assert p_large - p_small < extra / 4, (p_small, p_large, extra)


CHILD = textwrap.dedent(
    """
    import sys
    from dedup_index.index import DedupIndex
    from dedup_index.index import ann, core
    core.MMAP_BYTES = ann.MMAP_BYTES = 1
    with DedupIndex.open(sys.argv[1], mode="a") as index:
        index.add_store(sys.argv[2], batch_rows=70, start=len(index))
    """
)


@pytest.mark.parametrize(
    "point, committed",
    [("rows_appended:3", 140), ("ann_written:2", 70), ("manifest_written:3", 210)],
)
def test_a_killed_store_build_keeps_its_committed_batches_and_resumes(tmp_path, point, committed):
    """A build killed in its third batch leaves the batches committed before it
    readable; the next writer goes on from ``len(index)`` and ends at the oracle."""
    E = unit_rows(240, 16, seed=3)
    float16_store(tmp_path / "s", E)
    options = dict(IVF, tail_rows=0)
    DedupIndex.create(
        tmp_path / "i", 16, 0.95, backend="ivf", dtype="float16", backend_options=options
    ).close()
    args = [sys.executable, "-c", CHILD, str(tmp_path / "i"), str(tmp_path / "s")]
    env = dict(os.environ, DEDUP_INDEX_CRASH_AT=point)
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 77, done.stderr
    with DedupIndex.open(tmp_path / "i") as reader:
        n = len(reader)
        assert n == committed
        ref = dedup_embeddings(reader.embeddings(), 0.95, backend="dense", normalize=False)
        assert reader.pairs().equals(ref.pairs)
        assert np.array_equal(reader.decisions()["keep"], ref.keep)
        assert reader.verify()["files"] > 0
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with DedupIndex.open(tmp_path / "i") as reader:
        assert len(reader) == len(E)
        ref = dedup_embeddings(reader.embeddings(), 0.95, backend="dense", normalize=False)
        assert reader.pairs().equals(ref.pairs)
        assert np.array_equal(reader.decisions()["keep"], ref.keep)
        assert reader.keys() == [str(r) for r in range(len(E))]


def rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_release_pages_drops_what_reads_mapped_and_keeps_the_rows(tmp_path):
    """Rows read through an index's memory maps stay in the process's RSS while the map
    lives; ``SegmentedRows.release_pages`` (called between ``add_store`` batches) maps
    the files again: the RSS falls back, the rows read the same, checked blocks stay
    checked."""
    from dedup_index.store import SegmentedRows, open_rows_file, write_rows_segment

    n, d = 32_768, 512  # 32 MiB of float16 per file
    rng = np.random.default_rng(0)
    names = []
    for k in range(2):
        rows = rng.standard_normal((n, d)).astype(np.float16)
        sums = write_rows_segment(tmp_path, f"rows-{k}.npy", rows, "float16")
        names.append((f"rows-{k}.npy", sums))
    parts = [
        open_rows_file(
            tmp_path / name,
            n,
            d,
            sums[name],
            blocks=tmp_path / name.replace(".npy", ".blocks.json"),
            blocks_sha256=sums[name.replace(".npy", ".blocks.json")],
        )
        for name, sums in names
    ]
    rows = SegmentedRows(parts, d)
    before = rss_file_bytes()
    first = rows[rng.integers(0, 2 * n, 20_000)].sum() + rows[0 : 2 * n : 7].sum()
    grown = rss_file_bytes() - before
    assert grown > 32 << 20  # most of both files mapped in
    rows.release_pages()
    assert rss_file_bytes() - before < grown / 4
    again = rows[rng.integers(0, 2 * n, 10)]
    assert np.isfinite(first) and again.shape == (10, d)
    assert np.array_equal(rows[5:9], np.concatenate([parts[0][5:9]]))
    assert all(p._checked.all() for p in parts)  # nothing hashed twice


ONE_PASS_CHILD = textwrap.dedent(
    """
    import sys
    from dedup_index.index import DedupIndex, core
    core.ONE_PASS_SEGMENT_ROWS = 1000
    with DedupIndex.open(sys.argv[1], mode="a") as index:
        index.add_store(sys.argv[2], one_pass=True)
    """
)


def _one_pass_index(tmp_path, monkeypatch, n: int = 4000, d: int = 32):
    monkeypatch.setattr(core, "ONE_PASS_SEGMENT_ROWS", 1500)  # several segments
    monkeypatch.setattr(core, "ONE_PASS_MAPPED_BYTES", 1 << 16)  # pages dropped often
    E = unit_rows(n, d, seed=4)
    keys = [f"img-{r}" for r in range(len(E))]
    store = float16_store(tmp_path / "s", E, keys)
    index = DedupIndex.create(
        tmp_path / "i", d, 0.95, backend="ivf", dtype="float16", backend_options={"nprobe": 8}
    )
    return index, store, keys


def test_a_one_pass_store_build_finds_the_pairs_and_takes_adds(tmp_path, monkeypatch):
    """``add_store(one_pass=True)``: rows stored as ``add`` stores them, in several rows
    files and float16 FAISS segments on the partitioning's centroids; every pair exact,
    recall >= 0.99 of the oracle's, decisions those of the policy on the pairs found;
    a reopened index answers queries and takes an add whose new pairs are found."""
    from dedup_index.policy import decide
    from dedup_index.search import as_unit_float32
    from dedup_index.search.recall import exact_pairs_of_rows

    index, store, keys = _one_pass_index(tmp_path, monkeypatch)
    n = len(keys)
    with index:
        done = index.add_store(store, one_pass=True)
        assert done["rows"] == n and done["batches"] == 1
        assert index.keys() == keys and len(index) == n
        S = index.embeddings()
        want = as_unit_float32(store.to_array()).astype(np.float16).astype(np.float32)
        assert np.array_equal(S, want)  # as add() stores them
        segments = index._view.ann.segments
        spans = [(a, min(n, a + 1500)) for a in range(0, n, 1500)]
        assert [(s.start, s.stop) for s in segments] == spans and len(spans) == 4
        assert all(ann_module.is_fp16(s.index) for s in segments)
        assert len({s.index.nlist for s in segments}) == 1 and segments[0].index.nlist > 8
        pairs, state = index.pairs(), index.decisions()
    ref = dedup_embeddings(S, 0.95, backend="dense", normalize=False)
    truth = {(i, j): s for i, j, s in zip(ref.pairs.i, ref.pairs.j, ref.pairs.s, strict=True)}
    found = list(zip(pairs.i.tolist(), pairs.j.tolist(), pairs.s.tolist(), strict=True))
    assert len(truth) > 300 and all(truth[(i, j)] == s for i, j, s in found)
    assert len(found) >= 0.99 * len(truth)
    decided = decide(n, pairs, "reference")
    assert np.array_equal(state["keep"], decided.keep)
    assert np.array_equal(state["duplicate_of"], decided.duplicate_of)
    with DedupIndex.open(tmp_path / "i", mode="a") as again:
        assert again.pairs().equals(pairs)
        hits = again.query(S[:40])
        assert all(keys[q] in {k for k, _ in h} for q, h in enumerate(hits))
        rng = np.random.default_rng(9)
        new = S[rng.choice(n, 300, replace=False)] + 0.01 * rng.standard_normal((300, 32))
        again.add(new.astype(np.float32), keys=[f"new-{r}" for r in range(300)])
        rows = again._view.rows
        exact = exact_pairs_of_rows(rows, 0.95, np.arange(n, n + 300))
        got = set(zip(again.pairs().i.tolist(), again.pairs().j.tolist(), strict=True))
        want_new = set(zip(exact.i.tolist(), exact.j.tolist(), strict=True))
        assert len(want_new) >= 300 and len(got & want_new) >= 0.99 * len(want_new)


def test_a_killed_one_pass_build_leaves_an_empty_index_and_runs_again(tmp_path, monkeypatch):
    """Nothing is committed before the end: killed after its pairs or its segments, the
    index reads as empty (its files unlisted), and the next build completes."""
    index, store, keys = _one_pass_index(tmp_path, monkeypatch, n=1600)
    index.close()
    args = [sys.executable, "-c", ONE_PASS_CHILD, str(tmp_path / "i"), str(tmp_path / "s")]
    for point in ("pairs_written", "ann_written"):
        env = dict(os.environ, DEDUP_INDEX_CRASH_AT=point)
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        assert done.returncode == 77, done.stderr
        with DedupIndex.open(tmp_path / "i") as reader:
            assert len(reader) == 0 and reader.generation == 0
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with DedupIndex.open(tmp_path / "i") as reader:
        assert reader.keys() == keys and len(reader._view.ann.segments) == 2


def test_segmented_rows_release_their_maps_as_reads_add_up(tmp_path):
    """``SegmentedRows(release_after=)``: reads count what they may have mapped, and past
    the bound each part is mapped again (its pages leave the RSS), part by part within
    one gather; the rows read are the same; without the bound the maps are kept."""
    from dedup_index.store import SegmentedRows, open_rows_file, write_rows_segment
    from dedup_index.store.segments import blocks_name

    E = unit_rows(240, 16, seed=2, copies=0.0)
    parts = []
    for k in range(3):
        name = f"rows-{k}.npy"
        sums = write_rows_segment(tmp_path, name, E[80 * k : 80 * (k + 1)], "float16")
        parts.append(
            open_rows_file(
                tmp_path / name,
                80,
                16,
                sums[name],
                blocks=tmp_path / blocks_name(name),
                blocks_sha256=sums[blocks_name(name)],
            )
        )
    want = E.astype(np.float16).astype(np.float32)
    kept = SegmentedRows(parts, 16)
    maps = [p._rows for p in parts]
    pick = np.array([3, 90, 170, 239])
    assert np.array_equal(kept[pick], want[pick])
    assert all(p._rows is m for p, m in zip(parts, maps, strict=True))
    bounded = SegmentedRows(parts, 16, release_after=1)
    assert np.array_equal(bounded[pick], want[pick])
    assert all(p._rows is not m for p, m in zip(parts, maps, strict=True))  # each remapped
    assert np.array_equal(bounded[10:200], want[10:200])


def test_segments_from_an_assignment_hold_each_row_once_in_its_list_and_probe_more_when_many():
    """``ivf_from_assignment`` (the one-pass build's segments, capacity reserved list by
    list) puts each row, as stored, in the list it was assigned; an index over many
    lists (a region-trained quantizer) probes twice the default lists unless told."""
    import faiss

    E = unit_rows(3000, 16)
    centroids = unit_rows(40, 16, seed=9)[:40]
    lists = np.argmax(E @ centroids.T, axis=1)
    quantizer = faiss.IndexFlatIP(16)
    quantizer.add(centroids)
    index = ann_module.ivf_from_assignment(quantizer, E, lists, fp16=False, block=700)
    assert index.ntotal == len(E)
    for k in range(40):
        rows, labels = ann_module.read_list(index, k)
        assert np.array_equal(np.sort(labels), np.flatnonzero(lists == k))
        assert np.array_equal(rows, E[labels])
    assert ann_module.default_nprobe(2048) == ann_module.NPROBE
    assert ann_module.default_nprobe(ann_module.MANY_LISTS) == 2 * ann_module.NPROBE
    many = faiss.IndexFlatIP(4)
    many.add(unit_rows(ann_module.MANY_LISTS, 4)[: ann_module.MANY_LISTS])
    big = ann_module.new_ivf(many, 4, ann_module.MANY_LISTS, fp16=True)
    ann_module.AnnIndex("ivf", {})._configure(big)
    assert big.nprobe == 2 * ann_module.NPROBE
    ann_module.AnnIndex("ivf", {"nprobe": 5})._configure(big)
    assert big.nprobe == 5


@pytest.mark.parametrize("mmap", [False, True])
def test_loaded_segments_share_one_quantizer_and_answer_as_each_file_alone(
    tmp_path, monkeypatch, mmap
):
    """Each segment file holds the whole coarse quantizer; the loaded index keeps one
    copy (every segment searches the first's), and each segment answers a range search
    and a top-k search exactly as its file read on its own does."""
    import faiss

    if mmap:
        monkeypatch.setattr(core, "MMAP_BYTES", 1)
        monkeypatch.setattr(ann_module, "MMAP_BYTES", 1)
    index, store, keys = _one_pass_index(tmp_path, monkeypatch)
    with index:
        index.add_store(store, one_pass=True)
        built = index._view.ann.segments
    with DedupIndex.open(tmp_path / "i") as reader:
        segments = reader._view.ann.segments
        for view_segments in (built, segments):
            pointers = {int(faiss.extract_index_ivf(s.index).quantizer.this) for s in view_segments}
            assert len(view_segments) == 4 and len(pointers) == 1  # 5000 rows, 1500 a segment
        queries = reader.embeddings(0, 300)
        files = [e["file"] for e in reader._manifest["ann"]]
        for seg, name in zip(segments, files, strict=True):
            alone = faiss.read_index(str(tmp_path / "i" / name))
            alone.nprobe = seg.index.nprobe = 8
            lims, dist, labels = seg.index.range_search(queries, 0.9)
            want = alone.range_search(queries, 0.9)
            assert np.array_equal(lims, want[0]) and np.array_equal(labels, want[2])
            assert np.array_equal(dist, want[1])
            assert all(
                np.array_equal(a, b)
                for a, b in zip(seg.index.search(queries, 5), alone.search(queries, 5), strict=True)
            )
        assert all(keys[q] in {k for k, _ in h} for q, h in enumerate(reader.query(queries[:50])))


def test_a_segment_checked_once_is_known_by_its_stat_and_a_changed_one_hashed_again(
    tmp_path, monkeypatch, mapped
):
    """Memory-mapped FAISS segments are hashed at their first open and then known by
    their stat (``checked.json``): a later open hashes none and answers the same; a
    flipped byte under the same size and mtime (``os.utime`` set back: the ctime still
    moves) is hashed again and refused; a file checked right after it was written is
    not remembered (coarse timestamps); a damaged record is ignored and rewritten."""
    import json
    import time

    from dedup_index import files

    hashed = []
    sha256_file = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    index, store, keys = _one_pass_index(tmp_path, monkeypatch)
    with index:
        index.add_store(store, one_pass=True)
    path, record = tmp_path / "i", tmp_path / "i" / files.CHECKED_FILE
    queries = store.to_array()[:50]

    def opened() -> tuple[int, list]:
        hashed.clear()
        with DedupIndex.open(path) as reader:
            return len(hashed), reader.query(queries)

    n_hashed, want = opened()  # written < CHECKED_AFTER_NS ago: hashed, not remembered
    assert n_hashed == 4 and not record.exists()
    assert opened()[0] == 4
    monkeypatch.setattr(files, "CHECKED_AFTER_NS", 0)
    time.sleep(0.05)  # past the file system's timestamp tick
    assert opened() == (4, want)
    assert sorted(json.loads(record.read_text())["files"]) == [
        e["file"] for e in json.loads((path / "manifest.json").read_text())["ann"]
    ]
    assert opened() == (0, want)  # known by their stat: none read again
    record.write_text("{not json")
    assert opened() == (4, want) and len(json.loads(record.read_text())["files"]) == 4
    segment = path / json.loads((path / "manifest.json").read_text())["ann"][1]["file"]
    st = segment.stat()
    time.sleep(0.05)
    with open(segment, "r+b") as f:  # one byte of the lists, size and mtime kept
        f.seek(st.st_size // 2)
        byte = f.read(1)[0]
        f.seek(st.st_size // 2)
        f.write(bytes([byte ^ 1]))
    os.utime(segment, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert segment.stat().st_mtime_ns == st.st_mtime_ns and segment.stat().st_size == st.st_size
    with pytest.raises(core.IndexCorruptError, match=f"{segment.name} fails its checksum"):
        DedupIndex.open(path)
