"""Hostile input and damaged files: nothing hangs, nothing is lost or overwritten unsaid.

Real FIFOs, real non-UTF-8 file names, real symlinked folders, real dead writers' temp
files, the installed console script in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import COPY_THRESHOLD, MemoryStorage, jpeg_bytes, photo

CLI = str(Path(sys.executable).with_name("dedup-index"))
MODEL = "efficientnet-lite0"


def cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "DEDUP_INDEX_PROGRESS": "0"},
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """Two photos and a copy, a FIFO named like an image, a file whose name is not UTF-8,
    and a symlinked subfolder."""
    root = tmp_path_factory.mktemp("hostile")
    for name in ("coffee", "rocket"):
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name, 160)))
    (root / "sub").mkdir()
    (root / "sub" / "coffee_copy.jpg").write_bytes((root / "coffee.jpg").read_bytes())
    os.mkfifo(root / "pipe.jpg")
    bad_name = os.fsdecode(b"caf\xe9.jpg")
    (root / bad_name).write_bytes(jpeg_bytes(photo("astronaut", 160)))
    (root / "linked").symlink_to(root / "sub", target_is_directory=True)
    return root


def test_a_fifo_and_a_non_utf8_name_neither_hang_nor_crash_a_folder_run(hostile, tmp_path):
    out = tmp_path / "out"
    done = cli(
        "run", hostile, "--model", MODEL, "--out", out / "kept.jsonl",
        "--removed", out / "removed.jsonl", "--pairs", out / "pairs.parquet",
        "--report", out / "report.html", timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        .splitlines()[-1]
        .startswith("5 rows in, 3 kept, 1 removed as near-duplicates, 1 failed to load")
    )
    kept = pd.read_json(out / "kept.jsonl", lines=True)
    assert "caf\\xe9.jpg" in kept["image"].tolist()  # written as valid UTF-8, \xNN escaped
    removed = pd.read_json(out / "removed.jsonl", lines=True)
    fifo = removed[removed["image"] == "pipe.jpg"].iloc[0]
    assert fifo["reject_reason"] == "load_error" and "not_a_regular_file" in fifo["error"]
    # The symlinked folder is not followed, and the user is told.
    assert "symlinked folder(s)" in done.stderr and "linked" in done.stderr


def test_a_fifo_hangs_neither_worker_processes_nor_a_cached_run(hostile, tmp_path):
    """The hang was with any --workers, with or without --cache."""
    out = tmp_path / "out"
    done = cli(
        "run", hostile, "--model", MODEL, "--workers", "2", "--cache", tmp_path / "cache",
        "--out", out / "kept.jsonl", "--removed", out / "removed.jsonl", timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "5 rows in, 3 kept, 1 removed as near-duplicates, 1 failed to load" in done.stdout
    removed = pd.read_json(out / "removed.jsonl", lines=True)
    assert "not_a_regular_file" in removed[removed["image"] == "pipe.jpg"].iloc[0]["error"]


def test_index_add_survives_hostile_files_and_names_every_failure(tmp_path):
    """`index add` with a FIFO, a non-UTF-8 name and seven failures: no hang, no crash,
    every failure in stdout and in --out (it named only the first five, --out none);
    repeated keys in one batch and a list file that is not UTF-8 are exit 2 (were 1)."""
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("coffee", "rocket"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name, 96)))
    os.mkfifo(folder / "pipe.jpg")
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg_bytes(photo("astronaut", 96)))
    for i in range(6):
        (folder / f"broken{i}.jpg").write_text("not an image")
    index = tmp_path / "idx"
    assert cli("index", "create", index, "--model", MODEL, "--threshold", "0.95").returncode == 0
    done = cli("index", "add", index, "f", "--out", tmp_path / "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 kept, 0 near-duplicates, 7 failed to load" in done.stdout
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = {r["key"]: r["error"] for r in rows if r.get("error")}
    assert len(failed) == 7 and "not_a_regular_file" in failed["f/pipe.jpg"]
    assert "f/caf\\xe9.jpg" in {r["key"] for r in rows if r["kept"]}
    written = pd.read_json(tmp_path / "out.jsonl", lines=True)
    assert len(written) == 10 and written["error"].notna().sum() == 7
    (tmp_path / "dup.txt").write_text("f/coffee.jpg\nf/coffee.jpg\n")
    done = cli("index", "add", index, tmp_path / "dup.txt", cwd=tmp_path)
    assert done.returncode == 2 and "repeat" in done.stderr, done.stderr
    (tmp_path / "latin1.txt").write_bytes(b"f/caf\xe9.jpg\n")
    done = cli("index", "add", index, tmp_path / "latin1.txt", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "latin1.txt" in done.stderr and "not UTF-8 text (line 1, byte 0xe9)" in done.stderr


def test_a_table_row_naming_a_fifo_gets_a_reason(hostile, encoder):
    from dedup_index import ImageDeduplicateFilter

    storage = MemoryStorage(pd.DataFrame({"image": ["coffee.jpg", "pipe.jpg", "rocket.jpg"]}))
    filt = ImageDeduplicateFilter(
        threshold=COPY_THRESHOLD, encoder=encoder, image_root=hostile, num_workers=1
    )
    filt.run(storage)
    (failure,) = filt.last_report.failures
    assert failure[0] == 1 and failure[1].reason == "not_a_regular_file"


def test_the_users_columns_are_never_overwritten_by_ours(photo_dir, encoder):
    from dedup_index import ImageDeduplicateFilter

    frame = pd.DataFrame(
        {
            "image": ["a.jpg", "a_copy.jpg"],
            "row": ["mine-0", "mine-1"],
            "similarity": ["s0", "s1"],
            "error": ["e0", "e1"],
            "reject_reason": ["r0", "r1"],
            "duplicate_of": ["d0", "d1"],
        }
    )
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, image_root=photo_dir)
    filt.run(MemoryStorage(frame))
    rejects = filt.last_report.rejects
    assert rejects["row"].tolist() == [1]  # ours
    assert rejects["input:row"].tolist() == ["mine-1"]  # theirs, verbatim
    assert rejects["input:similarity"].tolist() == ["s1"]
    assert rejects["input:error"].tolist() == ["e1"]
    assert rejects["input:reject_reason"].tolist() == ["r1"]
    assert rejects["input:duplicate_of"].tolist() == ["d1"]
    assert rejects["reject_reason"].tolist() == ["duplicate"]


def test_an_output_naming_an_input_image_is_refused(hostile, tmp_path):
    for option in ("--report", "--out", "--pairs"):
        target = hostile / "rocket.jpg"
        before = target.read_bytes()
        done = cli("run", hostile, "--model", MODEL, option, target)
        assert done.returncode == 2, done.stderr
        assert "one of the input's images" in done.stderr or "cannot write .jpg" in done.stderr
        assert target.read_bytes() == before


def test_outputs_appear_together_or_not_at_all(tmp_path):
    from dedup_index.files import StagedWrites

    (tmp_path / "kept.jsonl").write_text("old run\n")
    with pytest.raises(RuntimeError), StagedWrites() as staged:
        Path(staged.path(tmp_path / "kept.jsonl")).write_text("new run\n")
        Path(staged.path(tmp_path / "pairs.parquet")).write_text("new pairs\n")
        raise RuntimeError("the report failed")
    assert (tmp_path / "kept.jsonl").read_text() == "old run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl"]
    with StagedWrites() as staged:
        Path(staged.path(tmp_path / "kept.jsonl")).write_text("new run\n")
        Path(staged.path(tmp_path / "sub" / "pairs.parquet")).write_text("new pairs\n")
    assert (tmp_path / "kept.jsonl").read_text() == "new run\n"
    assert (tmp_path / "sub" / "pairs.parquet").read_text() == "new pairs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "sub"]


def test_a_dead_writers_temp_files_are_cleaned_up_by_the_next_write(tmp_path):
    from dedup_index.files import atomic_write_bytes, temp_prefix

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)  # fmt: skip
    dead_pid = int(child.stdout)
    host = temp_prefix().split("-")[1]
    leftover = tmp_path / f".tmp-{host}-{dead_pid}-abc-kept.jsonl"
    leftover.write_text("half a file")
    other_host = tmp_path / f".tmp-otherhost-{dead_pid}-abc"
    other_host.write_text("maybe a live writer elsewhere")
    atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert not leftover.exists() and other_host.exists()


def test_index_query_into_head_ends_quietly(tmp_path):
    index = tmp_path / "v.index"
    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.standard_normal((400, 8)).astype(np.float32))
    assert cli("index", "create", index, "--dim", "8", "--threshold", "0.5").returncode == 0
    assert cli("index", "add", index, tmp_path / "e.npy").returncode == 0
    done = subprocess.run(
        f"{CLI} index query {index} {tmp_path / 'e.npy'} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(done.stdout)["query"] == "e:0"
    assert "BrokenPipe" not in done.stderr and "failed" not in done.stderr


def _as_nobody(work) -> dict:
    """Run ``work()`` in a forked child that has dropped to uid/gid 65534 ('nobody'), and
    return what it returns (a JSON-able dict) plus the WARNINGs it logged.  No exec: the
    child keeps this interpreter and every module already imported, so it does not matter
    whether 'nobody' could start the venv's interpreter."""
    import io
    import logging

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            log = io.StringIO()
            handler = logging.StreamHandler(log)
            handler.setLevel(logging.WARNING)
            logging.getLogger("dedup_index").addHandler(handler)
            try:
                result = {"result": work()}
            except BaseException as exc:  # noqa: BLE001 - sent to the parent to assert on
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["log"] = log.getvalue()
            with os.fdopen(write_end, "w") as out:
                json.dump(result, out)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        payload = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and payload, payload
    return json.loads(payload)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges from root to test permissions")
