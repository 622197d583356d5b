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
        }
    )
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, image_root=photo_dir)
    filt.run(MemoryStorage(frame))
    rejects = filt.last_report.rejects
    assert rejects["row"].tolist() == [1]  # ours
    assert rejects["input:row"].tolist() == ["mine-1"]  # theirs, verbatim
    assert rejects["input:similarity"].tolist() == ["s1"]
    assert rejects["input:error"].tolist() == ["e1"]


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


@pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges from root to test permissions")
def test_an_unreadable_subfolder_is_reported_not_silently_skipped(tmp_path):
    """Run as 'nobody' (root reads everything) on a folder with one unreadable subfolder."""
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to drop to")
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg_bytes(photo("coffee", 64)))
    (root / "locked" / "b.jpg").write_bytes(jpeg_bytes(photo("rocket", 64)))
    for p in (tmp_path, root, root / "a.jpg"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (root / "locked").chmod(0o700)
    probe = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING);"
        "from dedup_index.io.inputs import list_images; print(list_images(sys.argv[1]))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe, str(root)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)),
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
    except PermissionError as exc:  # the interpreter lives where 'nobody' cannot go
        pytest.skip(f"'nobody' cannot run {sys.executable}: {exc}")
    if "PermissionError" in done.stderr and "a.jpg" not in done.stdout:
        pytest.skip(f"'nobody' cannot run the interpreter here: {done.stderr[-300:]}")
    assert "['a.jpg']" in done.stdout, done.stderr
    assert "could not be read" in done.stderr and "locked" in done.stderr


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
