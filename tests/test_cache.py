"""The embedding cache and resume, end to end: real files, the tiny CLIP loaded from disk,
a real child process killed midway; plus the progress helper."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import COPY_THRESHOLD, MemoryStorage, jpeg_bytes, photo
from PIL import ImageOps

from dedup_index import ImageDeduplicateFilter, dedup_embeddings
from dedup_index.encode.cache import (
    CacheModelMismatchError,
    EmbeddingCache,
    fingerprint,
    model_identity,
)
from dedup_index.progress import NullProgress, progress

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ten_photos(tmp_path: Path) -> list[str]:
    """Ten image files: eight distinct pictures (four photos, each also mirrored) and two
    byte-for-byte copies, so a run removes exactly the copies."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ["astronaut", "coffee", "chelsea", "rocket"]:
        img = photo(name)
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(img))
        (folder / f"{name}_mirror.jpg").write_bytes(jpeg_bytes(ImageOps.mirror(img)))
    for name in ["coffee", "rocket_mirror"]:
        (folder / f"{name}_copy.jpg").write_bytes((folder / f"{name}.jpg").read_bytes())
    names = ["astronaut", "astronaut_mirror", "coffee", "coffee_mirror", "chelsea"]
    names += ["coffee_copy", "chelsea_mirror", "rocket", "rocket_mirror", "rocket_mirror_copy"]
    return [str(folder / f"{n}.jpg") for n in names]


def run_filter(paths: list[str], encoder, **options) -> tuple[ImageDeduplicateFilter, pd.DataFrame]:
    storage = MemoryStorage(pd.DataFrame({"image": paths, "id": range(len(paths))}))
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, **options)
    filt.run(storage)
    (out,) = storage.written
    return filt, out


def assert_same_result(
    a: ImageDeduplicateFilter, out_a, b: ImageDeduplicateFilter, out_b, *, exact: bool = True
):
    """Same rows out and rejected; scores bit-equal when every embedding came from the same
    batches, else equal to float32 noise (an image embedded alone and in a batch of ten can
    differ in the last bit: the BLAS kernels depend on the batch size)."""
    tol = {"check_exact": True} if exact else {"check_exact": False, "rtol": 1e-6, "atol": 1e-7}
    pd.testing.assert_frame_equal(out_a, out_b, **tol)
    pd.testing.assert_frame_equal(a.last_report.rejects, b.last_report.rejects, **tol)


# ---------------------------------------------------------------------- the operator


def test_second_run_embeds_nothing_and_equals_the_first(tmp_path, ten_photos, encoder, capsys):
    cache_dir = tmp_path / "emb-cache"
    first, out1 = run_filter(ten_photos, encoder, cache_dir=cache_dir, progress=True)
    assert (first.last_report.embedded, first.last_report.cached) == (10, 0)
    assert first.last_report.removed_duplicates == 2  # the two byte copies
    assert "embedding" in capsys.readouterr().err  # the forced progress bar was drawn

    second, out2 = run_filter(ten_photos, encoder, cache_dir=cache_dir)
    assert (second.last_report.embedded, second.last_report.cached) == (0, 10)
    assert "from the embedding cache" in second.last_report.summary()
    assert_same_result(first, out1, second, out2)
    plain, out_plain = run_filter(ten_photos, encoder)
    assert (plain.last_report.embedded, plain.last_report.cached) == (10, 0)
    assert_same_result(plain, out_plain, second, out2)
    assert capsys.readouterr().err == ""  # progress=None: stderr is not a terminal here


