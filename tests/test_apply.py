"""``dedup-index apply``: moving the removed files aside and back, on real files.

A real run (the offline EfficientNet-Lite0 model) on a folder of real photos with planted
copies writes the removed rows; each test works on its own copy of the folder (copied
with its modification times, so the run's size and mtime still match) and drives the
installed console script in subprocesses.  Kills are real: a child process ends itself
at a crash point (``DEDUP_INDEX_CRASH_AT``), then undo must restore every file byte for
byte.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import jpeg_bytes, photo
from PIL import Image

from dedup_index.files import CRASH_EXIT_CODE, WriterLock
from dedup_index.io import moves

CLI = str(Path(sys.executable).with_name("dedup-index"))
ORIGINALS = {"a.jpg": "astronaut", "b.jpg": "coffee", "c.jpg": "chelsea", "r.jpg": "rocket"}
#: The copies the run removes, relative to the photo folder.
COPIES = ["r_copy.png", "sub/a_copy.jpg", "sub/b_copy.jpg", "sub/deep/c_copy.jpg"]
FORMATS = ("jsonl", "csv", "parquet")


def cli(*args, cwd: Path, env: dict | None = None, python: str | None = None):
    """The installed console script (or ``python -c`` code calling it) in a subprocess."""
    command = [sys.executable, "-c", python, *map(str, args)] if python else [CLI, *map(str, args)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "DEDUP_INDEX_PROGRESS": "0", **(env or {})},
    )


#: A child whose os.link says EXDEV across folders, as across filesystems: the copy path.
CROSS_DEVICE = """\
import errno, os, sys
real_link = os.link
def link(src, dst, **kw):
    if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    return real_link(src, dst, **kw)
os.link = link
from dedup_index.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """photos/ (4 distinct photos, 4 copies in subfolders, a broken file) and the run's
    removed rows in every format, in removed.<format> beside it."""
    base = tmp_path_factory.mktemp("apply")
    root = base / "photos"
    (root / "sub" / "deep").mkdir(parents=True)
    for name, image in ORIGINALS.items():
        (root / name).write_bytes(jpeg_bytes(photo(image)))
    (root / "sub" / "a_copy.jpg").write_bytes((root / "a.jpg").read_bytes())
    (root / "sub" / "b_copy.jpg").write_bytes((root / "b.jpg").read_bytes())
    (root / "sub" / "deep" / "c_copy.jpg").write_bytes((root / "c.jpg").read_bytes())
    Image.open(root / "r.jpg").convert("RGB").save(root / "r_copy.png")
    (root / "broken.jpg").write_bytes(b"not a JPEG at all")
    for fmt in FORMATS:
        done = cli(
            "run",
            "photos",
            "--model",
            "efficientnet-lite0",
            "--threshold",
            "0.85",
            "--removed",
            f"removed.{fmt}",
            cwd=base,
        )
        assert done.returncode == 0, done.stderr
    rows = moves.read_removed(base / "removed.jsonl")
    dups = sorted(r["image"] for r in rows if r["reject_reason"] == "duplicate")
    assert dups == COPIES, rows
    assert [r["image"] for r in rows if r["reject_reason"] == "load_error"] == ["broken.jpg"]
    return base


@pytest.fixture
def work(template, tmp_path) -> Path:
    """A fresh copy of the template (modification times kept) to move files in."""
    shutil.copytree(template / "photos", tmp_path / "photos")  # copy2: mtime_ns kept
    for fmt in FORMATS:
        shutil.copy2(template / f"removed.{fmt}", tmp_path / f"removed.{fmt}")
    return tmp_path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and mtime, by relative path."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def images_under(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(".jsonl")
    )


def only_manifest(trash: Path) -> Path:
    found = sorted(trash.glob("dedup-index-undo-*.jsonl"))
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------- run


