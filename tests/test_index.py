"""The persistent index: batches with reopens equal one-shot dedup, and nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.index import DedupIndex, IndexCorruptError, IndexError_, IndexLockedError
from dedup_index.testing import mixed_adversarial


def one_shot(E, threshold, policy):
    return dedup_embeddings(E, threshold, backend="dense", policy=policy)


def assert_matches(index: DedupIndex, expected) -> None:
    state = index.decisions()
    assert np.array_equal(state["keep"], expected.keep)
    assert np.array_equal(state["duplicate_of"], expected.duplicate_of)
    assert np.array_equal(
        state["duplicate_similarity"], expected.duplicate_similarity, equal_nan=True
    )
    assert np.array_equal(state["group"], expected.group)
    assert np.array_equal(state["nearest"], expected.max_similarity)
    assert np.array_equal(state["earlier"], expected.max_earlier_similarity)
    assert index.pairs().equals(expected.pairs)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 50),
    threshold=st.sampled_from([0.5, 0.9, 0.99]),
    policy=st.sampled_from(["reference", "greedy", "component"]),
    data=st.data(),
)
def test_batches_with_reopens_equal_one_shot(tmp_path_factory, seed, n, threshold, policy, data):
    E = mixed_adversarial(seed, n, 16, threshold)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=4)))
    reopen = data.draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    path = tmp_path_factory.mktemp("idx") / "index"
    index = DedupIndex.create(path, 16, threshold, policy=policy)
    for a, b, again in zip([0, *cuts], [*cuts, n], reopen, strict=True):
        if a >= b:
            continue
        index.add(E[a:b], keys=[f"k{r}" for r in range(a, b)])
        if again:
            index.close()
            index = DedupIndex.open(path, mode="a")
    assert len(index) == n
    assert_matches(index, one_shot(E, threshold, policy))
    index.close()
    with DedupIndex.open(path) as reader:  # read-only reopen sees the same
        assert_matches(reader, one_shot(E, threshold, policy))


def test_add_result_query_stats_and_keys(tmp_path):
    rng = np.random.default_rng(0)
    E = rng.standard_normal((20, 8)).astype(np.float32)
    with DedupIndex.create(tmp_path / "i", 8, 0.95, model_name="m") as index:
        first = index.add(E, keys=[f"img{r}.jpg" for r in range(20)])
        assert first.kept.all() and first.duplicate_of == [None] * 20
        second = index.add(np.stack([E[3], E[7] * 2]), keys=["copy3.jpg", "copy7.jpg"])
        assert second.kept.tolist() == [False, False]
        assert second.duplicate_of == ["img3.jpg", "img7.jpg"]
        assert np.all(second.similarity >= 0.95)
        assert index.max_similarity(["img3.jpg"])[0] >= 0.95
        hits = index.query(np.stack([E[5], -E[5]]))
        assert [k for k, _ in hits[0]] == ["img5.jpg"] and hits[1] == []
        assert len(index) == 22 and index.keys()[-1] == "copy7.jpg"
        stats = index.stats()
        assert (stats["rows"], stats["removed"], stats["pairs"]) == (22, 2, 2)
        with pytest.raises(IndexError_, match="already in the index"):
            index.add(E[:1], keys=["img0.jpg"])
        skipped = index.add(E[:2], keys=["img0.jpg", "new.jpg"], on_duplicate_key="skip")
        assert skipped.skipped == ["img0.jpg"] and skipped.keys == ["new.jpg"]
        with pytest.raises(ValueError, match="8-dimensional"):
            index.add(np.ones((1, 4)))
        with pytest.raises(ValueError, match="repeat within this batch"):
            index.add(E[:2], keys=["x", "x"])


def test_refusals(tmp_path):
    DedupIndex.create(tmp_path / "i", 8, 0.9, model_name="clip-a").close()
    with pytest.raises(IndexError_, match="already holds"):
        DedupIndex.create(tmp_path / "i", 8)
    with pytest.raises(IndexError_, match="8-dimensional"):
        DedupIndex.open(tmp_path / "i", dim=16)
    with pytest.raises(IndexError_, match="built with model 'clip-a'"):
        DedupIndex.open(tmp_path / "i", model_name="clip-b")
    with pytest.raises(IndexError_, match="not a dedup index"):
        DedupIndex.open(tmp_path / "nothing")
    writer = DedupIndex.open(tmp_path / "i", mode="a")
    with pytest.raises(IndexLockedError, match="locked by another writer"):
        DedupIndex.open(tmp_path / "i", mode="a")
    with DedupIndex.open(tmp_path / "i") as reader:  # readers need no lock
        assert len(reader) == 0
        with pytest.raises(IndexError_, match="read-only"):
            reader.add(np.ones((1, 8)))
    writer.close()
    DedupIndex.open(tmp_path / "i", mode="a").close()


def test_corrupted_files_are_named(tmp_path):
    rng = np.random.default_rng(1)
    with DedupIndex.create(tmp_path / "i", 8, 0.9) as index:
        index.add(rng.standard_normal((10, 8)))
        index.add(rng.standard_normal((10, 8)))
    state = next(p for p in os.listdir(tmp_path / "i") if p.startswith("state-"))
    (tmp_path / "i" / state).write_bytes((tmp_path / "i" / state).read_bytes()[:100])
    with pytest.raises(IndexCorruptError, match=state):
        DedupIndex.open(tmp_path / "i")
    (tmp_path / "i" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="manifest.json"):
        DedupIndex.open(tmp_path / "i")


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from dedup_index.index import DedupIndex
    E = np.load(sys.argv[2])
    with DedupIndex.open(sys.argv[1], mode="a") as index:
        index.add(E[20:], keys=[f"k{r}" for r in range(20, len(E))])
    """
)