def test_an_unreadable_subfolder_is_reported_not_silently_skipped():
    """As 'nobody' (root reads everything) on a folder with one unreadable subfolder: the
    folder is named in a WARNING; an unreadable top-level folder is an exit-2 error, not
    "no image files"."""
    import contextlib
    import io
    import shutil
    import tempfile

    from dedup_index.cli import main
    from dedup_index.io.inputs import list_images

    base = Path(tempfile.mkdtemp())  # not under pytest's 0700 tmp root: 'nobody' must reach it
    try:
        root = base / "photos"
        (root / "locked").mkdir(parents=True)
        (root / "a.jpg").write_bytes(jpeg_bytes(photo("coffee", 64)))
        (root / "locked" / "b.jpg").write_bytes(jpeg_bytes(photo("rocket", 64)))
        (base / "out").mkdir()
        for p in (base, root, root / "a.jpg"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (base / "out").chmod(0o777)
        (root / "locked").chmod(0o000)

        seen = _as_nobody(lambda: list_images(root))
        assert seen.get("result") == ["a.jpg"], seen
        assert "could not be read" in seen["log"] and str(root / "locked") in seen["log"]

        def cli_on_locked_top() -> dict:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["run", str(root / "locked"), "--model", MODEL,
                             "--out", str(base / "out" / "kept.jsonl")])  # fmt: skip
            return {"code": code, "stderr": err.getvalue()}

        top = _as_nobody(cli_on_locked_top)["result"]
        assert top["code"] == 2, top
        assert "cannot read the folder" in top["stderr"] and "permission denied" in top["stderr"]
        assert "locked" in top["stderr"] and "no image files" not in top["stderr"]
        assert not (base / "out" / "kept.jsonl").exists()
    finally:
        (root / "locked").chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges from root to test permissions")