def test_an_edited_or_touched_file_is_embedded_again(tmp_path, ten_photos, encoder):
    cache_dir = tmp_path / "emb-cache"
    run_filter(ten_photos, encoder, cache_dir=cache_dir)

    # New content in one file: only that one is embedded again.
    Path(ten_photos[2]).write_bytes(jpeg_bytes(photo("camera")))
    edited, out = run_filter(ten_photos, encoder, cache_dir=cache_dir)
    assert (edited.last_report.embedded, edited.last_report.cached) == (1, 9)
    plain, out_plain = run_filter(ten_photos, encoder)
    assert_same_result(plain, out_plain, edited, out, exact=False)

    # Same content, new mtime: a new fingerprint too.
    st = os.stat(ten_photos[4])
    os.utime(ten_photos[4], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched, _ = run_filter(ten_photos, encoder, cache_dir=cache_dir)
    assert (touched.last_report.embedded, touched.last_report.cached) == (1, 9)


def test_cached_images_still_obey_max_pixels(tmp_path, ten_photos, encoder):
    cache_dir = tmp_path / "emb-cache"
    run_filter(ten_photos, encoder, cache_dir=cache_dir)
    # The astronaut thumbnails are 160x160 = 25600 pixels, the other photos ~17000.
    small, out = run_filter(ten_photos, encoder, cache_dir=cache_dir, max_pixels=20_000)
    plain, out_plain = run_filter(ten_photos, encoder, max_pixels=20_000)
    assert small.last_report.failed == plain.last_report.failed == 2
    assert (small.last_report.embedded, small.last_report.cached) == (0, 8)
    assert_same_result(plain, out_plain, small, out, exact=False)


CHILD = textwrap.dedent(
    """
    import json, os, sys
    import pandas as pd
    from dedup_index import ImageDeduplicateFilter
    from dedup_index.encode.clip import CLIPEncoder

    class DieOnThirdBatch:
        # Test harness: the real encoder, but the process dies in its 3rd encode call,
        # after two batches were embedded and committed to the cache.
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.model_name, self.dim, self.device = inner.model_name, inner.dim, inner.device

        def encode(self, images):
            self.calls += 1
            if self.calls == 3:
                os._exit(1)
            return self.inner.encode(images)

    class Storage:
        def __init__(self, frame):
            self.frame = frame
        def read(self, kind):
            return self.frame
        def write(self, frame):
            raise AssertionError("the child must die before writing")

    model, table, cache_dir = sys.argv[1:4]
    encoder = DieOnThirdBatch(CLIPEncoder(model, device="cpu", batch_size=8))
    paths = json.loads(open(table).read())
    filt = ImageDeduplicateFilter(
        threshold=0.9999, batch_size=2, encoder=encoder, cache_dir=cache_dir
    )
    filt.run(Storage(pd.DataFrame({"image": paths, "id": range(len(paths))})))
    """
)


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, ten_photos, tiny_clip, encoder):
    cache_dir = tmp_path / "emb-cache"
    table = tmp_path / "paths.json"
    table.write_text(json.dumps(ten_photos))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEDUP_INDEX_PROGRESS": "0"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, tiny_clip, str(table), str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert child.returncode == 1, child.stderr
    with EmbeddingCache(cache_dir, model_name=model_identity(tiny_clip)) as cache:
        committed = len(cache)
    assert committed == 4  # two batches of two made it to disk before the crash

    resumed, out = run_filter(ten_photos, encoder, batch_size=2, cache_dir=cache_dir)
    assert resumed.last_report.cached == committed
    assert resumed.last_report.embedded == len(ten_photos) - committed
    plain, out_plain = run_filter(ten_photos, encoder, batch_size=2)
    assert_same_result(plain, out_plain, resumed, out)


def test_a_cache_of_another_model_is_refused_or_reset(tmp_path, ten_photos, encoder, caplog):
    cache_dir = tmp_path / "emb-cache"
    with EmbeddingCache(cache_dir, model_name="some/other-model", dim=32) as other:
        other.add(["sha256:00"], np.eye(1, 32, dtype=np.float32))

    with pytest.raises(CacheModelMismatchError, match="some/other-model") as err:
        ImageDeduplicateFilter(encoder=encoder, cache_dir=cache_dir)
    assert encoder.model_name in str(err.value) and "on_model_change='reset'" in str(err.value)
    with pytest.raises(CacheModelMismatchError, match="dimension 32"):
        EmbeddingCache(cache_dir, model_name="some/other-model", dim=512)

    with caplog.at_level(logging.WARNING, logger="dedup_index"):
        filt, _ = run_filter(ten_photos[:3], encoder, cache_dir=cache_dir, on_model_change="reset")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("EMBEDDING CACHE RESET" in w and "some/other-model" in w for w in warnings)
    (stale,) = tmp_path.glob("emb-cache.stale-*")
    with EmbeddingCache(stale, model_name="some/other-model") as old:
        assert len(old) == 1  # moved aside intact, not deleted
    assert filt.last_report.embedded == 3
    with EmbeddingCache(cache_dir, model_name=model_identity(encoder.model_name)) as fresh:
        assert len(fresh) == 3


# ------------------------------------------------------------------ the cache itself