@pytest.mark.parametrize(
    "point", ["rows_appended", "pairs_written", "state_written", "manifest_written"]
)
def test_killed_mid_add_leaves_a_consistent_index(tmp_path, point):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((30, 8)).astype(np.float32)
    E = np.concatenate([base, base[:10] + 1e-4]).astype(np.float32)
    np.save(tmp_path / "E.npy", E)
    with DedupIndex.create(tmp_path / "i", 8, 0.99) as index:
        index.add(E[:20], keys=[f"k{r}" for r in range(20)])
    env = dict(os.environ, DEDUP_INDEX_CRASH_AT=point)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "i"), str(tmp_path / "E.npy")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 77, done.stderr
    with DedupIndex.open(tmp_path / "i") as reader:
        committed = len(reader)
        assert committed == (len(E) if point == "manifest_written" else 20)
        assert_matches(reader, one_shot(E[:committed], 0.99, "reference"))
    with DedupIndex.open(tmp_path / "i", mode="a") as index:  # the next writer goes on
        if committed == 20:
            index.add(E[20:], keys=[f"k{r}" for r in range(20, len(E))])
        assert_matches(index, one_shot(E, 0.99, "reference"))


def test_operator_dedups_a_new_table_against_the_index(tmp_path, photo_dir, encoder):
    import pandas as pd
    from conftest import COPY_THRESHOLD

    from dedup_index import ImageDeduplicateFilter

    class Memory:
        def __init__(self, frame):
            self.frame, self.out = frame, None

        def read(self, output_type):
            return self.frame

        def write(self, frame):
            self.out = frame

    index_path = tmp_path / "index"
    filt = ImageDeduplicateFilter(
        threshold=COPY_THRESHOLD, encoder=encoder, image_root=photo_dir, index_path=index_path
    )
    week1 = Memory(pd.DataFrame({"image": ["a.jpg", "b.jpg", "a_copy.jpg"]}))
    filt.run(week1)
    assert week1.out["image"].tolist() == ["a.jpg", "b.jpg"]
    week2 = Memory(pd.DataFrame({"image": ["c.png", "a_reenc.jpg", "b.jpg"]}))
    filt.run(week2)
    assert week2.out["image"].tolist() == ["c.png"]
    rejects = filt.last_report.rejects
    assert rejects["reject_reason"].tolist() == ["duplicate", "already_indexed"]
    assert rejects["duplicate_of"].tolist() == ["a.jpg", "b.jpg"]
    with DedupIndex.open(index_path) as index:
        assert index.keys() == ["a.jpg", "b.jpg", "a_copy.jpg", "c.png", "a_reenc.jpg"]
        assert index.model_name == filt.model_name
        # The same as one pass over both tables (b.jpg once).
        from dedup_index.io import load_image

        names = ["a.jpg", "b.jpg", "a_copy.jpg", "c.png", "a_reenc.jpg"]
        E = encoder.encode([load_image(photo_dir / n) for n in names])
        assert np.array_equal(
            index.decisions()["keep"], one_shot(E, COPY_THRESHOLD, "reference").keep
        )