def test_run_records_each_files_size_and_mtime_exactly(template):
    """The removed rows carry file_size and file_mtime_ns (nanoseconds, exact in every
    format) of the file as the run saw it; the broken file's too."""
    root = template / "photos"
    for fmt in FORMATS:
        rows = moves.read_removed(template / f"removed.{fmt}")
        assert len(rows) == 5
        for r in rows:
            st = (root / r["image"]).stat()
            assert (int(r["file_size"]), int(r["file_mtime_ns"])) == (
                st.st_size,
                st.st_mtime_ns,
            ), (fmt, r)


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("fmt", FORMATS)
def test_move_then_undo_round_trip(work, fmt):
    before = snapshot(work / "photos")
    done = cli("apply", f"removed.{fmt}", "--image-root", "photos", "--move-to", "trash", cwd=work)
    assert done.returncode == 0, done.stderr
    # Only the duplicates moved, keeping their relative paths; the broken file stayed.
    assert images_under(work / "trash") == COPIES
    assert images_under(work / "photos") == sorted(["broken.jpg", *ORIGINALS])
    for rel in COPIES:
        assert (work / "trash" / rel).read_bytes() == before[rel][0]
        assert (work / "trash" / rel).stat().st_mtime_ns == before[rel][1]
        assert f"photos/{rel} -> trash/{rel}" in done.stdout
    manifest = only_manifest(work / "trash")
    assert f"undo: dedup-index apply --undo trash/{manifest.name}" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("4 moved, 0 refused")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert records[0]["format"] == moves.MANIFEST_FORMAT
    assert [r["op"] for r in records[1:]] == ["move", "done"] * 4

    done = cli("apply", "--undo", manifest, cwd=work)
    assert done.returncode == 0, done.stderr
    assert snapshot(work / "photos") == before
    assert images_under(work / "trash") == []
    # Undo again: everything is in place already; nothing moves, nothing is refused.
    again = cli("apply", "--undo", manifest, cwd=work)
    assert again.returncode == 0, again.stderr
    assert "0 moved back, 0 refused, 4 skipped" in again.stdout
    assert snapshot(work / "photos") == before