def test_fingerprints(tmp_path):
    img = photo("coffee")
    data = jpeg_bytes(img)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    fp = fingerprint(str(path))
    assert fp == f"path:{os.path.realpath(path)}:{len(data)}:{os.stat(path).st_mtime_ns}"
    assert fingerprint("x.jpg", tmp_path) == fingerprint(path) == fp
    link = tmp_path / "link.jpg"
    link.symlink_to(path)
    assert fingerprint(link) == fp  # resolved
    assert fingerprint(data) == fingerprint({"bytes": data, "path": "y.jpg"})
    assert fingerprint(data).startswith("sha256:")
    assert fingerprint({"bytes": None, "path": "x.jpg"}, tmp_path) == fp
    arr = np.asarray(img)
    assert fingerprint(arr) == fingerprint(arr.copy()) != fingerprint(arr[:, ::-1])
    assert fingerprint(arr) != fingerprint(arr.reshape(arr.shape[1], arr.shape[0], 3))
    assert fingerprint(img) == fingerprint(img.copy()) != fingerprint(img.convert("L"))
    assert fingerprint(img, max_pixels=100) is None
    for uncacheable in ["https://example.org/a.jpg", tmp_path / "missing.jpg", tmp_path, b"", 7]:
        assert fingerprint(uncacheable) is None


def test_lookup_and_add(tmp_path, caplog):
    rng = np.random.default_rng(0)
    E = rng.standard_normal((4, 8)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    path = tmp_path / "c"
    with EmbeddingCache(path, model_name="m") as cache:
        assert cache.dim is None and len(cache) == 0
        assert cache.add(["a", None, "b", "a"], E, pixels=[10, 10, 20, 10]) == 2
        assert cache.add(["b", "c"], E[2:], pixels=[20, 30]) == 1  # "b" keeps its first row
        assert len(cache) == 3 and cache.dim == 8
    with EmbeddingCache(path, model_name="m") as cache:
        found, rows = cache.lookup(["c", "zz", None, "a", "b"])
        assert found.tolist() == [True, False, False, True, True]
        np.testing.assert_array_equal(rows, E[[3, 0, 2]])  # bit for bit
        found, _ = cache.lookup(["a", "b", "c"], max_pixels=20)
        assert found.tolist() == [True, True, False]
        with caplog.at_level(logging.WARNING, logger="dedup_index"):
            second = EmbeddingCache(path, model_name="m")  # the first holds the lock
        with second:
            assert not second.writable and "read-only" in caplog.text
            assert second.lookup(["a"])[0].tolist() == [True]
            assert second.add(["d"], E[:1]) == 0
    with pytest.raises(ValueError, match="columns"):
        EmbeddingCache(path, model_name="m").add(["e"], np.ones((1, 4), np.float32))


# -------------------------------------------------------------------------- progress


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_is_off_unless_watched_or_forced(monkeypatch):
    assert isinstance(progress(5, "x"), NullProgress)  # pytest's stderr is no terminal
    assert isinstance(progress(5, "x", enabled=False, file=FakeTerminal()), NullProgress)
    assert not isinstance(progress(5, "x", file=FakeTerminal()), NullProgress)
    monkeypatch.setenv("DEDUP_INDEX_PROGRESS", "0")
    assert isinstance(progress(5, "x", file=FakeTerminal()), NullProgress)

    out = io.StringIO()
    with progress(3, "embedding", enabled=True, file=out) as bar:  # forced beats the env
        bar.update(2)
        bar.update(1)
    text = out.getvalue()
    assert "embedding" in text and "3/3" in text and "img/s" in text

    with progress(3, "quiet") as bar:
        bar.update(3)
    assert bar.n == 3


@pytest.mark.parametrize("backend", ["flat", "partitioned", "blocked", "dense"])
def test_search_shows_a_rows_per_second_bar_when_asked(backend, capsys):
    rng = np.random.default_rng(0)
    E = rng.standard_normal((3000, 16)).astype(np.float32)
    dedup_embeddings(E, 0.99, backend=backend, progress=True)
    err = capsys.readouterr().err
    assert "search" in err and "3000/3000" in err and "rows/s" in err
    dedup_embeddings(E, 0.99, backend=backend)  # None: stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_rows_of_another_precision_never_mix_with_fp32_rows(tmp_path, ten_photos, tiny_clip):
    """The cache keys on the arithmetic too (issue 16): bf16 rows are not fp32 rows."""
    from dedup_index.encode.cache import encoder_identity
    from dedup_index.encode.clip import CLIPEncoder

    fp32 = CLIPEncoder(tiny_clip, device="cpu", precision="fp32")
    bf16 = CLIPEncoder(tiny_clip, device="cpu", precision="bf16")
    assert encoder_identity(tiny_clip, fp32) == model_identity(tiny_clip)
    assert encoder_identity(tiny_clip, bf16) == model_identity(tiny_clip) + " [cpu bf16]"
    cache_dir = tmp_path / "emb-cache"
    run_filter(ten_photos[:2], fp32, cache_dir=cache_dir)
    with pytest.raises(CacheModelMismatchError, match="bf16"):
        ImageDeduplicateFilter(encoder=bf16, cache_dir=cache_dir)