def test_a_read_only_output_folder_fails_before_any_work():
    """It failed only after all the embedding, naming a temp file.  As 'nobody', so that
    the folder really is read-only (root writes anywhere)."""
    import contextlib
    import io
    import shutil
    import tempfile

    from dedup_index.cli import main

    base = Path(tempfile.mkdtemp())
    try:
        (base / "photos").mkdir()
        (base / "photos" / "a.jpg").write_bytes(jpeg_bytes(photo("coffee", 64)))
        (base / "ro").mkdir()
        for p in (base, base / "photos", base / "ro"):
            p.chmod(0o755)
        (base / "photos" / "a.jpg").chmod(0o644)

        def run() -> dict:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["run", str(base / "photos"), "--model", "no/such-model",
                             "--out", str(base / "ro" / "kept.jsonl")])  # fmt: skip
            return {"code": code, "stderr": err.getvalue()}

        got = _as_nobody(run)["result"]
        # Exit 2 naming the folder, before the (unloadable) model is even tried.
        assert got["code"] == 2 and str(base / "ro") in got["stderr"], got
        assert "such-model" not in got["stderr"] and ".tmp-" not in got["stderr"]
        assert list((base / "ro").iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_a_read_that_does_not_finish_in_time_gets_read_timeout(tmp_path, monkeypatch):
    """Item 2: no regular file that really blocks a read can be made here (no FUSE; Linux has
    no mandatory locks), so the timeout is tested through the same code on a slow source:
    a 1 GiB sparse file (its read copies a gigabyte) against a 1 ms deadline."""
    import time

    from dedup_index.io import images
    from dedup_index.io.images import ImageLoadError, open_regular_file, try_load_image

    slow = tmp_path / "slow.jpg"
    with open(slow, "wb") as f:
        f.truncate((1 << 30) - 1)  # just under the size cap, so only the deadline can stop it
    small = tmp_path / "small.jpg"
    small.write_bytes(jpeg_bytes(photo("coffee", 64)))
    t0 = time.perf_counter()
    with pytest.raises(ImageLoadError) as caught:
        open_regular_file(slow, timeout=0.001)
    assert caught.value.failure.reason == "read_timeout"
    assert "did not finish within 0.001 s" in str(caught.value) and "slow.jpg" in str(caught.value)
    assert time.perf_counter() - t0 < 0.5  # it did not wait for the read
    # The next file gets a fresh reader (the stuck one is abandoned) and reads normally.
    assert open_regular_file(small).read() == small.read_bytes()
    # The default is read at each open, where the size cap is: the loader gives the reason.
    monkeypatch.setattr(images, "DEFAULT_READ_TIMEOUT", 0.001)
    image, failure = try_load_image(str(slow))
    assert image is None and failure.reason == "read_timeout"
    monkeypatch.setattr(images, "DEFAULT_READ_TIMEOUT", 60.0)
    image, failure = try_load_image(str(small))
    assert failure is None and max(image.size) == 64
    # Errors of the open itself still come through the reader thread as before.
    assert try_load_image(str(tmp_path / "missing.jpg"))[1].reason == "missing_file"
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout must be"):
            open_regular_file(small, timeout=bad)


@pytest.mark.parametrize("backend", ["dense", "blocked", "flat", "partitioned"])
def test_threshold_one_removes_every_exact_copy(backend):
    """200 random rows, each with an exact copy: at threshold 1.0 every copy goes (it was a
    coin flip when equal rows scored 1 - 1e-8), and no score exceeds 1.0."""
    from dedup_index import dedup_embeddings

    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 64)).astype(np.float32)
    E = np.concatenate([base, base[rng.permutation(200)]])
    result = dedup_embeddings(E, 1.0, backend=backend)
    assert result.n_removed == 200 and result.removed.min() == 200
    assert result.max_similarity.max() == 1.0 and (result.pairs.to_frame()["similarity"] == 1).all()


