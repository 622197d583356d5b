"""The README's Python snippets and the examples run as written.

Every ```python block of README.md runs as a script in a fresh folder that holds what a
reader would have: an ``images/`` folder of real photos (with a copy), ``images.jsonl``
listing them, ``embeddings.npy``, and a local Hugging Face cache in which a tiny CLIP
stands in for ``openai/clip-vit-base-patch32`` (no hub here).  Each script in
``examples/`` runs the way its docstring says, after the demo (``make demo``) has written
``demo_output/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes, photo

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
HUB_ID = "openai/clip-vit-base-patch32"
REVISION = "0" * 40


@pytest.fixture(scope="module")
def reader_folder(tmp_path_factory) -> Path:
    """What a README reader has at hand, built once; each test copies it."""
    from dedup_index.encode.tiny import make_tiny_clip

    root = tmp_path_factory.mktemp("reader")
    images = root / "images"
    images.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]
    for name in names:
        (images / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name, 200)))
    (images / "coffee_copy.jpg").write_bytes((images / "coffee.jpg").read_bytes())
    rows = [{"image": f"images/{p.name}"} for p in sorted(images.glob("*.jpg"))]
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(0)
    E = rng.standard_normal((150, 64)).astype(np.float32)
    E[120:130] = E[:10] + 0.01 * rng.standard_normal((10, 64)).astype(np.float32)
    np.save(root / "embeddings.npy", E)
    # A local Hugging Face cache holding the default model id (a tiny CLIP under its name).
    repo = root / "hf" / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    make_tiny_clip(repo / "snapshots" / REVISION)
    return root


def run_script(script: Path, cwd: Path, *args: str, hf_home: Path | None = None):
    env = {**os.environ, "DEDUP_INDEX_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("k", range(len(BLOCKS)), ids=lambda k: f"block{k}")
def test_every_python_block_of_the_readme_runs(reader_folder, tmp_path, k):
    work = tmp_path / "work"
    shutil.copytree(reader_folder, work, ignore=shutil.ignore_patterns("hf"))
    script = work / f"readme_block_{k}.py"
    script.write_text(BLOCKS[k])
    done = run_script(script, work, hf_home=reader_folder / "hf")
    assert done.returncode == 0, f"README block {k}:\n{BLOCKS[k]}\n{done.stderr[-3000:]}"


def test_the_readme_has_the_blocks_this_test_prepares_for():
    assert len(BLOCKS) >= 6
    assert any("FileStorage" in b for b in BLOCKS)


@pytest.fixture(scope="module")
def after_make_demo(tmp_path_factory) -> Path:
    """A folder as `make demo` leaves the repository: demo_output/ written by the demo."""
    root = tmp_path_factory.mktemp("clone")
    script = Path(sys.executable).with_name("dedup-index")
    done = subprocess.run(
        [str(script), "demo", "--out", str(root / "demo_output")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DEDUP_INDEX_PROGRESS": "0"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_example_dataflow_pipeline_runs_after_make_demo(after_make_demo):
    done = run_script(REPO / "examples" / "dataflow_pipeline.py", after_make_demo)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['image', 'max_similarity']" in done.stdout
    assert (after_make_demo / "demo_output" / "cache_local").is_dir()


def test_example_dedup_embeddings_runs(reader_folder, tmp_path):
    shutil.copy(reader_folder / "embeddings.npy", tmp_path / "E.npy")
    done = run_script(REPO / "examples" / "dedup_embeddings.py", tmp_path, "E.npy", "0.99")
    assert done.returncode == 0, done.stderr[-3000:]
    keep = np.load(tmp_path / "E.keep.npy")
    assert keep.shape == (150,) and (~keep).sum() == 10


def test_example_cli_script_runs_and_writes_only_under_its_folder(tmp_path):
    before = set(REPO.iterdir())
    env = {**os.environ, "DEDUP_INDEX_PROGRESS": "0"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(REPO / "examples" / "cli.sh"), str(tmp_path / "cli")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "cli" / "report.html").is_file()
    assert "verify: PASS" in done.stdout
    assert set(REPO.iterdir()) == before
