"""The README's main command runs offline and finds every planted copy."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_finds_every_planted_copy(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dedup_index.demo", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "planted copies found: 8/8; originals wrongly removed: 0" in done.stdout
    kept = (tmp_path / "demo" / "cache" / "image_dedupe_filter_step1.jsonl").read_text()
    kinds = [json.loads(line)["kind"] for line in kept.splitlines()]
    assert kinds == ["original"] * 10
