"""The persistent index's append-only layout: adds write new files only, ``compact``
merges them in one commit, kills at any point lose nothing committed, readers see one
committed generation at a time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_version_1_index
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.index import DedupIndex, IndexCorruptError

IVF = {"nlist": 4, "nprobe": 64, "tail_rows": 8}  # exhaustive: every list probed


def files_of(root: Path) -> dict[str, tuple[int, str]]:
    """Every file but the manifest and the lock: (inode, SHA-256)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and p.name not in ("manifest.json", ".lock"):
            out[str(p.relative_to(root))] = (
                p.stat().st_ino,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    copies = base[rng.choice(n, n // 5)] + 0.002 * rng.standard_normal((n // 5, d))
    E = np.concatenate([base, copies])[rng.permutation(n + n // 5)]
    return (E / np.linalg.norm(E, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "backend, options", [("blocked", {}), ("ivf", IVF), ("hnsw", {"tail_rows": 8})]
)
def test_add_writes_new_files_only_and_compact_merges(tmp_path, backend, options):
    E = data()
    keys = [f"k{r}" for r in range(len(E))]
    cuts = [0, 100, 105, 200, 290, len(E)]
    index = DedupIndex.create(tmp_path / "i", 16, 0.99, backend=backend, backend_options=options)
    before = {}
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        index.add(E[a:b], keys=keys[a:b])
        after = files_of(tmp_path / "i")
        assert all(after[name] == v for name, v in before.items())  # untouched
        before = after
    stats = index.stats()
    assert stats["row_files"] == 5 and stats["state_files"] >= 2
    if backend != "blocked":
        assert stats["ann_segments"] >= 2 and stats["ann_tail_rows"] <= 8
    expected = dedup_embeddings(E, 0.99, backend="dense")
    decisions = index.decisions()
    hits = index.query(E[:20])
    assert np.array_equal(decisions["keep"], expected.keep)
    if backend != "hnsw":
        assert index.pairs().equals(expected.pairs)

    old_files = set(files_of(tmp_path / "i"))
    stats = index.compact()
    assert (stats["row_files"], stats["state_files"]) == (1, 1)
    if backend == "ivf":
        assert stats["ann_segments"] == 1 and stats["ann_tail_rows"] == 0
        assert stats["nlist"] == 4  # backend_options fix it; by default it grows
    after = index.decisions()
    for name in decisions:
        assert np.array_equal(after[name], decisions[name], equal_nan=True)
    assert index.query(E[:20]) == hits
    assert old_files <= set(files_of(tmp_path / "i"))  # retired, kept for readers
    index.close()
    with DedupIndex.open(tmp_path / "i") as reader:
        assert reader.query(E[:20]) == hits and len(reader) == len(E)
        assert reader.keys() == keys
    # Files retired with retain_seconds=0 go at the next commit; the others stay.
    compacted = set(files_of(tmp_path / "i")) - old_files
    with DedupIndex.open(tmp_path / "i", mode="a") as index:
        index.compact(retain_seconds=0)
        index.add(E[:1] * -1, keys=["flip"])
        left = set(files_of(tmp_path / "i"))
        assert not (compacted & left) and old_files <= left
        assert index.verify()["files"] >= 5


def test_compact_grows_nlist_and_keeps_answers(tmp_path):
    rng = np.random.default_rng(3)
    E = rng.standard_normal((3000, 16)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    with DedupIndex.create(
        tmp_path / "i", 16, 0.98, backend="ivf", backend_options={"tail_rows": 100}
    ) as index:
        index.add(E[:200])
        first = index.stats()["nlist"]
        for a in range(200, 3000, 400):
            index.add(E[a : a + 400])
        stats = index.compact()
        assert stats["nlist"] > first and stats["ann_segments"] == 1
        assert index.query(E[5])[0][0][0] == "5"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compact_writes_bounded_files_and_segments_on_one_quantizer(tmp_path, monkeypatch, dtype):
    """A compaction bounds its memory as a one-pass build does: rows and keys files of
    ``ONE_PASS_FILE_ROWS`` rows, FAISS segments of ``ONE_PASS_SEGMENT_ROWS`` on one
    retrained quantizer; the answers are those before it (every list probed)."""
    from dedup_index.index import core
    from dedup_index.search.flat import faiss_module

    monkeypatch.setattr(core, "ONE_PASS_FILE_ROWS", 100)
    monkeypatch.setattr(core, "ONE_PASS_SEGMENT_ROWS", 128)
    E = data(500)  # 600 rows
    keys = [f"k{r}" for r in range(len(E))]
    options = {"nprobe": 10_000, "tail_rows": 8}
    with DedupIndex.create(
        tmp_path / "i", 16, 0.99, backend="ivf", dtype=dtype, backend_options=options
    ) as index:
        for a in range(0, len(E), 150):
            index.add(E[a : a + 150], keys=keys[a : a + 150])
        decisions, pairs, hits = index.decisions(), index.pairs(), index.query(E[::7])
        done = []
        stats = index.compact(retain_seconds=0, progress=lambda a, n: done.append((a, n)))
        assert stats["row_files"] == 6 and stats["ann_segments"] == 5
        assert stats["ann_tail_rows"] == 0 and stats["nlist"] >= 8
        assert done == [(128, 600), (256, 600), (384, 600), (512, 600), (600, 600)]
        faiss = faiss_module()
        ivfs = [faiss.extract_index_ivf(s.index) for s in index._view.ann.segments]
        assert [s.ntotal for s in ivfs] == [128, 128, 128, 128, 88]
        assert len({int(s.quantizer.this) for s in ivfs}) == 1  # one copy of the centroids
        assert index.pairs().equals(pairs) and index.query(E[::7]) == hits
        for name in decisions:
            assert np.array_equal(index.decisions()[name], decisions[name], equal_nan=True)
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert [e["count"] for e in manifest["rows"]] == [100] * 6
    with DedupIndex.open(tmp_path / "i") as reader:
        assert reader.keys() == keys and reader.query(E[::7]) == hits
        assert reader.verify()["files"] >= 6 + 6 + 5
        if dtype == "float16":  # rows kept exactly as stored
            assert np.array_equal(reader._view.rows[:], E.astype(np.float16).astype(np.float32))


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from dedup_index.index import DedupIndex, core
    core.ONE_PASS_FILE_ROWS = core.ONE_PASS_SEGMENT_ROWS = 64  # a compaction in several files
    E = np.load(sys.argv[2])
    with DedupIndex.open(sys.argv[1], mode="a") as index:
        if sys.argv[3] == "add":
            index.add(E[150:], keys=[f"k{r}" for r in range(150, len(E))])
        else:
            index.compact()
    """
)
ADD_POINTS = ["rows_appended", "pairs_written", "ann_written", "state_written", "manifest_written"]
COMPACT_POINTS = [
    "compact_rows_written",
    "compact_pairs_written",
    "compact_ann_written",
    "state_written",
    "manifest_written",
]


@pytest.mark.parametrize(
    "action, point", [("add", p) for p in ADD_POINTS] + [("compact", p) for p in COMPACT_POINTS]
)
def test_killed_mid_add_or_compact_leaves_the_previous_version(tmp_path, action, point):
    E = data(200)
    np.save(tmp_path / "E.npy", E)
    keys = [f"k{r}" for r in range(len(E))]
    with DedupIndex.create(
        tmp_path / "i", 16, 0.99, backend="ivf", backend_options=dict(IVF, tail_rows=0)
    ) as index:
        index.add(E[:100], keys=keys[:100])
        index.add(E[100:150], keys=keys[100:150])
        before = index.decisions()
    env = dict(os.environ, DEDUP_INDEX_CRASH_AT=point)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "i"), str(tmp_path / "E.npy"), action],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 77, done.stderr
    committed = point == "manifest_written"
    with DedupIndex.open(tmp_path / "i") as reader:
        n = len(E) if committed and action == "add" else 150
        assert len(reader) == n
        state = reader.decisions()
        expected = dedup_embeddings(E[:n], 0.99, backend="dense")
        assert np.array_equal(state["keep"], expected.keep)
        assert reader.pairs().equals(expected.pairs)
        if n == 150:
            for name in before:
                assert np.array_equal(state[name], before[name], equal_nan=True)
        assert reader.verify()["files"] > 0
    with DedupIndex.open(tmp_path / "i", mode="a") as index:  # the next writer goes on
        if len(index) == 150:
            index.add(E[150:], keys=keys[150:])
        index.compact()
        expected = dedup_embeddings(E, 0.99, backend="dense")
        assert np.array_equal(index.decisions()["keep"], expected.keep)
        assert index.pairs().equals(expected.pairs)
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    listed = {e[f] for e in manifest["rows"] for f in ("file", "keys", "blocks") if e.get(f)}
    on_disk = {f"rows/{p.name}" for p in (tmp_path / "i" / "rows").iterdir()}
    retired = {f for r in manifest["retired"] for f in r["files"]}
    assert on_disk <= listed | retired  # what the killed writer left was cleaned up


def test_verify_names_a_damaged_rows_file(tmp_path):
    with DedupIndex.create(tmp_path / "i", 16, 0.99) as index:
        index.add(data(50))
        index.add(data(50, seed=1))
    rows = sorted((tmp_path / "i" / "rows").glob("rows-*.npy"))[0]
    payload = bytearray(rows.read_bytes())
    payload[-5] ^= 0xFF  # same size and header: only the checksum can tell
    rows.write_bytes(bytes(payload))
    with DedupIndex.open(tmp_path / "i") as reader:
        with pytest.raises(IndexCorruptError, match=rows.name):
            reader.verify()
    rows.write_bytes(bytes(payload[:200]))
    with pytest.raises(IndexCorruptError, match=rows.name):
        DedupIndex.open(tmp_path / "i")


READER = textwrap.dedent(
    """
    import json, os, sys, time, numpy as np
    from dedup_index.index import DedupIndex
    E = np.load(sys.argv[2])
    probe = E[[0, 1, 2, 160, 170, 190]]
    out = []
    deadline = time.time() + 300  # a backstop; the test says when the writer is gone
    reader = DedupIndex.open(sys.argv[1])
    while time.time() < deadline and not os.path.exists(sys.argv[3]):
        reader.refresh()
        hits = reader.query(probe)
        out.append([len(reader), reader.generation, [[k for k, _ in h] for h in hits]])
        if len(out) == 1:
            open(sys.argv[4], "w").close()  # answering: the writer may start
        time.sleep(0.002)
    print(json.dumps(out))
    """
)
WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from dedup_index.index import DedupIndex
    E = np.load(sys.argv[2])
    with DedupIndex.open(sys.argv[1], mode="a") as index:
        for a in range(100, len(E), 20):
            index.add(E[a : a + 20], keys=[f"k{r}" for r in range(a, a + 20)])
            time.sleep(0.05)
        index.compact(retain_seconds=0)  # killed at its commit point (crash hook)
    """
)


def test_readers_see_one_committed_version_while_a_writer_adds_and_is_killed(tmp_path):
    """A reader refreshing and querying in a loop while another process adds batches,
    compacts and is killed: every answer is the answer of one committed generation."""
    E = data(200)[:200]
    E[160:] = E[:40] + 0.001  # later rows copy early ones: answers change with each add
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    np.save(tmp_path / "E.npy", E)
    with DedupIndex.create(tmp_path / "i", 16, 0.99, backend="ivf", backend_options=IVF) as index:
        index.add(E[:100], keys=[f"k{r}" for r in range(100)])
    # The reader reads until the writer is gone (a file says so), not for a fixed time: on
    # a loaded machine the writer may not even start within seconds.
    stop, ready = tmp_path / "writer-gone", tmp_path / "reader-ready"
    paths = (tmp_path / "i", tmp_path / "E.npy", stop, ready)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, *map(str, paths)],
        stdout=subprocess.PIPE,
        text=True,
    )
    while not ready.exists() and reader.poll() is None:
        time.sleep(0.05)
    env = dict(os.environ, DEDUP_INDEX_CRASH_AT="compact_ann_written")
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, str(tmp_path / "i"), str(tmp_path / "E.npy")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert writer.returncode == 77, writer.stderr
    time.sleep(0.5)  # a last look at what the killed writer left
    stop.touch()
    out, _ = reader.communicate(timeout=120)
    answers = json.loads(out)
    probe = E[[0, 1, 2, 160, 170, 190]]
    seen = set()
    for n, generation, hits in answers:
        assert n in range(100, 201, 20)
        scores = E[:n].astype(np.float64) @ probe.astype(np.float64).T  # far from 0.99
        want = [sorted(f"k{r}" for r in np.flatnonzero(col >= 0.99)) for col in scores.T]
        assert [sorted(h) for h in hits] == want, (n, generation)
        seen.add(n)
    assert len(seen) >= 2  # the reader saw the writer's commits as they came


def test_cli_compact_and_verify(tmp_path):
    cli = str(Path(sys.executable).with_name("dedup-index"))

    def run(*argv):
        return subprocess.run([cli, *map(str, argv)], capture_output=True, text=True)

    np.save(tmp_path / "a.npy", data(40))
    np.save(tmp_path / "b.npy", data(40, seed=1))
    assert run("index", "create", tmp_path / "i", "--dim", 16, "--threshold", 0.99).returncode == 0
    assert run("index", "add", tmp_path / "i", tmp_path / "a.npy").returncode == 0
    assert run("index", "add", tmp_path / "i", tmp_path / "b.npy").returncode == 0
    done = run("index", "compact", tmp_path / "i")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["row_files"] == 1
    done = run("index", "verify", tmp_path / "i")
    assert done.returncode == 0 and json.loads(done.stdout)["files"] >= 4
    state = sorted((tmp_path / "i").glob("state-*.npz"))[-1]
    state.write_bytes(state.read_bytes()[:-3] + b"xyz")
    done = run("index", "verify", tmp_path / "i")
    assert done.returncode == 1 and state.name in done.stderr
    assert run("index", "compact", tmp_path / "i", "--nlist", 0).returncode == 2


def test_ivf_batch_gemm_path_finds_what_faiss_finds(tmp_path):
    """Batches on IVF segments run as GEMM tiles per list: the same lists probed, so the
    same pairs as FAISS's own scan (one query at a time), and nearest scores at least as
    high."""
    from dedup_index.index import ann as ann_module

    E = data(3000, d=32, seed=5)
    probe = E[:200] + 0.01 * np.random.default_rng(1).standard_normal((200, 32))
    probe = (probe / np.linalg.norm(probe, axis=1, keepdims=True)).astype(np.float32)
    options = {"nlist": 30, "nprobe": 3, "tail_rows": 0}
    with DedupIndex.create(tmp_path / "i", 32, 0.95, backend="ivf", backend_options=options) as ix:
        ix.add(E[:2000])
        ix.add(E[2000:])  # two segments sharing the quantizer
        view = ix._view
        batch = view.ann.search(probe, view.rows, 0.95, None, nearest=True)
        ann_module.GEMM_QUERIES, saved = 10**9, ann_module.GEMM_QUERIES
        try:
            one = view.ann.search(probe, view.rows, 0.95, None, nearest=True)
        finally:
            ann_module.GEMM_QUERIES = saved
    assert len(view.ann.segments) == 2 and len(batch.q) > 100
    assert set(zip(batch.q, batch.b, strict=True)) == set(zip(one.q, one.b, strict=True))
    assert np.all(batch.query_best >= one.query_best)


def test_a_version_1_index_is_read_and_upgraded_by_its_next_commit(tmp_path):
    """Format 1 (one embeddings/ store, one state file, FAISS file per generation) is
    read as it is; the next add writes version 2 files next to it."""
    E = data(100)
    keys = [f"k{r}" for r in range(len(E))]
    root = tmp_path / "i"
    write_version_1_index(root, E[:100], keys[:100], 0.99)
    with DedupIndex.open(root) as reader:
        assert reader.keys() == keys[:100] and reader.query(E[3])[0][0][0] == "k3"
    with DedupIndex.open(root, mode="a") as index:
        index.add(E[100:], keys=keys[100:])
        expected = dedup_embeddings(E, 0.99, backend="dense")
        assert np.array_equal(index.decisions()["keep"], expected.keep)
        assert index.pairs().equals(expected.pairs)
        index.compact(retain_seconds=0)
        index.add(E[:1] * -1, keys=["flip"])  # the commit after: the old store goes
    assert json.loads((root / "manifest.json").read_text())["version"] == 2
    assert not (root / "embeddings").exists()
    with DedupIndex.open(root) as reader:
        assert reader.keys()[:-1] == keys


def _batches(draw_seed: int, n: int, d: int):
    """Rows with planted near-copies (some across the base/batch boundary)."""
    rng = np.random.default_rng(draw_seed)
    base = rng.standard_normal((n, d))
    k = n // 4
    copies = base[rng.choice(n, k)] + rng.uniform(0.001, 0.3) * rng.standard_normal((k, d))
    E = np.concatenate([base, copies])[rng.permutation(n + k)]
    return (E / np.linalg.norm(E, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bulk_ivf_add_finds_the_batch_pairs_in_the_list_products(tmp_path, monkeypatch, seed):
    """A bulk add on an IVF index finds the batch's own pairs through the per-list
    products of its cross search (``AnnIndex.search_batch``), not a separate clustering.
    With every list probed that is exhaustive: decisions, pairs (same bits) and the new
    rows' max_similarity equal one-shot exact dedup of everything; and the FAISS segment
    the add writes is the one the search built (it holds exactly the batch)."""
    from dedup_index.index import core
    from dedup_index.index.ann import AnnIndex

    monkeypatch.setattr(core, "ANN_BULK_ROWS", 100)  # a bulk add at test size
    calls = []
    real = AnnIndex.search_batch

    def counted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(AnnIndex, "search_batch", counted)
    E = _batches(seed, 500, 16)
    threshold = 0.9
    options = {"nlist": 6, "nprobe": 64, "tail_rows": 16, "balance": False}
    path = tmp_path / "i"
    with DedupIndex.create(path, 16, threshold, backend="ivf", backend_options=options) as ix:
        ix.add(E[:90])  # below ANN_BULK_ROWS: exact (blocked); becomes the first segment
        ix.add(E[90:])  # 535 rows: through search_batch
        assert calls == [True]
        stats = ix.stats()
        assert stats["ann_segments"] == 2 and stats["ann_tail_rows"] == 0
        assert ix._view.ann.segments[1].index.ntotal == len(E) - 90
        got, keep, near = ix.pairs(), ix.decisions()["keep"], ix.max_similarity(ix.keys())
    ref = dedup_embeddings(E, threshold, backend="dense", normalize=False)
    assert got.equals(ref.pairs)
    assert np.array_equal(keep, ref.keep)
    # The new rows' nearest is exact (each one's near-best entries in every list); an old
    # row's is credited from the new rows' candidates only, a lower bound as before.
    assert np.array_equal(near[90:], ref.max_similarity[90:])
    assert np.all(near <= ref.max_similarity)


def test_bulk_ivf_add_recall_when_not_exhaustive(tmp_path, monkeypatch):
    """With a few lists probed of many, the batch's own pairs are found about as well as
    its pairs with the old rows (both sides of a pair probe), every score exact."""
    from dedup_index.index import core

    monkeypatch.setattr(core, "ANN_BULK_ROWS", 100)
    E = _batches(7, 4000, 32)
    threshold = 0.9
    options = {"nlist": 40, "nprobe": 4, "tail_rows": 16}
    path = tmp_path / "i"
    with DedupIndex.create(path, 32, threshold, backend="ivf", backend_options=options) as ix:
        ix.add(E[:3000])
        ix.add(E[3000:])
        got = ix.pairs()
    ref = dedup_embeddings(E, threshold, backend="dense", normalize=False).pairs
    want = set(zip(ref.i.tolist(), ref.j.tolist(), strict=True))
    found = dict(zip(zip(got.i.tolist(), got.j.tolist(), strict=True), got.s.tolist(), strict=True))
    assert set(found) <= want  # precision 1 ...
    exact = dict(zip(zip(ref.i.tolist(), ref.j.tolist(), strict=True), ref.s.tolist(), strict=True))
    assert all(found[p] == exact[p] for p in found)  # ... and canonical scores
    batch = {p for p in want if p[0] >= 3000}
    assert len(batch) > 50
    assert len(batch & set(found)) / len(batch) >= 0.95


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 40), n=st.integers(1, 300))
def test_cross_search_base_floor_skips_only_what_cannot_rise(seed, m, n):
    """``cross_search(base_floor=f)``: a base row's best is the exact one wherever that
    beats its floor, and otherwise at most its floor (-inf: nothing gathered)."""
    from dedup_index.search.cross import cross_search

    E = _batches(seed, m + n, 8)[: m + n]
    q, base = E[:m], E[m:]
    rng = np.random.default_rng(seed)
    floor = rng.uniform(0.0, 1.0, base.shape[0])
    full = cross_search(q, base, 0.9)
    cut = cross_search(q, base, 0.9, base_floor=floor)
    rises = full.base_best > floor
    assert np.array_equal(cut.base_best[rises], full.base_best[rises])
    assert np.all(cut.base_best[~rises] <= floor[~rises])
    assert np.array_equal(cut.query_best, full.query_best)
    assert set(zip(cut.q, cut.b, strict=True)) == set(zip(full.q, full.b, strict=True))
