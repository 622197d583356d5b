"""The DataFlow operator end to end: real files, real FileStorage, a real tiny CLIP."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import COPY_THRESHOLD, MemoryStorage, jpeg_bytes, photo

from dedup_index import (
    FileStorage,
    ImageDeduplicateFilter,
    ImagesFailedError,
    NoValidImagesError,
    dedup_embeddings,
)
from dedup_index.operator.storage import read_table, write_table


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_seed_example_through_filestorage(tmp_path, photo_dir, tiny_clip, monkeypatch):
    # SPEC.md's usage example, with only the import line changed (and the model path:
    # no hub here).  device="cuda" falls back to the CPU with a warning.
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        tmp_path / "images.jsonl",
        [
            {"image": str(photo_dir / n), "id": k}
            for k, n in enumerate(["a.jpg", "b.jpg", "a_copy.jpg"])
        ],
    )
    storage = FileStorage(
        first_entry_file_name="./images.jsonl",
        cache_path="./cache_local",
        file_name_prefix="image_dedupe_filter",
        cache_type="jsonl",
    )
    filt = ImageDeduplicateFilter(
        model_name=tiny_clip, threshold=COPY_THRESHOLD, batch_size=32, device="cuda"
    )
    cols = filt.run(
        storage=storage.step(), input_image_key="image", output_score_key="max_similarity"
    )
    assert cols == ["image", "max_similarity"]

    out = pd.read_json(tmp_path / "cache_local" / "image_dedupe_filter_step1.jsonl", lines=True)
    assert [Path(p).name for p in out["image"]] == ["a.jpg", "b.jpg"]
    assert list(out.columns) == ["image", "id", "max_similarity"]
    assert out["id"].tolist() == [0, 1]
    a_score, b_score = out["max_similarity"]
    assert a_score >= COPY_THRESHOLD  # its copy
    assert 0 < b_score < COPY_THRESHOLD  # the true nearest neighbour, not upstream's 0.0

    rejects = pd.read_json(
        tmp_path / "cache_local" / "image_dedupe_filter_step1_rejects.jsonl", lines=True
    )
    assert rejects["row"].tolist() == [2]
    assert rejects["reject_reason"].tolist() == ["duplicate"]
    assert Path(rejects["duplicate_of"][0]).name == "a.jpg"
    assert rejects["duplicate_of_row"].tolist() == [0]
    assert rejects["similarity"][0] >= COPY_THRESHOLD
    report = filt.last_report
    assert (report.rows_in, report.kept, report.removed_duplicates, report.failed) == (3, 2, 1, 0)


def test_reencoded_copy_is_removed_and_run_can_repeat(tmp_path, photo_dir, encoder):
    rows = [{"image": n} for n in ["a.jpg", "c.png", "b.jpg", "a_reenc.jpg", "a_copy.jpg"]]
    write_jsonl(tmp_path / "in.jsonl", rows)
    storage = FileStorage(str(tmp_path / "in.jsonl"), str(tmp_path / "cache"), "dd", "jsonl")
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, image_root=photo_dir)
    filt.run(storage.step())
    first = read_table(tmp_path / "cache" / "dd_step1.jsonl")
    assert first["image"].tolist() == ["a.jpg", "c.png", "b.jpg"]
    # A second run on the same instance (upstream deletes its model and fails here).
    filt.run(storage.step())
    second = read_table(tmp_path / "cache" / "dd_step2.jsonl")
    assert second["image"].tolist() == ["a.jpg", "c.png", "b.jpg"]
    assert filt.last_report.removed_duplicates == 0
    # Scores after the copies are gone are nearest-neighbour scores among the survivors.
    assert (second["max_similarity"] < COPY_THRESHOLD).all()


def test_score_pairs_reproduces_upstream_values(tmp_path, photo_dir, encoder):
    write_jsonl(tmp_path / "in.jsonl", [{"image": n} for n in ["a.jpg", "b.jpg", "a_copy.jpg"]])
    ours, up = [], []
    for score, sink in (("nearest", ours), ("pairs", up)):
        storage = FileStorage(str(tmp_path / "in.jsonl"), str(tmp_path / score), "x", "jsonl")
        ImageDeduplicateFilter(
            threshold=COPY_THRESHOLD, encoder=encoder, image_root=photo_dir, score=score
        ).run(storage.step())
        sink.extend(read_table(tmp_path / score / "x_step1.jsonl")["max_similarity"])
    assert up[0] == ours[0] >= COPY_THRESHOLD
    assert up[1] == 0.0 < ours[1]


@pytest.mark.parametrize("cache_type", ["jsonl", "json", "csv", "parquet", "pickle"])
def test_every_cache_type(tmp_path, photo_dir, encoder, cache_type):
    frame = pd.DataFrame(
        {
            "image": [str(photo_dir / n) for n in ["a.jpg", "a_copy.jpg", "b.jpg"]],
            "caption": ["x", "y", "z"],
        }
    )
    ext = {"pickle": "pkl"}.get(cache_type, cache_type)
    first = tmp_path / f"input.{ext}"
    write_table(frame, first, cache_type)
    storage = FileStorage(str(first), str(tmp_path / "c"), "p", cache_type)
    ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder).run(storage.step())
    out_path = tmp_path / "c" / f"p_step1.{cache_type}"
    assert out_path.exists()
    storage.step()
    out = storage.read("dataframe")
    assert out["caption"].tolist() == ["x", "z"]
    assert storage.read("dict")[0]["caption"] == "x"


def test_generic_storage_and_in_memory_image_values(photo_dir, encoder):
    a = (photo_dir / "a.jpg").read_bytes()
    values = [
        a,
        np.asarray(photo("coffee")),
        {"bytes": a, "path": None},
        photo("chelsea"),
        {"bytes": None, "path": str(photo_dir / "a_copy.jpg")},
    ]
    storage = MemoryStorage(pd.DataFrame({"img": values, "k": range(5)}))
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder)
    assert filt.run(storage, input_image_key="img", output_score_key="s") == ["img", "s"]
    (out,) = storage.written
    assert out["k"].tolist() == [0, 1, 3]
    assert filt.last_report.rejects_path is None
    rejects = filt.last_report.rejects
    assert rejects["row"].tolist() == [2, 4] and rejects["duplicate_of_row"].tolist() == [0, 0]
    assert rejects["img"][0].startswith('{"bytes": "base64:')  # lossless, as JSON
    assert rejects["img"][1].endswith("a_copy.jpg")


@pytest.fixture
def table_with_failures(tmp_path, photo_dir):
    (tmp_path / "notes.jpg").write_text("not an image at all")
    rows = [
        {"image": str(photo_dir / "a.jpg")},
        {"image": str(tmp_path / "missing.jpg")},
        {"image": str(tmp_path / "notes.jpg")},
        {"image": "https://example.invalid/x.jpg"},
        {"image": str(photo_dir / "a_copy.jpg")},
        {"image": str(photo_dir / "b.jpg")},
    ]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def test_load_failures_are_dropped_with_a_warning_and_a_record(
    tmp_path, table_with_failures, encoder, caplog
):
    storage = FileStorage(str(table_with_failures), str(tmp_path / "c"), "p", "jsonl")
    with caplog.at_level(logging.WARNING, logger="dedup_index"):
        ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder).run(storage.step())
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "3 of 6 images failed to load" in warning and "missing_file" in warning
    out = read_table(tmp_path / "c" / "p_step1.jsonl")
    assert [Path(p).name for p in out["image"]] == ["a.jpg", "b.jpg"]
    rejects = read_table(tmp_path / "c" / "p_step1_rejects.jsonl")
    assert rejects["row"].tolist() == [1, 2, 3, 4]
    assert rejects["reject_reason"].tolist() == ["load_error"] * 3 + ["duplicate"]
    errors = rejects["error"].tolist()
    assert errors[0].startswith("missing_file") and "missing.jpg" in errors[0]
    assert errors[1].startswith("not_an_image")
    assert errors[2].startswith("url_not_fetched")


def test_load_failures_keep(tmp_path, table_with_failures, encoder):
    storage = FileStorage(str(table_with_failures), str(tmp_path / "c"), "p", "jsonl")
    ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, on_error="keep").run(
        storage.step()
    )
    out = read_table(tmp_path / "c" / "p_step1.jsonl")
    assert len(out) == 5  # only the duplicate a_copy.jpg left
    assert out["max_similarity"].isna().tolist() == [False, True, True, True, False]


def test_load_failures_raise_writes_nothing(tmp_path, table_with_failures, encoder):
    storage = FileStorage(str(table_with_failures), str(tmp_path / "c"), "p", "jsonl")
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, on_error="raise")
    with pytest.raises(ImagesFailedError, match="3 of 6 images failed"):
        filt.run(storage.step())
    assert not (tmp_path / "c").exists()


def test_no_image_loads_raises_and_writes_nothing(tmp_path, encoder):
    write_jsonl(tmp_path / "in.jsonl", [{"image": str(tmp_path / "nope.jpg")}, {"image": None}])
    storage = FileStorage(str(tmp_path / "in.jsonl"), str(tmp_path / "c"), "p", "jsonl")
    with pytest.raises(NoValidImagesError, match="none of the 2 images"):
        ImageDeduplicateFilter(encoder=encoder).run(storage.step())
    assert not (tmp_path / "c").exists()


def test_empty_table_and_missing_column(tmp_path, encoder):
    (tmp_path / "empty.jsonl").write_text("")
    storage = FileStorage(str(tmp_path / "empty.jsonl"), str(tmp_path / "c"), "p", "jsonl")
    with pytest.raises(NoValidImagesError, match="no rows"):
        ImageDeduplicateFilter(encoder=encoder).run(storage.step())
    write_jsonl(tmp_path / "in.jsonl", [{"path": "a.jpg", "caption": "x"}])
    storage = FileStorage(str(tmp_path / "in.jsonl"), str(tmp_path / "c"), "p", "jsonl")
    with pytest.raises(ValueError, match=r"'image' not found.*\['path', 'caption'\]"):
        ImageDeduplicateFilter(encoder=encoder).run(storage.step())
    assert not (tmp_path / "c").exists()


def test_filestorage_errors_name_the_problem(tmp_path):
    storage = FileStorage(str(tmp_path / "absent.jsonl"), str(tmp_path / "c"), "p", "jsonl")
    with pytest.raises(RuntimeError, match=r"step\(\)"):
        storage.read("dataframe")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        storage.step().read("dataframe")
    with pytest.raises(FileNotFoundError, match="p_step1.jsonl"):
        storage.step().read("dataframe")
    with pytest.raises(ValueError, match="cache_type must be one of"):
        FileStorage("x.jsonl", cache_type="xlsx")
    storage = FileStorage(str(tmp_path / "x.jsonl"), str(tmp_path / "c"), "p", "jsonl").step()
    assert storage.write([{"a": 1}]) == os.path.join(str(tmp_path / "c"), "p_step1.jsonl")
    assert not [f for f in os.listdir(tmp_path / "c") if f.startswith(".tmp")]


def test_bad_operator_parameters(encoder):
    with pytest.raises(ValueError, match="threshold must be in"):
        ImageDeduplicateFilter(threshold=90, encoder=encoder)
    with pytest.raises(ValueError, match="on_error must be one of"):
        ImageDeduplicateFilter(on_error="ignore", encoder=encoder)
    with pytest.raises(ValueError, match="batch_size"):
        ImageDeduplicateFilter(batch_size=0, encoder=encoder)


def test_operator_decisions_equal_the_array_api(tmp_path, photo_dir, encoder):
    names = ["a.jpg", "b.jpg", "c.png", "a_reenc.jpg", "a_copy.jpg"]
    storage = MemoryStorage(pd.DataFrame({"image": [str(photo_dir / n) for n in names]}))
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder)
    filt.run(storage)
    from dedup_index.io import load_image

    E = encoder.encode([load_image(photo_dir / n) for n in names])
    for backend in ("dense", "flat"):
        direct = dedup_embeddings(E, COPY_THRESHOLD, backend=backend)
        assert np.array_equal(direct.keep, filt.last_report.result.keep)
        assert np.array_equal(direct.max_similarity, filt.last_report.result.max_similarity)
    assert (
        storage.written[0]["max_similarity"].tolist() == direct.max_similarity[direct.keep].tolist()
    )


def test_jpeg_helper_roundtrip():
    assert jpeg_bytes(photo("coffee"))[:2] == b"\xff\xd8"