def test_add_images(tmp_path, photo_dir, encoder):
    from conftest import COPY_THRESHOLD

    with DedupIndex.create(tmp_path / "i", encoder.dim, COPY_THRESHOLD) as index:
        paths = [str(photo_dir / n) for n in ["a.jpg", "b.jpg", "a_copy.jpg"]]
        result = index.add_images(paths, encoder=encoder)
        assert result.kept.tolist() == [True, True, False]
        assert result.duplicate_of[2] == paths[0]


@pytest.mark.parametrize("policy", ["reference", "greedy", "component"])
def test_remove_answers_as_if_never_added(tmp_path, policy):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((25, 8))
    E = np.concatenate([base, base[:8] + 0.01 * rng.standard_normal((8, 8)), base[:3]])
    keys = [f"k{r}" for r in range(len(E))]
    gone = ["k0", "k5", "k30"]
    with DedupIndex.create(tmp_path / "i", 8, 0.99, policy=policy) as index:
        index.add(E[:20], keys=keys[:20])
        index.add(E[20:], keys=keys[20:])
        assert index.remove(gone) == 3
        live = [r for r, k in enumerate(keys) if k not in gone]
        expected = one_shot(E[live], 0.99, policy)
        state = index.decisions()
        assert state["removed"].sum() == 3 and not state["keep"][[0, 5, 30]].any()
        assert np.array_equal(state["keep"][live], expected.keep)
        assert np.array_equal(state["nearest"][live], expected.max_similarity)
        live_idx = np.array(live)
        dup = state["duplicate_of"][live]
        mapped = np.where(dup >= 0, np.searchsorted(live_idx, dup), -1)
        assert np.array_equal(mapped, expected.duplicate_of)
        with pytest.raises(KeyError, match="already removed"):
            index.remove(["k0"])
        # Adding after a removal still equals one-shot of the live rows.
        extra = rng.standard_normal((5, 8))
        extra[0] = E[0]  # a copy of a removed row: nothing earlier to duplicate now
        index.add(extra, keys=[f"x{r}" for r in range(5)])
    with DedupIndex.open(tmp_path / "i") as reader:
        expected = one_shot(np.concatenate([E[live], extra]), 0.99, policy)
        state = reader.decisions()
        alive = ~state["removed"]
        assert np.array_equal(state["keep"][alive], expected.keep)
        assert np.array_equal(state["nearest"][alive], expected.max_similarity)
        assert reader.pairs().to_frame().shape[0] == len(expected.pairs)


@pytest.mark.parametrize(
    "backend, options",
    [
        ("ivf", {"nlist": 1, "tail_rows": 0}),
        ("hnsw", {"ef_search": 256, "tail_rows": 0}),
        ("ivf", {"nlist": 1}),  # everything in the exact tail
        ("flat", {}),
    ],
)
def test_approximate_backends_persist_and_match_when_exhaustive(tmp_path, backend, options):
    rng = np.random.default_rng(6)
    base = rng.standard_normal((60, 16))
    E = np.concatenate([base, base[:15] + 0.003 * rng.standard_normal((15, 16)), base[:5]])
    with DedupIndex.create(
        tmp_path / "i", 16, 0.99, backend=backend, backend_options=options
    ) as index:
        index.add(E[:60], keys=[f"k{r}" for r in range(60)])
    with DedupIndex.open(tmp_path / "i", mode="a") as index:
        assert index.exact == (backend == "flat")
        index.add(E[60:], keys=[f"k{r}" for r in range(60, len(E))])
        expected = one_shot(E, 0.99, "reference")
        if backend == "flat":
            assert_matches(index, expected)
        else:  # exhaustive search settings: pairs and decisions exact; an old row's
            # nearest score is a lower bound (raised only through candidates found)
            state = index.decisions()
            assert index.pairs().equals(expected.pairs)
            assert np.array_equal(state["keep"], expected.keep)
            assert np.array_equal(state["duplicate_of"], expected.duplicate_of)
            assert np.all(state["nearest"] <= expected.max_similarity)
            assert np.array_equal(state["nearest"][60:], expected.max_similarity[60:])
        hits = index.query(E[:3])
        assert [h[0][0] for h in hits] == ["k0", "k1", "k2"]
    segments = os.listdir(tmp_path / "i" / "ann")  # one FAISS segment per add, or none
    assert len(segments) == (2 if options.get("tail_rows") == 0 else 0)