def test_dry_run_moves_and_writes_nothing(work):
    before = snapshot(work)
    done = cli(
        "apply",
        "removed.jsonl",
        "--image-root",
        "photos",
        "--move-to",
        "trash",
        "--dry-run",
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    for rel in COPIES:
        assert f"would move photos/{rel} -> trash/{rel}" in done.stdout
    assert "dry run: nothing moved" in done.stdout
    assert not (work / "trash").exists()
    assert snapshot(work) == before
    # Undo's dry run too.
    cli("apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash", cwd=work)
    moved = snapshot(work)
    done = cli("apply", "--undo", only_manifest(work / "trash"), "--dry-run", cwd=work)
    assert done.returncode == 0 and done.stdout.count("would move back trash/") == 4, done
    assert snapshot(work) == moved


def test_load_errors_move_only_when_asked(work):
    done = cli(
        "apply",
        "removed.jsonl",
        "--image-root",
        "photos",
        "--move-to",
        "trash",
        "--reason",
        "duplicate",
        "--reason",
        "load_error",
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    assert images_under(work / "trash") == sorted(["broken.jpg", *COPIES])


# --------------------------------------------------------------------------- refusals


def test_never_overwrites_on_move_or_undo(work):
    (work / "trash" / "sub").mkdir(parents=True)
    (work / "trash" / "sub" / "a_copy.jpg").write_bytes(b"someone else's file")
    done = cli("apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash", cwd=work)
    assert done.returncode == 1
    assert "refused row" in done.stderr and "a_copy.jpg" in done.stderr
    assert "already exists (never overwritten)" in done.stderr
    assert (work / "trash" / "sub" / "a_copy.jpg").read_bytes() == b"someone else's file"
    assert (work / "photos" / "sub" / "a_copy.jpg").exists()
    assert images_under(work / "trash") == COPIES  # the three others moved
    assert "3 moved, 1 refused" in done.stdout

    # A new file where a moved one came from: undo refuses that one, restores the others.
    manifest = only_manifest(work / "trash")
    (work / "photos" / "sub" / "b_copy.jpg").write_bytes(b"a new file")
    done = cli("apply", "--undo", manifest, cwd=work)
    assert done.returncode == 1
    assert "b_copy.jpg" in done.stderr and "already exists (never overwritten)" in done.stderr
    assert (work / "photos" / "sub" / "b_copy.jpg").read_bytes() == b"a new file"
    assert (work / "trash" / "sub" / "b_copy.jpg").exists()
    assert (work / "photos" / "r_copy.png").exists()
    assert (work / "photos" / "sub" / "deep" / "c_copy.jpg").exists()


def test_files_changed_since_the_run_are_refused(work):
    grown = work / "photos" / "sub" / "a_copy.jpg"
    grown.write_bytes(grown.read_bytes() + b"\0")
    touched = work / "photos" / "sub" / "b_copy.jpg"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same size, 1 ns later
    done = cli("apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash", cwd=work)
    assert done.returncode == 1
    refusals = [line for line in done.stderr.splitlines() if "refused" in line]
    assert len(refusals) == 2 and all("changed since the run" in r for r in refusals)
    assert "size" in refusals[0] and "a_copy.jpg" in refusals[0]
    assert "modified" in refusals[1] and "b_copy.jpg" in refusals[1]
    assert grown.exists() and touched.exists()
    assert images_under(work / "trash") == ["r_copy.png", "sub/deep/c_copy.jpg"]

    # Changed after the move: undo refuses it, restores the other.
    manifest = only_manifest(work / "trash")
    moved = work / "trash" / "r_copy.png"
    moved.write_bytes(b"edited in the trash")
    done = cli("apply", "--undo", manifest, cwd=work)
    assert done.returncode == 1 and "changed since it was moved" in done.stderr
    assert moved.read_bytes() == b"edited in the trash"
    assert (work / "photos" / "sub" / "deep" / "c_copy.jpg").exists()


def test_the_kept_file_itself_is_never_moved(template, tmp_path):
    """A table listing one file twice: its second row is a duplicate of the first, and
    moving it would move the kept image."""
    shutil.copytree(template / "photos", tmp_path / "photos")
    rows = ["a.jpg", "b.jpg", "a.jpg", "sub/b_copy.jpg"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"image": r}) + "\n" for r in rows))
    done = cli(
        "run",
        "list.jsonl",
        "--image-root",
        "photos",
        "--model",
        "efficientnet-lite0",
        "--threshold",
        "0.85",
        "--removed",
        "removed.jsonl",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    done = cli(
        "apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "refused row 2" in done.stderr and "the same file as the kept row" in done.stderr
    assert (tmp_path / "photos" / "a.jpg").exists()
    assert images_under(tmp_path / "trash") == ["sub/b_copy.jpg"]


def test_only_plain_files_under_the_root_that_the_run_saw_are_moved(work, tmp_path):
    root = work / "photos"
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes((root / "a.jpg").read_bytes())
    (root / "link.jpg").symlink_to(root / "b.jpg")
    values = [
        "link.jpg",
        str(outside),
        "../elsewhere.jpg",
        "sub/a_copy.jpg",
        "<11226 bytes>",  # how the removed table shows a bytes value
        "https://example.com/a.jpg",
    ]
    sizes, mtimes = moves.file_stamps(values, root)
    rows = [
        {
            "row": n,
            "reject_reason": "duplicate",
            "duplicate_of": None,
            "image": v,
            "file_size": s,
            "file_mtime_ns": m,
        }
        for n, (v, s, m) in enumerate(zip(values, sizes, mtimes, strict=True))
    ]
    report = moves.move_removed(rows, work / "trash", image_root=root)
    reasons = {r.row: r.reason for r in report.refused}
    assert "symbolic link" in reasons[0]
    assert "outside the image root" in reasons[1] and "outside the image root" in reasons[2]
    assert "no file_size/file_mtime_ns recorded" in reasons[4]
    assert "not a local file path" in reasons[5]
    assert [m.row for m in report.moved] == [3]
    assert outside.exists() and (root / "link.jpg").is_symlink()


# ------------------------------------------------------------------------------ kills


@pytest.mark.parametrize(
    "crash_at, cross_device",
    [
        ("apply_linked:3", False),  # the third file at both places (one inode)
        ("apply_moved:2", False),  # the second file moved, its "done" not yet recorded
        ("apply_partial:2", True),  # another filesystem: the copy made, not yet named
        ("apply_copied:3", True),  # another filesystem: copied, original not yet unlinked
    ],
)
def test_a_run_killed_half_way_is_undone_completely(work, crash_at, cross_device):
    before = snapshot(work / "photos")
    args = ("apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash")
    python = CROSS_DEVICE if cross_device else None
    killed = cli(*args, cwd=work, env={"DEDUP_INDEX_CRASH_AT": crash_at}, python=python)
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr
    assert 0 < len(images_under(work / "trash")) < len(COPIES) + 1
    assert snapshot(work / "photos") != before
    manifest = only_manifest(work / "trash")

    done = cli("apply", "--undo", manifest, cwd=work, python=python)
    assert done.returncode == 0, done.stderr
    assert snapshot(work / "photos") == before
    assert images_under(work / "trash") == []
    assert not [p for p in work.rglob("*") if p.name.endswith(".dedup-index-partial")]


def test_a_killed_run_can_be_finished_by_running_it_again(work):
    before = snapshot(work / "photos")
    args = ("apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash")
    killed = cli(*args, cwd=work, env={"DEDUP_INDEX_CRASH_AT": "apply_linked:2"})
    assert killed.returncode == CRASH_EXIT_CODE
    done = cli(*args, cwd=work)
    assert done.returncode == 0, done.stderr
    assert "already moved to" in done.stdout
    assert images_under(work / "trash") == COPIES
    assert all((work / "trash" / rel).read_bytes() == before[rel][0] for rel in COPIES)
    # Both manifests undone (newest first): everything back.
    for manifest in sorted((work / "trash").glob("dedup-index-undo-*.jsonl"), reverse=True):
        assert cli("apply", "--undo", manifest, cwd=work).returncode == 0
    assert snapshot(work / "photos") == before


def test_an_undo_killed_half_way_can_be_run_again(work):
    before = snapshot(work / "photos")
    cli("apply", "removed.jsonl", "--image-root", "photos", "--move-to", "trash", cwd=work)
    manifest = only_manifest(work / "trash")
    killed = cli(
        "apply", "--undo", manifest, cwd=work, env={"DEDUP_INDEX_CRASH_AT": "undo_linked:2"}
    )
    assert killed.returncode == CRASH_EXIT_CODE
    done = cli("apply", "--undo", manifest, cwd=work)
    assert done.returncode == 0, done.stderr
    assert snapshot(work / "photos") == before and images_under(work / "trash") == []


# ------------------------------------------------------------------- the library alone


def test_without_hard_links_files_are_renamed(work, monkeypatch):
    def no_links(src, dst, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    before = snapshot(work / "photos")
    monkeypatch.setattr(os, "link", no_links)
    report = moves.move_removed(work / "removed.jsonl", work / "trash", image_root=work / "photos")
    assert len(report.moved) == 4 and not report.refused
    assert images_under(work / "trash") == COPIES
    back = moves.undo_moves(report.manifest)
    assert len(back.moved) == 4 and not back.refused
    assert snapshot(work / "photos") == before


def test_a_manifest_in_use_is_refused(work):
    report = moves.move_removed(work / "removed.jsonl", work / "trash", image_root=work / "photos")
    with WriterLock(report.manifest), pytest.raises(moves.MoveError, match="in use"):
        moves.undo_moves(report.manifest)
    assert images_under(work / "trash") == COPIES


# ------------------------------------------------------------------------ bad arguments


def _no_trash(work: Path) -> None:
    assert not (work / "trash").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["removed.jsonl"], "--move-to DIR"),
        (["--move-to", "trash"], "give the removed file"),
        (["removed.jsonl", "--move-to", "trash"], "pass --image-root"),  # paths are not here
        (["missing.jsonl", "--move-to", "trash"], "does not exist"),
        (["removed.jsonl", "--undo", "m.jsonl"], "--undo takes only the manifest"),
        (["--undo", "photos/a.jpg"], "not a dedup-index move manifest"),
        (["--undo", "removed.jsonl"], "not a dedup-index move manifest"),
        (["--undo", "nothing.jsonl"], "does not exist"),
        (["removed.jsonl", "--move-to", "trash", "--image-root", "nowhere"], "not a folder"),
        (["removed.jsonl", "--move-to", "photos", "--image-root", "photos"], "is the image root"),
        (["old.jsonl", "--move-to", "trash", "--image-root", "photos"], "file_size"),
        (
            ["removed.jsonl", "--move-to", "trash", "--image-root", "photos", "--image-key", "x"],
            "--image-key",
        ),
        (
            [
                "removed.jsonl",
                "--move-to",
                "trash",
                "--image-root",
                "photos",
                "--manifest",
                "removed.csv",
            ],
            "exists; give a new file",
        ),
        (["removed.jsonl", "--move-to", "trash", "--reason", "typo"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_having_moved_nothing(work, args, message):
    rows = moves.read_removed(work / "removed.jsonl")
    old = [{k: v for k, v in r.items() if k not in moves.STAMP_COLUMNS} for r in rows]
    (work / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    before = snapshot(work)
    done = cli("apply", *args, cwd=work)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr, done.stderr
    assert snapshot(work) == before
    _no_trash(work)


def test_help_and_choices():
    done = subprocess.run([CLI, "apply", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "examples:" in done.stdout
    assert "dedup-index apply" in done.stdout and "--undo" in done.stdout
    assert "near-duplicates" in done.stdout  # says only duplicates move by default
    from dedup_index.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    reason = next(a for a in sub.choices["apply"]._actions if a.dest == "reason")
    assert tuple(reason.choices) == moves.REASONS
