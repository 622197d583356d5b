"""``dedup-index calibrate``: precision/recall per threshold from labels, and a threshold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import photo
from PIL import ImageOps

from dedup_index.cli import main
from dedup_index.verify.calibration import recommend, threshold_table

pytest.importorskip("cv2")


def test_threshold_table_and_recommendation():
    s = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    dup = np.array([True, True, False, True, False])
    verified = np.array([True, True, False, True, False])
    table = threshold_table(s, dup, [0.6, 0.75, 0.85], verified=verified, positives=4)
    row = table.set_index("threshold").loc[0.75]
    assert row.predicted == 3 and row.tp == 2 and row.precision == pytest.approx(2 / 3)
    assert row.recall == pytest.approx(0.5) and row.f1 == pytest.approx(4 / 7)
    assert table.set_index("threshold").loc[0.6, "verified_precision"] == 1.0
    assert recommend(table, 0.99).threshold == 0.85
    assert recommend(table, 0.99, "verified_").threshold == 0.6


@pytest.fixture
def groups(tmp_path):
    """Three groups: a tile and its mirror image, a tile and a crop, a tile alone."""
    img = photo("astronaut", max_side=512)
    w, h = img.width // 2, img.height // 2
    a, b, c = img.crop((0, 0, w, h)), img.crop((w, h, 2 * w, 2 * h)), img.crop((w, 0, 2 * w, h))
    root = tmp_path / "labels"
    for name, images in {
        "a": [a, ImageOps.mirror(a)],
        "b": [b, b.crop((20, 10, 200, 220))],
        "c": [c],
    }.items():
        (root / name).mkdir(parents=True)
        for k, im in enumerate(images):
            im.save(root / name / f"{k}.png")
    return root


def test_calibrate_a_folder_of_groups(groups, tmp_path, capsys):
    report = tmp_path / "cal.html"
    code = main(
        [
            "calibrate",
            str(groups),
            "--model",
            "efficientnet-lite0",
            "--workers",
            "0",
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "5 images, 2 duplicate pairs" in out
    assert "with --verify geometric: recommended --threshold" in out
    assert "<svg" in report.read_text()


def test_calibrate_labelled_pairs_and_bad_tables(groups, tmp_path, capsys):
    labels = tmp_path / "pairs.csv"
    pd.DataFrame(
        {
            "key_i": ["a/0.png", "b/0.png", "a/0.png"],
            "key_j": ["a/1.png", "b/1.png", "c/0.png"],
            "is_duplicate": [1, "true", False],
        }
    ).to_csv(labels, index=False)
    code = main(
        [
            "calibrate",
            str(labels),
            "--image-root",
            str(groups),
            "--model",
            "efficientnet-lite0",
            "--workers",
            "0",
            "--thresholds",
            "0.3,0.5,0.7,0.9",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "5 images, 2 duplicate pairs" in out and "F1 1.000" in out
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(bad, index=False)
    assert main(["calibrate", str(bad), "--model", "efficientnet-lite0"]) == 2
    assert "lacks column(s)" in capsys.readouterr().err


def test_calibrate_jsonl_labels_with_a_precision_target(groups, tmp_path, capsys):
    labels = tmp_path / "pairs.jsonl"
    pd.DataFrame(
        {
            "key_i": ["a/0.png", "b/0.png", "a/0.png", "b/1.png"],
            "key_j": ["a/1.png", "b/1.png", "c/0.png", "c/0.png"],
            "is_duplicate": [True, True, False, False],
        }
    ).to_json(labels, orient="records", lines=True)
    argv = ["calibrate", str(labels), "--image-root", str(groups), "--workers", "0"]
    code = main([*argv, "--precision-target", "0.5", "--thresholds", "0.1,0.5,0.9"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "precision target 0.5" in out and "4 duplicate pairs" not in out
    assert "5 images, 2 duplicate pairs" in out
    assert "with --verify geometric: recommended --threshold 0.10" in out  # verified: P 1
    assert main([*argv, "--precision-target", "1.5"]) == 2
    assert "--precision-target must be in (0, 1]" in capsys.readouterr().err
