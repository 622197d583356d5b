"""What a new user meets in the first hour: one threshold story, one row numbering, messages
in the caller's language, outputs that refuse what they cannot write, honest thumbnails.

Real photos, the real offline model, the installed console script in subprocesses.
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
from conftest import jpeg_bytes, photo

CLI = str(Path(sys.executable).with_name("dedup-index"))
MODEL = "efficientnet-lite0"


def cli(*args, env=None, cwd=None):
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "DEDUP_INDEX_PROGRESS": "0", **(env or {})},
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A broken file sorted first (so loaded and input rows differ), 3 photos, 1 copy."""
    root = tmp_path_factory.mktemp("first-hour")
    (root / "a_broken.jpg").write_bytes(b"not a jpeg")
    for name in ("astronaut", "coffee", "rocket"):
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name, 200)))
    (root / "z_copy.jpg").write_bytes((root / "coffee.jpg").read_bytes())
    return root


def test_the_models_threshold_is_used_and_said_without_one(folder, tmp_path):
    from dedup_index.encode.models import recommended_threshold

    done = cli("run", folder, "--model", MODEL, "--no-progress", "--pairs", tmp_path / "p.parquet")
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("5 rows in, 3 kept, 1 removed as near-duplicates, 1 failed to load")
    assert "threshold 0.75 (recommended for efficientnet-lite0)" in last
    assert recommended_threshold(MODEL)[0] == 0.75
    assert recommended_threshold("openai/clip-vit-base-patch32")[0] == 0.90
    assert recommended_threshold("/some/other/model")[0] == 0.90
    # Given explicitly: no note.
    done = cli("run", folder, "--model", MODEL, "--threshold", "0.8", "--no-progress")
    assert done.returncode == 0 and "recommended" not in done.stdout
    # --help and the README quote the same numbers.
    help_text = cli("run", "--help").stdout
    assert "0.75 for efficientnet-lite0" in help_text and "0.9 for openai/clip" in help_text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "0.75 for efficientnet-lite0" in readme and "0.90 for CLIP ViT-B/32" in readme


def test_one_row_numbering_in_report_removed_and_pairs(folder, tmp_path):
    out = tmp_path / "out"
    done = cli(
        "run", folder, "--model", MODEL, "--no-progress", "--removed", out / "removed.jsonl",
        "--pairs", out / "pairs.parquet", "--report", out / "report.html",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    removed = pd.read_json(out / "removed.jsonl", lines=True)
    dup = removed[removed["reject_reason"] == "duplicate"].iloc[0]
    assert (dup["row"], dup["duplicate_of_row"]) == (4, 2)  # input rows: broken file is row 0
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert (pairs["i"].tolist(), pairs["j"].tolist()) == ([2], [4])
    assert pairs["similarity"].max() <= 1.0  # a copy: shown as 1.0, never 1.00000003
    html = (out / "report.html").read_text()
    data = json.loads(html.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    assert sorted(data["r"]) == [2, 4] and set(data["k"]) == {"coffee.jpg", "z_copy.jpg"}
    assert "<th>row</th>" in html  # the failures table shows the input row too
    # No summary row twice, no "dry run False".
    labels = [
        line.split("<th>", 1)[1].split("</th>", 1)[0] for line in html.split('<tr id="sum-')[1:]
    ]
    assert len(labels) == len(set(labels)) and "dry run" not in labels


def test_outputs_it_cannot_write_are_refused_before_any_work(folder, tmp_path):
    for args, message in [
        (["--out", tmp_path / "kept.xlsx"], "cannot write .xlsx files; use .jsonl, .json"),
        (["--removed", tmp_path / "removed.txt"], "--removed"),
        (["--pairs", tmp_path / "pairs.csv"], ".parquet"),
    ]:
        done = cli("run", folder, "--model", MODEL, *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not any(tmp_path.iterdir())


def test_messages_speak_the_callers_language(folder, tmp_path):
    done = cli("run", folder, "--model", "efficentnet-lite0")
    assert done.returncode == 2
    assert "did you mean --model efficientnet-lite0?" in done.stderr
    done = cli("run", folder, "--out", tmp_path / "k.jsonl", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "--model efficientnet-lite0" in done.stderr
    assert "OSError" not in done.stderr and "model_name" not in done.stderr
    done = cli("run", folder, "--model", MODEL, "--workers", "-1")
    assert done.returncode == 2 and "--workers must be" in done.stderr
    # From Python, parameter names.
    from dedup_index.encode import load_encoder
    from dedup_index.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="did you mean model_name='efficientnet-lite0'"):
        load_encoder("efficentnet-lite0")


def test_missing_thumbnails_are_said_not_claimed(folder, tmp_path, caplog):
    from dedup_index import dedup_embeddings
    from dedup_index.report import write_report

    E = np.eye(3, 8, dtype=np.float32)
    E[2] = E[0]
    result = dedup_embeddings(E, 0.9)
    keys = ["images/coffee.jpg", "images/rocket.jpg", "images/z_copy.jpg"]
    out = write_report(
        tmp_path / "r.html", result=result, keys=keys, values=keys, image_root=folder
    )  # paths that already start with images/ under an image_root without it
    html = out.read_text()
    assert "Every group shown has thumbnails" not in html
    assert "2 of the 2 images meant for thumbnails could not be loaded" in html
    assert "images/coffee.jpg" in caplog.text or "coffee.jpg" in html


def test_index_add_prints_its_decisions(folder, tmp_path):
    index = tmp_path / "i.index"
    assert cli("index", "create", index, "--model", MODEL).returncode == 0
    assert json.loads(cli("index", "stats", index).stdout)["threshold"] == 0.75
    done = cli("index", "add", index, folder)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["key"]).name for r in rows] == [
        "astronaut.jpg",
        "coffee.jpg",
        "rocket.jpg",
        "z_copy.jpg",
        "a_broken.jpg",  # every image that did not load is a row too, with its error
    ]
    assert [r["kept"] for r in rows] == [True, True, True, False, None]
    assert rows[3]["similarity"] == 1.0 and Path(rows[3]["duplicate_of"]).name == "coffee.jpg"
    assert rows[4]["error"].startswith("not_an_image")