GLOBAL_SETTINGS_CHILD = """
import sys
import numpy as np
import torch
from dedup_index import dedup_embeddings
from dedup_index.testing import mixed_adversarial

E = mixed_adversarial(3, 300, 64, 0.9)
oracle = dedup_embeddings(E, 0.9, backend="dense")
if sys.argv[1] == "medium":
    torch.set_float32_matmul_precision("medium")
else:
    torch.backends.cuda.matmul.allow_tf32 = True
torch.set_num_threads(2)
for options in ({"engine": "torch"}, {"engine": "torch", "precision": "fp32"}):
    got = dedup_embeddings(E, 0.9, backend="blocked", backend_options=options, threads=1)
    assert np.array_equal(got.keep, oracle.keep)
    assert np.array_equal(got.max_similarity, oracle.max_similarity)
    assert got.pairs.equals(oracle.pairs)
    if sys.argv[1] == "medium":
        assert torch.get_float32_matmul_precision() == "medium"
    else:
        assert torch.backends.cuda.matmul.allow_tf32
print("ok")
"""


@pytest.mark.parametrize("setting", ["medium", "tf32"])
def test_global_torch_settings_neither_change_decisions_nor_are_left_changed(setting):
    """Issue 16: a caller's "medium" float32 matmul precision (oneDNN may then run float32
    products in bf16) or TF32 switch must not reach the candidate search, and the search
    gives the caller's settings back.  A child process: these settings are process-wide."""
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-c", GLOBAL_SETTINGS_CHILD, setting],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_cuda_asked_for_without_cuda_warns_and_searches_on_the_cpu(caplog):
    """Issue 16, item 1: it raised AssertionError("Torch not compiled with CUDA enabled")."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from dedup_index import dedup_embeddings
    from dedup_index.testing import mixed_adversarial

    E = mixed_adversarial(5, 120, 16, 0.9)
    oracle = dedup_embeddings(E, 0.9, backend="dense")
    for backend in ("blocked", "auto"):
        got = dedup_embeddings(E, 0.9, backend=backend, device="cuda")
        assert np.array_equal(got.keep, oracle.keep) and got.pairs.equals(oracle.pairs)
    assert "CUDA is not available: searching on the CPU" in caplog.text


def test_a_forked_child_reads_files_with_its_own_reader_thread(tmp_path):
    """Reads go through a reused reader thread; a forked worker (the verify stage forks)
    must not hand its reads to the parent's thread, which does not exist in the child."""
    from dedup_index.io.images import open_regular_file

    small = tmp_path / "small.jpg"
    small.write_bytes(jpeg_bytes(photo("coffee", 64)))
    assert open_regular_file(small).read() == small.read_bytes()  # the parent's reader
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = open_regular_file(small, timeout=10).read() == small.read_bytes()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
