"""Fuzzing the operator and the command line with hostile tables and damaged images.

Hypothesis draws tables (random column names next to the image column, values of every
type: paths that exist or not, odd characters, None, numbers, lists, dicts) and image bytes
(valid JPEG/PNG/GIF/WebP, truncated, with random bytes flipped).  Every run must end,
account for every row (kept + removed + failed = rows in), give every removed row a reason,
and raise nothing but the documented errors.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import COPY_THRESHOLD, MemoryStorage, photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index.errors import NoValidImagesError

FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
_SOURCES = {}


def _encoded(fmt: str) -> bytes:
    if fmt not in _SOURCES:
        buf = io.BytesIO()
        photo("coffee", 48).convert("RGB").save(buf, fmt)
        _SOURCES[fmt] = buf.getvalue()
    return _SOURCES[fmt]


@st.composite
def image_bytes(draw) -> bytes:
    data = bytearray(_encoded(draw(st.sampled_from(FORMATS))))
    how = draw(st.sampled_from(["intact", "truncated", "flipped", "both"]))
    if how in ("truncated", "both"):
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how in ("flipped", "both") and data:
        for _ in range(draw(st.integers(1, 8))):
            k = draw(st.integers(0, len(data) - 1))
            data[k] ^= draw(st.integers(1, 255))
    return bytes(data)


def image_values(folder: Path):
    names = st.sampled_from(["a.jpg", "b.png", "missing.jpg", "sub/../a.jpg", "dir", ""])
    odd = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
    return st.one_of(
        names,
        odd,
        image_bytes(),
        st.none(),
        st.integers(),
        st.floats(allow_nan=True),
        st.lists(st.integers(), max_size=3),
        st.fixed_dictionaries({"bytes": st.one_of(st.none(), image_bytes()), "path": names}),
    )


def column_names():
    return st.lists(
        st.sampled_from(
            ["row", "similarity", "error", "reject_reason", "duplicate_of", "id", "x y", "é"]
        ),
        max_size=3,
        unique=True,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    photo("coffee", 64).convert("RGB").save(root / "a.jpg")
    photo("rocket", 64).convert("RGB").save(root / "b.png")
    (root / "dir").mkdir()
    return root


@pytest.fixture(scope="module")
def filt(encoder, folder):
    from dedup_index import ImageDeduplicateFilter

    return ImageDeduplicateFilter(
        threshold=COPY_THRESHOLD, encoder=encoder, image_root=folder, num_workers=0
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_operator_accounts_for_every_row_of_any_table(filt, folder, data):
    n = data.draw(st.integers(1, 8))
    values = data.draw(st.lists(image_values(folder), min_size=n, max_size=n))
    extra = data.draw(column_names())
    frame = pd.DataFrame({"image": pd.Series(values, dtype=object)})
    for name in extra:
        frame[name] = [f"{name}-{k}" for k in range(n)]
    storage = MemoryStorage(frame)
    try:
        filt.run(storage)
    except NoValidImagesError:
        assert not storage.written  # nothing written when nothing loads
        return
    report = filt.last_report
    (out,) = storage.written
    assert report.kept == len(out)
    assert report.kept + report.removed_duplicates + report.failed == report.rows_in == n
    rejects = report.rejects
    assert len(rejects) == report.removed_duplicates + report.failed
    assert rejects["reject_reason"].isin(["duplicate", "load_error"]).all()
    assert rejects.loc[rejects["reject_reason"] == "load_error", "error"].notna().all()
    for name in extra:  # the user's columns survive, under their name or input:<name>
        col = (
            name
            if name not in ("row", "similarity", "error", "reject_reason", "duplicate_of")
            else f"input:{name}"
        )
        assert col in rejects.columns or not len(rejects)


@pytest.mark.parametrize("seed", range(3))
def test_the_command_line_on_fuzzed_tables(folder, tmp_path, seed):
    """A few fuzzed tables through `dedup-index run`, as JSONL: exit 0 (or 2 when nothing
    loads, with a message), never a traceback, rows accounted for."""
    import random

    rng = random.Random(seed)
    values = []
    for k in range(6):
        kind = rng.choice(["ok", "missing", "broken", "number", "odd"])
        values.append(
            {
                "ok": rng.choice(["a.jpg", "b.png"]),
                "missing": f"nope{k}.jpg",
                "broken": "dir",
                "number": rng.randint(-5, 5),
                "odd": "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(5)),
            }[kind]
        )
    table = tmp_path / "t.jsonl"
    pd.DataFrame({"image": values, "row": range(6)}).to_json(table, orient="records", lines=True)
    cli = str(Path(sys.executable).with_name("dedup-index"))
    done = subprocess.run(
        [cli, "run", str(table), "--image-root", str(folder), "--model", "efficientnet-lite0",
         "--removed", str(tmp_path / "removed.jsonl"), "--out", str(tmp_path / "kept.jsonl")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DEDUP_INDEX_PROGRESS": "0"},
    )  # fmt: skip
    assert "Traceback" not in done.stderr
    if done.returncode == 2:
        assert "could be loaded" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    kept = pd.read_json(tmp_path / "kept.jsonl", lines=True)
    removed = pd.read_json(tmp_path / "removed.jsonl", lines=True)
    assert len(kept) + len(removed) == 6
    assert sorted(kept["row"].tolist() + removed["input:row"].tolist()) == list(range(6))