def test_default_ivf_index_finds_planted_copies(tmp_path):
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3000, 32)).astype(np.float32)
    copies = base[:200] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)
    with DedupIndex.create(tmp_path / "i", 32, 0.98, backend="ivf") as index:
        index.add(base)
        result = index.add(copies)
        assert result.n_removed >= 195  # approximate: measured, not assumed
        assert set(result.duplicate_of) <= {str(r) for r in range(200)} | {None}


@pytest.mark.parametrize(
    "backend, options",
    [("ivf", {"nlist": 1, "tail_rows": 0}), ("hnsw", {"ef_search": 256, "tail_rows": 0})],
)
def test_large_batches_on_approximate_indexes_take_the_bulk_path(
    tmp_path, monkeypatch, backend, options
):
    """Batches of ANN_BULK_ROWS rows or more find their own pairs with ``partitioned``
    and their pairs with old rows through the FAISS index; with exhaustive settings the
    answer is the one-shot one (pairs, keep, duplicate_of)."""
    from dedup_index.index import core

    monkeypatch.setattr(core, "ANN_BULK_ROWS", 50)
    rng = np.random.default_rng(11)
    base = rng.standard_normal((150, 16))
    near = base[rng.choice(150, 40)] + 0.003 * rng.standard_normal((40, 16))
    E = np.concatenate([base[:100], near[:20], base[100:], near[20:], base[:5]])
    with DedupIndex.create(
        tmp_path / "i", 16, 0.99, backend=backend, backend_options=options
    ) as index:
        index.add(E[:120])  # bulk, empty index
        index.add(E[120:150])  # below the bulk size: the per-row path
        index.add(E[150:])  # bulk, against old rows through the index
        expected = one_shot(E, 0.99, "reference")
        state = index.decisions()
        assert index.pairs().equals(expected.pairs)
        assert np.array_equal(state["keep"], expected.keep)
        assert np.array_equal(state["duplicate_of"], expected.duplicate_of)
        assert np.all(state["nearest"] <= expected.max_similarity + 1e-12)


# ---------------------------------------------------------------- the search device


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 60),
    threshold=st.sampled_from([0.5, 0.9, 0.99]),
    precision=st.sampled_from(["fp32", "bf16"]),
    data=st.data(),
)
def test_index_on_the_torch_tiles_equals_numpy(
    tmp_path_factory, seed, n, threshold, precision, data
):
    """``device=``/``engine="torch"``: the index's cross search and within-batch search
    run the GPU tile loop (here on the CPU); adds, a removal and queries give the numpy
    index's bits, and the one-shot oracle's decisions."""
    E = mixed_adversarial(seed, n, 16, threshold)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3)))
    root = tmp_path_factory.mktemp("dev")
    indexes = [
        DedupIndex.create(root / "numpy", 16, threshold, precision=precision),
        DedupIndex.create(
            root / "torch", 16, threshold, precision=precision, device="cpu", engine="torch"
        ),
    ]
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        for index in indexes:
            index.add(E[a:b], keys=[f"k{r}" for r in range(a, b)])
    assert_matches(indexes[1], one_shot(E, threshold, "reference"))
    for index in indexes:
        index.remove(["k0"])
    want, got = (ix.decisions() for ix in indexes)
    for name in want:
        assert np.array_equal(want[name], got[name], equal_nan=True), name
    assert indexes[0].pairs().equals(indexes[1].pairs())
    queries = E[: min(n, 5)] * 1.0
    assert indexes[0].query(queries) == indexes[1].query(queries)
    for index in indexes:
        index.close()


