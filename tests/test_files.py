"""The file primitives of dedup_index.files: atomic writes, checked JSON, lock, crash hooks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from dedup_index.files import (
    CRASH_ENV,
    CRASH_EXIT_CODE,
    WriterLock,
    atomic_write_bytes,
    atomic_write_with,
    crash_once,
    default_file_mode,
    read_json,
    sha256_file,
    write_json_atomic,
)


class Refused(Exception):
    pass


def _run(code: str, *args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------ atomic writes


def test_atomic_write_replaces_and_returns_the_checksum(tmp_path):
    path = tmp_path / "sub" / "f.bin"  # the folder is made
    digest = atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one" and digest == sha256_file(path)
    assert atomic_write_bytes(path, b"two") == sha256_file(path) != digest
    assert os.listdir(path.parent) == ["f.bin"]  # no temp file left


def test_an_error_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(path, failing)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
    with pytest.raises(RuntimeError):
        atomic_write_with(path, failing, tmp_name=".f.tmp")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_the_written_file_has_the_umasks_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert default_file_mode() == 0o666 & ~mask
        atomic_write_bytes(tmp_path / "a", b"x")
        write_json_atomic(tmp_path / "b.json", {"k": 1}, tmp_name=".b.tmp")
        plain = tmp_path / "c"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("a", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


# ---------------------------------------------------------------------------------- JSON


def test_json_round_trip_and_checksum(tmp_path):
    path = tmp_path / "m.json"
    digest = write_json_atomic(path, {"format": "f", "version": 2, "x": [1, 2]})
    assert digest == sha256_file(path)
    got = read_json(path, Refused, format=("format", "f"), version=("version", 2))
    assert got == {"format": "f", "version": 2, "x": [1, 2]}


def test_the_loader_names_the_file_in_every_error(tmp_path):
    path = tmp_path / "m.json"
    kw = {"format": ("format", "f"), "version": ("version", 1)}
    with pytest.raises(Refused, match=f"{path}.*does not exist"):
        read_json(path, Refused, **kw)
    with pytest.raises(FileNotFoundError, match="no m.json here"):
        read_json(path, Refused, missing=lambda _: FileNotFoundError("no m.json here"), **kw)
    for payload, why in [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"format": "g", "version": 1}', "another kind"),
    ]:
        path.write_bytes(payload)
        with pytest.raises(Refused, match="corrupt") as err:
            read_json(path, Refused, **kw)
        assert str(path) in str(err.value) and why in str(err.value)
    path.write_text(json.dumps({"format": "f", "version": 9}))
    with pytest.raises(Refused, match=f"{path} has format version 9"):
        read_json(path, Refused, **kw)
    with pytest.raises(ValueError, match="version 9"):  # a separate error for versions
        read_json(path, Refused, version_error=ValueError, **kw)


# ---------------------------------------------------------------------------------- lock


HOLD = """
import sys, time
from dedup_index.files import WriterLock
with WriterLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_the_lock_refuses_a_second_holder_at_once(tmp_path):
    path = tmp_path / ".lock"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        lock = WriterLock(path, lambda: Refused(f"{path} is busy"))
        with pytest.raises(Refused, match="busy"):
            lock.acquire()  # at once: no timeout, no retry
        assert not lock.locked
        with pytest.raises(BlockingIOError, match="locked by another writer"):
            WriterLock(path).acquire()  # the default error
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
    with WriterLock(path, Refused("busy")) as lock:  # free once the holder is gone
        assert lock.locked
        with pytest.raises(Refused):  # another lock object in this process is refused too
            WriterLock(path, Refused("busy")).acquire()
    assert not lock.locked
    lock.release()  # idempotent


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / ".lock"
    code = "import os, sys\nfrom dedup_index.files import WriterLock\n"
    code += "WriterLock(sys.argv[1]).acquire()\nos._exit(9)\n"
    assert _run(code, str(path)).returncode == 9
    WriterLock(path).acquire().release()


def test_the_lock_survives_renaming_its_folder(tmp_path):
    (tmp_path / "a").mkdir()
    lock = WriterLock(tmp_path / "a" / ".lock").acquire()
    os.rename(tmp_path / "a", tmp_path / "b")
    with pytest.raises(BlockingIOError):
        WriterLock(tmp_path / "b" / ".lock").acquire()
    lock.release()
    WriterLock(tmp_path / "b" / ".lock").acquire().release()


# --------------------------------------------------------------------------- crash hooks


CRASH = """
import sys
from dedup_index.files import crash_point
for k in range(1, 6):
    crash_point("other")
    print(k, flush=True)
    crash_point("here")
print("done", flush=True)
"""


@pytest.mark.parametrize(("spec", "printed"), [("here", 1), ("here:1", 1), ("here:3", 3)])
def test_crash_point_ends_the_process_at_the_nth_hit(spec, printed):
    done = _run(CRASH, env={**os.environ, CRASH_ENV: spec})
    assert done.returncode == CRASH_EXIT_CODE, done.stderr
    assert done.stdout.split() == [str(k) for k in range(1, printed + 1)]


def test_crash_point_without_the_variable_or_elsewhere_does_nothing():
    base = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    for env in (base, {**base, CRASH_ENV: "nowhere"}):
        done = _run(CRASH, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == "done"


def test_crash_once_ends_only_the_process_that_claims_the_marker(tmp_path):
    marker = tmp_path / "fault"
    marker.touch()
    code = "import sys\nfrom dedup_index.files import crash_once\n"
    code += "crash_once(sys.argv[1], 'claimed')\nprint('survived')\n"
    first = _run(code, str(marker))
    assert first.returncode == CRASH_EXIT_CODE and "claimed" in first.stderr
    assert not marker.exists()
    second = _run(code, str(marker))  # the retry finds no marker
    assert second.returncode == 0 and second.stdout.strip() == "survived"
    assert crash_once(marker) is False
