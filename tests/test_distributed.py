"""The distributed path on a local Ray cluster: identical to one machine, tolerant of a
killed worker, resumable.  One cluster (2 CPUs) for the whole module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import COPY_THRESHOLD, MemoryStorage, jpeg_bytes, photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.distributed import tiles as tl
from dedup_index.search import as_unit_float32
from dedup_index.search.pairs import concat_pairsets
from dedup_index.store import EmbeddingStore, PairFile
from dedup_index.testing import compare_results, dense_clusters, mixed_adversarial

ray = pytest.importorskip("ray")

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "colorwheel",
    "clock",
    "coins",
    "motorcycle",
]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # pragma: no cover - someone else's cluster
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def assert_identical(expected, actual):
    found = compare_results(expected, actual)
    assert not found, "\n".join(map(str, found))
    assert np.array_equal(expected.max_earlier_similarity, actual.max_earlier_similarity)
    assert expected.pairs.equals(actual.pairs)


# ------------------------------------------------------------------ tiles, without Ray


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 90),
    d=st.sampled_from([4, 16, 32]),
    threshold=st.sampled_from([0.5, 0.9, 0.99, 1.0]),
    block=st.sampled_from([1, 5, 16, 64, 128]),
)
def test_merged_tiles_equal_blocked_for_any_block_size(seed, n, d, threshold, block):
    E = as_unit_float32(mixed_adversarial(seed, n, d, threshold))
    n = len(E)
    ref = dedup_embeddings(E, threshold, backend="blocked", normalize=False)
    later, earlier, parts = np.full(n, -np.inf), np.full(n, -np.inf), []
    for a, c in tl.tile_grid(n, block):
        a0, a1 = tl.block_bounds(n, block, a)
        c0, c1 = tl.block_bounds(n, block, c)
        pairs, bl, be = tl.compute_tile(
            E[a0:a1], None if a == c else E[c0:c1], threshold, start_a=a0, start_c=c0
        )
        parts.append(pairs)
        np.maximum(later[a0:a1], bl, out=later[a0:a1])
        np.maximum(earlier[c0:c1], be, out=earlier[c0:c1])
    assert concat_pairsets(parts).equals(ref.pairs)
    assert np.array_equal(np.maximum(np.maximum(later, earlier), 0.0), ref.max_similarity)
    assert np.array_equal(earlier, ref.max_earlier_similarity)


def test_importing_the_package_imports_neither_ray_nor_torch():
    code = (
        "import sys, dedup_index.distributed as d; d.__doc__; "
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_manifest_shards_are_read_where_they_are(tmp_path):
    from dedup_index.distributed.embed import _read_values, _resolve_source

    values = [f"img{k}.jpg" for k in range(23)]
    frame = pd.DataFrame({"image": values, "other": range(23)})
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")) + "\n\n")
    parquet = tmp_path / "m.parquet"
    frame.to_parquet(parquet, row_group_size=4)
    for path in (jsonl, parquet):
        source = _resolve_source(str(path), "image", None, shard_rows=5)
        assert source.n == 23 and source.image_root == str(tmp_path)
        got = []
        for k, a in enumerate(range(0, 23, 5)):
            got += _read_values(source, k, a, min(23, a + 5), b"")
        assert got == values, path
    with pytest.raises(KeyError, match="'picture' not found"):
        _resolve_source(str(parquet), "picture", None, shard_rows=5)


# ------------------------------------------------------------------------ search on Ray


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 120),
    d=st.sampled_from([4, 16, 32]),
    threshold=st.sampled_from([0.5, 0.9, 0.99, 1.0]),
    tile_rows=st.sampled_from([7, 16, 64]),
    policy=st.sampled_from(["reference", "greedy", "component"]),
    score=st.sampled_from(["nearest", "pairs"]),
)
def test_ray_search_is_bit_identical_to_blocked(
    cluster, seed, n, d, threshold, tile_rows, policy, score
):
    from dedup_index.distributed import dedup_store

    E = mixed_adversarial(seed, n, d, threshold)  # exact copies, chains, ties at t
    ref = dedup_embeddings(E, threshold, backend="blocked", policy=policy, score=score)
    got = dedup_store(E, threshold, policy=policy, score=score, tile_rows=tile_rows)
    assert_identical(ref, got)
    if len(E) >= 2:
        assert got.backend == "ray" and got.info["tiles_computed"] == got.info["tiles"]


def test_a_store_on_disk_and_spilled_pairs(cluster, tmp_path):
    from dedup_index.distributed import dedup_store

    rng = np.random.default_rng(2)
    E = dense_clusters(rng, 6, 40, 16, 0.15)
    store = EmbeddingStore.create(tmp_path / "store", 16, shard_rows=50)
    for a in range(0, len(E), 70):
        store.append(E[a : a + 70])
    ref = dedup_embeddings(store, 0.9, backend="blocked")
    got = dedup_store(
        str(tmp_path / "store"),
        0.9,
        tile_rows=48,
        pairs_memory_budget=256,
        pairs_path=tmp_path / "pairs.parquet",
    )
    assert isinstance(got.pairs, PairFile) and len(ref.pairs) > 100
    assert got.pairs.to_pairset().equals(ref.pairs)
    assert len(got.pairs) == len(ref.pairs)  # no tile merged twice
    for field in ("keep", "duplicate_of", "group", "max_similarity", "max_earlier_similarity"):
        assert np.array_equal(getattr(got, field), getattr(ref, field)), field


def test_a_killed_worker_is_retried_without_losing_or_duplicating_pairs(cluster, tmp_path):
    from dedup_index.distributed import dedup_store

    E = mixed_adversarial(7, 150, 16, 0.9)
    ref = dedup_embeddings(E, 0.9, backend="blocked")
    work = tmp_path / "work"
    (work / tl.FAULT_DIR).mkdir(parents=True)
    for a, c in [(0, 0), (1, 3)]:  # a diagonal and an off-diagonal tile die once
        (work / tl.FAULT_DIR / f"{a}_{c}").touch()
    got = dedup_store(E, 0.9, tile_rows=32, work_dir=work, max_retries=2)
    assert not list((work / tl.FAULT_DIR).iterdir())  # both workers really died
    assert_identical(ref, got)
    assert len(list((work / tl.TILES_DIR).glob("*.npz"))) == got.info["tiles"] == 15


def test_a_rerun_skips_finished_tiles_and_redoes_missing_or_damaged_ones(cluster, tmp_path):
    from dedup_index.distributed import dedup_store

    E = mixed_adversarial(3, 130, 8, 0.99)
    ref = dedup_embeddings(E, 0.99, backend="blocked")
    work = tmp_path / "work"
    first = dedup_store(E, 0.99, tile_rows=32, work_dir=work)
    assert first.info["tiles_computed"] == 15
    again = dedup_store(E, 0.99, tile_rows=32, work_dir=work)
    assert again.info["tiles_computed"] == 0 and again.info["tiles_reused"] == 15
    tl.tile_path(work, 0, 2).unlink()
    damaged = tl.tile_path(work, 1, 4)
    damaged.write_bytes(damaged.read_bytes()[:40])
    third = dedup_store(E, 0.99, tile_rows=32, work_dir=work)
    assert third.info["tiles_computed"] == 2
    for result in (first, again, third):
        assert_identical(ref, result)
    with pytest.raises(ValueError, match="another job .*threshold"):
        dedup_store(E, 0.9, tile_rows=32, work_dir=work)


def test_bad_parameters_are_refused_up_front():
    from dedup_index.distributed import dedup_store, embed_table

    E = np.eye(4)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        dedup_store(E, 1.5)
    with pytest.raises(ValueError, match="tile_rows must be an integer >= 1"):
        dedup_store(E, 0.9, tile_rows=0)
    with pytest.raises(ValueError, match="policy must be one of"):
        dedup_store(E, 0.9, policy="newest")
    with pytest.raises(ValueError, match="shard_rows must be an integer >= 1, got 0"):
        embed_table(["a.jpg"], "/nonexistent", model_name="x", shard_rows=0)


# ------------------------------------------------------------------- images on Ray actors


@pytest.fixture(scope="module")
def photo_values(tmp_path_factory):
    """16 real photos, 3 byte-identical copies, a missing file and a broken one."""
    folder = tmp_path_factory.mktemp("photos")
    names = []
    for k, name in enumerate(PHOTOS):
        (folder / f"{k:02d}_{name}.jpg").write_bytes(jpeg_bytes(photo(name, 96)))
        names.append(f"{k:02d}_{name}.jpg")
    values = list(names)
    for at, src in [(5, 0), (11, 3), (17, 9)]:
        values.insert(at, names[src])
    values.insert(8, "missing.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    values.append("broken.jpg")
    return folder, values


def test_actors_embed_like_one_process_resume_and_decide_like_the_operator(
    cluster, tmp_path, tiny_clip, encoder, photo_values
):
    """Two actor pools in all (each loads torch and the model): the first embeds every
    shard, the second (inside dedup_images, after a shard file was lost) only that one."""
    from dedup_index import ImageDeduplicateFilter
    from dedup_index.distributed import dedup_images, embed_table
    from dedup_index.io import load_image

    folder, values = photo_values
    work = tmp_path / "work"
    kwargs = {"batch_size": 4, "image_root": folder, "shard_rows": 6, "concurrency": 1}
    first = embed_table(values, work / "embed", model_name=tiny_clip, **kwargs)
    bad = [k for k, v in enumerate(values) if v in ("missing.jpg", "broken.jpg")]
    assert [r for r, _ in first.failures] == bad
    assert {f.reason for _, f in first.failures} == {"missing_file", "not_an_image"}
    valid = [k for k in range(len(values)) if k not in bad]
    assert first.rows.tolist() == valid and first.embedded == len(valid)
    assert first.shards == first.shards_computed == 4
    store = EmbeddingStore.open(first.store_path)
    assert store.keys() == [str(k) for k in valid]
    single = encoder.encode([load_image(values[k], image_root=folder) for k in valid])
    np.testing.assert_allclose(store.to_array(), as_unit_float32(single), atol=1e-5)
    lines = (work / "embed" / "failures.jsonl").read_text().splitlines()
    assert [json.loads(x)["row"] for x in lines] == bad
    with pytest.raises(ValueError, match="another job"):
        embed_table(values[:-1], work / "embed", model_name=tiny_clip, **kwargs)

    # A rerun embeds nothing; after one shard file is lost, only that shard is redone.
    assert embed_table(values, work / "embed", model_name=tiny_clip, **kwargs).embedded == 0
    sorted((work / "embed" / "parts").glob("shard-*.npz"))[2].unlink()
    result, failures = dedup_images(
        values, model_name=tiny_clip, threshold=COPY_THRESHOLD, tile_rows=5, work_dir=work, **kwargs
    )
    again = result.info["embed"]
    lost = [k for k in valid if 12 <= k < 18]
    assert again.shards_computed == 1 and again.embedded == len(lost)
    assert again.reused == len(valid) - len(lost)
    np.testing.assert_array_equal(
        EmbeddingStore.open(again.store_path).to_array(), store.to_array()
    )

    # The same decisions as the single-machine operator ...
    class Table:
        def read(self, output_type="dataframe"):
            return pd.DataFrame({"image": values})

        def write(self, frame):
            self.out = frame

    table = Table()
    filt = ImageDeduplicateFilter(
        tiny_clip, threshold=COPY_THRESHOLD, encoder=encoder, image_root=folder
    )
    filt.run(table)
    report = filt.last_report
    assert [r for r, _ in failures] == [r for r, _ in report.failures] == bad
    rows = result.info["rows"]
    assert [values[r] for r in rows[result.keep]] == table.out["image"].tolist()
    assert result.n_removed == report.removed_duplicates == 3
    np.testing.assert_allclose(
        result.max_similarity[result.keep], table.out["max_similarity"], atol=1e-5
    )
    # ... and, on the same store, the single-machine search bit for bit.
    assert_identical(dedup_embeddings(again.store_path, COPY_THRESHOLD, backend="blocked"), result)
    assert len(list((work / "search" / tl.TILES_DIR).glob("*.npz"))) == result.info["tiles"]


def test_operator_and_cli_with_ray_decide_like_one_machine(
    cluster, tmp_path, tiny_clip, encoder, photo_values
):
    """``ImageDeduplicateFilter(ray=True)`` and ``dedup-index run --ray ADDRESS`` (a child
    process joining this module's cluster) keep and remove the rows one machine does."""
    from dedup_index import ImageDeduplicateFilter

    folder, values = photo_values

    class Table:
        def read(self, output_type="dataframe"):
            return pd.DataFrame({"image": values, "n": range(len(values))})

        def write(self, frame):
            self.out = frame

    local, on_ray = Table(), Table()
    one = ImageDeduplicateFilter(tiny_clip, COPY_THRESHOLD, encoder=encoder, image_root=folder)
    one.run(local)
    filt = ImageDeduplicateFilter(
        tiny_clip, COPY_THRESHOLD, batch_size=4, image_root=folder, ray=True
    )
    filt.run(on_ray)
    assert on_ray.out["image"].tolist() == local.out["image"].tolist()
    np.testing.assert_allclose(on_ray.out["max_similarity"], local.out["max_similarity"], atol=1e-5)
    rejects, expected = filt.last_report.rejects, one.last_report.rejects
    assert rejects["n"].tolist() == expected["n"].tolist()
    assert rejects["reject_reason"].tolist() == expected["reject_reason"].tolist()
    assert filt.last_report.result.backend == "ray"
    with pytest.raises(ValueError, match="backend must be"):
        ImageDeduplicateFilter(tiny_clip, COPY_THRESHOLD, ray=True, backend="hnsw")

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(values) + "\n")
    address = ray.get_runtime_context().gcs_address
    script = str(__import__("pathlib").Path(sys.executable).with_name("dedup-index"))
    cmd = [script, "run", str(listing), "--image-root", str(folder), "--model", tiny_clip]
    cmd += ["--threshold", str(COPY_THRESHOLD), "--ray", address, "--no-progress"]
    cmd += ["--out", str(tmp_path / "kept.jsonl"), "--removed", str(tmp_path / "removed.jsonl")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = pd.read_json(tmp_path / "kept.jsonl", lines=True)
    assert kept["image"].tolist() == local.out["image"].tolist()
    assert "3 removed as near-duplicates, 2 failed to load" in done.stdout
    bad = subprocess.run(
        [script, "run", str(listing), "--ray", "--cache", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--ray-work-dir" in bad.stderr


# ------------------------------------------------------------------ one spine


def test_every_entry_point_embeds_the_same_bits_and_ray_writes_the_same_files(
    cluster, tmp_path, tiny_clip, encoder
):
    """The same folder through every door: the operator (with a cache), ``run``,
    ``run --ray``, ``index add``, ``DedupIndex.add_images`` and ``embed_table`` store
    embeddings bit-identical to :func:`embed_images`; ``run --ray`` writes the same kept,
    removed and pairs files, byte for byte, as ``run``.  Photos of 2 megapixels-ish
    shapes so the JPEG draft path is taken; a broken file and a subfolder included."""
    from dedup_index import ImageDeduplicateFilter
    from dedup_index.distributed import embed_table
    from dedup_index.encode.cache import EmbeddingCache, fingerprint, model_identity
    from dedup_index.encode.pipeline import embed_images
    from dedup_index.index import DedupIndex
    from dedup_index.io.inputs import list_images

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for k, name in enumerate(PHOTOS[:6]):
        img = photo(name, 480).resize((480 + 16 * k, 360))
        (folder / ("sub" if k % 2 else "") / f"{name}.jpg").write_bytes(jpeg_bytes(img))
    (folder / "sub" / "astronaut_copy.jpg").write_bytes((folder / "astronaut.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    values = list_images(folder)
    ref = embed_images(values, encoder, image_root=folder, num_workers=0)
    assert len(ref.failures) == 1 and ref.embeddings.shape[0] == len(values) - 1
    model = model_identity(tiny_clip)

    def cached(cache_dir):
        with EmbeddingCache(cache_dir, model_name=model) as cache:
            prints = [fingerprint(v, folder) for v in values]
            found, rows = cache.lookup([prints[p] for p in ref.positions])
        assert found.all()
        return rows

    def store_rows(path):
        with EmbeddingStore.open(path) as store:
            return store[:]

    got = {}
    # The operator, through its embedding cache.
    filt = ImageDeduplicateFilter(
        tiny_clip, COPY_THRESHOLD, image_root=folder, cache_dir=tmp_path / "op-cache"
    )
    filt.run(MemoryStorage(pd.DataFrame({"image": values})))
    got["operator"] = cached(tmp_path / "op-cache")
    # add_images and embed_table.
    with DedupIndex.create(tmp_path / "lib.index", encoder.dim, COPY_THRESHOLD) as index:
        index.add_images(values, encoder=encoder, image_root=folder, on_error="skip")
        got["add_images"] = index.embeddings()
    summary = embed_table(str(folder), tmp_path / "embed", model_name=tiny_clip)
    got["embed_table"] = store_rows(summary.store_path)
    # The command line: run, run --ray, index add.
    script = str(__import__("pathlib").Path(sys.executable).with_name("dedup-index"))
    address = ray.get_runtime_context().gcs_address
    common = ["--model", tiny_clip, "--threshold", str(COPY_THRESHOLD), "--no-progress"]
    outputs = {}
    for name, extra in [
        ("run", ["--cache", str(tmp_path / "cli-cache")]),
        ("run --ray", ["--ray", address, "--ray-work-dir", str(tmp_path / "ray-work")]),
    ]:
        out = tmp_path / name.replace(" ", "").replace("--", "-")
        cmd = [script, "run", str(folder), *common, *extra, "--out", str(out / "kept.jsonl")]
        cmd += ["--removed", str(out / "removed.jsonl"), "--pairs", str(out / "pairs.parquet")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = {f: (out / f).read_bytes() for f in os.listdir(out)}
        # Quiet Ray: one line per real problem (the broken file), none of Ray's own.
        problems = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(problems) == 1 and "failed to load" in problems[0], done.stderr
    got["run"] = cached(tmp_path / "cli-cache")
    got["run --ray"] = store_rows(tmp_path / "ray-work" / "embed" / "store")
    index_dir = tmp_path / "cli.index"
    done = subprocess.run(
        [script, "index", "create", str(index_dir), "--model", tiny_clip, "--threshold", "0.99"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [script, "index", "add", str(index_dir), str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with DedupIndex.open(index_dir) as index:
        got["index add"] = index.embeddings()
        assert index.keys() == [f"{folder.as_posix()}/{values[p]}" for p in ref.positions]

    # Caches keep the encoder's rows as they came; stores keep them normalised once, as
    # every search does before deciding: compare the vectors decisions are taken on.
    unit = as_unit_float32(ref.embeddings)
    for door in ("operator", "run"):
        got[door] = as_unit_float32(got[door])
    for door, embeddings in got.items():
        assert np.array_equal(embeddings, unit), f"{door} embeds other bits"
    assert outputs["run --ray"] == outputs["run"]
    assert set(outputs["run"]) == {"kept.jsonl", "removed.jsonl", "pairs.parquet"}


def test_gpu_actors_on_a_cluster_without_gpus_fail_at_once(cluster, tmp_path, tiny_clip):
    """Ray would wait for ever for the GPU; we say so instead (issue 16, item 4)."""
    import time

    from dedup_index.distributed import embed_table

    start = time.perf_counter()
    with pytest.raises(ValueError, match="has 0 GPU"):
        embed_table(["a.jpg"], tmp_path / "e", model_name=tiny_clip, num_gpus_per_actor=1)
    assert time.perf_counter() - start < 30


# ------------------------------------------------------------------ devices of the actors


def test_actor_device_follows_rays_assignment():
    """Plain function, given the GPU ids Ray would give (issue 16, defect 5)."""
    from dedup_index.distributed.embed import actor_device

    # Ray set CUDA_VISIBLE_DEVICES to the assigned GPU: it is cuda:0 inside the actor.
    for asked in (None, "auto", "cuda", "cuda:0"):
        assert actor_device(asked, [3], "3") == "cuda:0"
    assert actor_device("cuda:1", [2, 5], "2,5") == "cuda:1"
    assert actor_device(None, ["5"], "0,5") == "cuda:1"  # numbered as the process sees it
    assert actor_device(None, [5], None) == "cuda:5"  # Ray left CUDA_VISIBLE_DEVICES alone
    assert actor_device("cpu", [3], "3") == "cpu"
    # No GPU from Ray: the CPU, never GPU 0 of the node behind Ray's back.
    assert actor_device(None, [], None) == actor_device("auto", [], "0,1") == "cpu"
    for asked in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ValueError, match="no GPU: pass num_gpus_per_actor=1"):
            actor_device(asked, [], "0,1")
    with pytest.raises(ValueError, match="gave this encoder actor 1 GPU"):
        actor_device("cuda:1", [3], "3")
    with pytest.raises(ValueError, match="device must be"):
        actor_device("tpu", [3], "3")


def test_actor_cpus_and_loader_processes():
    from dedup_index.distributed.embed import actor_cpus

    # CPU actors: the model runs on the actor's CPUs; no loader processes unless asked.
    assert actor_cpus(0, None, None, 16, 4) == (1, 0)
    assert actor_cpus(0, 3, 2, 16, 4) == (3, 2)
    # GPU actors: the cluster's CPUs (one kept for Ray) decode for the GPUs.
    assert actor_cpus(1, None, None, 33, 4) == (8, 7)
    assert actor_cpus(1, None, None, 2, 1) == (1, 0)
    assert actor_cpus(1, None, None, 200, 1) == (17, 16)
    assert actor_cpus(1, 4, 2, 200, 1) == (4, 2)


def test_device_and_gpu_options_are_refused_before_ray_starts(tiny_clip, tmp_path):
    from dedup_index import ImageDeduplicateFilter
    from dedup_index.distributed import embed_table

    def embed(**kw):
        return embed_table(["a.jpg"], tmp_path / "e", model_name=tiny_clip, **kw)

    with pytest.raises(ValueError, match="needs GPUs for the actors"):
        embed(device="cuda", num_gpus_per_actor=0)
    with pytest.raises(ValueError, match=r"each actor has 1 GPU\(s\)"):
        embed(device="cuda:1", num_gpus_per_actor=1)
    with pytest.raises(ValueError, match="device must be"):
        embed(device="quantum")
    with pytest.raises(ValueError, match="num_gpus_per_actor must be"):
        embed(num_gpus_per_actor=-1)
    with pytest.raises(ValueError, match="num_workers must be"):
        embed(num_workers=-1)
    with pytest.raises(ValueError, match="needs GPUs for the actors"):
        ImageDeduplicateFilter(tiny_clip, ray=True, device="cuda", ray_gpus_per_actor=0)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_actors_with_loader_processes_embed_the_bits_of_embed_images(
    cluster, tmp_path, tiny_clip, photo_values
):
    """Encoder actors decode with the shared pipeline's worker processes: the same bits
    as :func:`embed_images` in one process; the operator's Ray path loads no model on the
    driver and passes ``device``/``ray_gpus_per_actor`` through (a GPU asked of a cluster
    without one is an error at once, not a hang)."""
    from dedup_index import ImageDeduplicateFilter
    from dedup_index.distributed import embed_table
    from dedup_index.encode import load_encoder
    from dedup_index.encode.pipeline import embed_images

    folder, values = photo_values
    ref = embed_images(
        values,
        load_encoder(tiny_clip, device="cpu", batch_size=4),
        image_root=folder,
        num_workers=0,
    )
    summary = embed_table(
        values,
        tmp_path / "embed",
        model_name=tiny_clip,
        batch_size=4,
        image_root=folder,
        shard_rows=10,
        concurrency=1,
        num_workers=2,
        num_gpus_per_actor=None,
    )
    assert summary.rows.tolist() == ref.positions
    assert [r for r, _ in summary.failures] == [r for r, _ in ref.failures]
    with EmbeddingStore.open(summary.store_path) as store:
        assert np.array_equal(store[:], as_unit_float32(ref.embeddings))

    filt = ImageDeduplicateFilter(
        tiny_clip,
        COPY_THRESHOLD,
        image_root=folder,
        ray=True,
        device="cuda",
        ray_gpus_per_actor=1,
    )
    assert filt.encoder is None  # nothing loaded on the driver
    with pytest.raises(ValueError, match="has 0 GPU"):
        filt.run(MemoryStorage(pd.DataFrame({"image": values})))


# ------------------------------------------------------------------ the search's device


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 70),
    threshold=st.sampled_from([0.5, 0.9, 0.99, 1.0]),
    block=st.sampled_from([1, 7, 16, 64]),
    precision=st.sampled_from(["fp32", "bf16"]),
)
def test_a_tile_on_the_torch_tiles_equals_numpy(seed, n, threshold, block, precision):
    """``compute_tile(engine="torch")``: the GPU tile code (here on the CPU) gives the
    numpy tile's pairs and maxima bit for bit, diagonal and off-diagonal tiles alike."""
    pytest.importorskip("torch")
    E = as_unit_float32(mixed_adversarial(seed, n, 16, threshold))
    n = len(E)
    for a, c in tl.tile_grid(n, block):
        a0, a1 = tl.block_bounds(n, block, a)
        c0, c1 = tl.block_bounds(n, block, c)
        args = (E[a0:a1], None if a == c else E[c0:c1], threshold)
        want = tl.compute_tile(*args, start_a=a0, start_c=c0, precision=precision)
        got = tl.compute_tile(
            *args, start_a=a0, start_c=c0, precision=precision, device="cpu", engine="torch"
        )
        assert got[0].equals(want[0]), (a, c)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2]), (a, c)


def _search(E, threshold, device=None, **options):
    from dedup_index.distributed.search import ray_search

    return ray_search(E, threshold, device=device, options=options)


def assert_same_search(want, got):
    assert got.pairs.equals(want.pairs)
    assert np.array_equal(got.nearest, want.nearest)
    assert np.array_equal(got.earlier, want.earlier)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 100),
    threshold=st.sampled_from([0.5, 0.9, 0.99]),
    tile_rows=st.sampled_from([16, 64]),
)
def test_ray_tasks_on_the_torch_tiles_equal_numpy_tiles(cluster, seed, n, threshold, tile_rows):
    """``device="cpu"``, ``engine="torch"``: every Ray task runs the GPU tile code (on
    the workers' CPUs) and the search gives the numpy tasks' bits, and blocked's."""
    pytest.importorskip("torch")
    E = as_unit_float32(mixed_adversarial(seed, n, 16, threshold))
    want = _search(E, threshold, "cpu", tile_rows=tile_rows)
    got = _search(E, threshold, "cpu", tile_rows=tile_rows, engine="torch")
    assert_same_search(want, got)
    ref = dedup_embeddings(E, threshold, backend="blocked", normalize=False)
    assert got.pairs.equals(ref.pairs)
    assert np.array_equal(got.nearest, ref.max_similarity)
    assert got.info["device"] == "cpu" and got.info["gpus_per_task"] == 0


def test_ray_search_on_cuda_without_gpus_warns_and_runs_on_the_cpus(cluster, caplog):
    """CUDA asked for on a cluster with no GPU: a warning and the CPU result, at once
    (a task asking Ray for a GPU that never comes would wait for ever)."""
    import time

    pytest.importorskip("torch")
    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray cluster has a GPU")
    E = as_unit_float32(mixed_adversarial(11, 90, 16, 0.9))
    want = _search(E, 0.9, None, tile_rows=32)
    start = time.perf_counter()
    with caplog.at_level("WARNING"):
        got = _search(E, 0.9, "cuda", tile_rows=32)
    assert time.perf_counter() - start < 60
    assert "Ray cluster has no GPU: searching on its CPUs" in caplog.text
    assert got.info["device"] == "cpu" and got.info["gpus_per_task"] == 0
    assert_same_search(want, got)


def test_dedup_store_and_dedup_embeddings_pass_the_device_to_the_cluster(cluster, caplog):
    """The device is the cluster's to resolve, not the driver's: ``dedup_store(device=)``
    and ``dedup_embeddings(backend="ray", device=)`` reach ``ray_search`` unchanged (a
    driver without CUDA does not turn "cuda" into "cpu" for workers that may have GPUs);
    here the cluster has none, so it warns and gives the CPU decisions."""
    from dedup_index.distributed import dedup_store

    pytest.importorskip("torch")
    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray cluster has a GPU")
    E = as_unit_float32(mixed_adversarial(5, 80, 16, 0.9))
    want = dedup_embeddings(E, 0.9, backend="dense")
    with caplog.at_level("WARNING"):
        got = dedup_store(E, 0.9, tile_rows=32, device="cuda", gpus_per_task=1)
    assert "Ray cluster has no GPU: searching on its CPUs" in caplog.text
    assert got.info["device"] == "cpu"
    assert compare_results(want, got) == []
    again = dedup_embeddings(
        E, 0.9, backend="ray", device="cuda", backend_options={"tile_rows": 32, "engine": "torch"}
    )
    assert compare_results(want, again) == []


def test_task_device_options_are_checked_before_ray_starts():
    from dedup_index.distributed.search import check_task_device

    assert check_task_device(None, None) == (None, 0.0)
    assert check_task_device("cpu", None) == ("cpu", 0.0)
    assert check_task_device("cuda", None) == ("cuda", 1.0)
    assert check_task_device("cuda:1", 2) == ("cuda:1", 2.0)
    assert check_task_device("cuda", 0.5) == ("cuda", 0.5)
    with pytest.raises(ValueError, match="gpus_per_task must be > 0"):
        check_task_device("cuda", 0)
    with pytest.raises(ValueError, match=r"each tile task has 1 GPU\(s\)"):
        check_task_device("cuda:1", 1)
    with pytest.raises(ValueError, match="gpus_per_task must be a number >= 0"):
        check_task_device("cuda", -1)
    with pytest.raises(ValueError, match="device must be"):
        check_task_device("tpu", None)
    with pytest.raises(ValueError, match="engine must be one of"):
        _search(np.eye(4, dtype=np.float32), 0.9, engine="jax")


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("torch"), reason="torch is not installed"
)
def test_ray_tasks_on_cuda_equal_the_cpu(cluster):
    """Where the cluster has a GPU: each task computes its tile on its own GPU, same bits."""
    import torch

    if not torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("no GPU in this Ray cluster")
    E = as_unit_float32(mixed_adversarial(13, 400, 32, 0.9))
    want = _search(E, 0.9, None, tile_rows=128)
    got = _search(E, 0.9, "cuda", tile_rows=128)
    assert got.info["device"] == "cuda" and got.info["gpus_per_task"] == 1
    assert_same_search(want, got)


@pytest.mark.slow
def test_ray_search_asking_more_gpus_than_the_cluster_has_fails_at_once():
    """A cluster with one (declared) GPU and tasks asking for two: an error at once, not
    a task waiting for ever (its own Ray, in a child process: the module's has none)."""
    code = textwrap.dedent(
        """
        import time, numpy as np, ray
        from dedup_index.distributed.search import ray_search
        ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        try:
            ray_search(np.eye(4, dtype=np.float32), 0.9, device="cuda",
                       options={"gpus_per_task": 2})
        except ValueError as err:
            print("refused:", err, round(time.perf_counter() - start))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "refused: gpus_per_task=2 but the Ray cluster has 1 GPU(s)" in out.stdout, out.stderr
    assert int(out.stdout.split()[-1]) < 30