def test_index_device_is_not_stored_and_cuda_without_cuda_warns(tmp_path, caplog):
    """The device is this process's (not written to the manifest); CUDA asked for where
    there is none warns once per create/open and the index searches on the CPU."""
    import json

    torch = pytest.importorskip("torch")
    E = mixed_adversarial(3, 40, 16, 0.9)
    with DedupIndex.create(tmp_path / "i", 16, 0.9, device="cpu", engine="torch") as index:
        index.add(E[:25], keys=[f"k{r}" for r in range(25)])
        assert index.device == "cpu" and index.engine == "torch"
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert "device" not in manifest and "engine" not in manifest
    with DedupIndex.open(tmp_path / "i", mode="a") as index:
        assert index.device is None and index.engine is None
    if torch.cuda.is_available():
        return
    with caplog.at_level("WARNING"), DedupIndex.open(tmp_path / "i", "a", device="cuda") as ix:
        assert ix.device == "cpu"
        ix.add(E[25:], keys=[f"k{r}" for r in range(25, 40)])
        assert_matches(ix, one_shot(E, 0.9, "reference"))
    assert "CUDA is not available" in caplog.text and "searching the index" in caplog.text
    with pytest.raises(ValueError, match="engine must be one of"):
        DedupIndex.open(tmp_path / "i", engine="jax")
    with pytest.raises(ValueError, match="device must be"):
        DedupIndex.open(tmp_path / "i", device="tpu:x")


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("torch"), reason="torch is not installed"
)
def test_index_on_cuda_equals_cpu(tmp_path):
    """On a GPU: the index's searches run there and give the CPU index's bits."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    E = mixed_adversarial(5, 300, 32, 0.9)
    with (
        DedupIndex.create(tmp_path / "cpu", 32, 0.9) as cpu,
        DedupIndex.create(tmp_path / "gpu", 32, 0.9, device="cuda") as gpu,
    ):
        for a, b in [(0, 100), (100, 250), (250, 300)]:
            cpu.add(E[a:b], keys=[str(r) for r in range(a, b)])
            gpu.add(E[a:b], keys=[str(r) for r in range(a, b)])
        want, got = cpu.decisions(), gpu.decisions()
        for name in want:
            assert np.array_equal(want[name], got[name], equal_nan=True), name
        assert cpu.pairs().equals(gpu.pairs())
        assert cpu.query(E[:7]) == gpu.query(E[:7])


def test_cli_index_device_reaches_the_search(tmp_path):
    """``index add/query --device``: the index searches there (CUDA where there is none:
    the one warning, the CPU's decisions); a bad device is a usage error (exit 2)."""
    pytest.importorskip("torch")
    from test_cli import cli

    E = mixed_adversarial(4, 30, 8, 0.99)
    np.save(tmp_path / "a.npy", E[:20])
    np.save(tmp_path / "b.npy", E[20:])
    index = tmp_path / "vec.index"
    assert cli("index", "create", index, "--dim", "8", "--threshold", "0.99").returncode == 0
    done = cli("index", "add", index, tmp_path / "a.npy", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    done = cli("index", "add", index, tmp_path / "b.npy", "--device", "cuda")
    assert done.returncode == 0, done.stderr
    import torch

    if not torch.cuda.is_available():
        assert "CUDA is not available: searching the index on the CPU" in done.stderr
    with DedupIndex.open(index) as reader:
        state = reader.decisions()
    want = one_shot(E, 0.99, "reference")
    assert np.array_equal(state["keep"], want.keep)
    done = cli("index", "query", index, tmp_path / "b.npy", "--device", "tpu:x")
    assert done.returncode == 2 and "device must be" in done.stderr
    done = cli("index", "query", index, tmp_path / "b.npy", "--device", "cpu")
    assert done.returncode == 0, done.stderr
