"""File primitives: the one implementation of durable writes, checked JSON, the writer
lock and the crash hook, for every stage that persists something.

Everything written to keep (the embedding store, the persistent index, the embedding
cache, distributed tiles and jobs, operator and report outputs) goes through here, so
contract 5 ("persistent files are written atomically and checked on load") has one
implementation rather than one per format:

- :func:`atomic_write_with` / :func:`atomic_write_bytes`: a temp file in the target's
  folder, fsync, the umask's mode (:func:`default_file_mode`), rename, fsync of the folder
  (:func:`fsync_dir`).  A reader sees the old file or the new one, never a part.
- :func:`write_json_atomic` / :func:`read_json`: manifests and other JSON records; the
  reader raises the caller's error, naming the file, for a missing file, bad JSON, another
  format or another version.
- :func:`sha256_file`: the checksum that manifests record for the files they list;
  :class:`CheckedFiles`: which files of a folder passed it, remembered by their stat, so
  an unchanged file is not read again on every open.
- :class:`WriterLock`: one writer at a time.  An exclusive ``flock`` on a lock file,
  taken without waiting: a second holder (another process, or another lock object in
  this one) gets the caller's error at once.  The kernel drops it when its holder dies,
  so a killed writer never leaves a stale lock behind.
- :func:`crash_point` / :func:`crash_once`: test hooks that end the process where a kill
  would hurt most, so tests can prove that such a kill loses nothing committed.

Why here and once: two copies of a lock or of "fsync then rename" drift apart, and a
drifted copy is a silent data-loss bug.  Standard library only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKED_FILE",
    "CRASH_ENV",
    "CRASH_EXIT_CODE",
    "CheckedFiles",
    "StagedWrites",
    "WriterLock",
    "atomic_write_bytes",
    "atomic_write_with",
    "crash_once",
    "crash_point",
    "default_file_mode",
    "fsync_dir",
    "read_json",
    "remove_stale_temp_files",
    "sha256_file",
    "temp_prefix",
    "write_json_atomic",
]

#: Test hook: ``name`` or ``name:nth`` ends the process at the ``nth`` (default first)
#: arrival at :func:`crash_point` ``(name)``.
CRASH_ENV = "DEDUP_INDEX_CRASH_AT"
#: Exit status of a process ended by a crash hook.
CRASH_EXIT_CODE = 77

_crash_hits: dict[str, int] = {}


# ----------------------------------------------------------------------- durable writes


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort where directories can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask.

    ``tempfile.mkstemp`` creates 0600 files; a temp file renamed into place keeps that mode,
    so outputs meant for other users and tools get this one before the rename.  The umask
    is read from ``/proc`` where there is one: setting it to read it back (the portable
    way) briefly changes it for every thread of the process.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_with(
    path: str | os.PathLike,
    write: Callable[[str], object],
    suffix: str = "",
    *,
    tmp_name: str | None = None,
    crash_name: str | None = None,
) -> None:
    """Create ``path`` atomically with a writer that takes a file path (pandas, pyarrow):
    ``write(tmp)`` fills a temp file in the same folder (created if missing), which is
    then fsynced, given the umask's mode and renamed over ``path``; the folder is fsynced.
    On any error the temp file is removed and ``path`` is untouched.

    ``tmp_name`` fixes the temp file's name (for a writer that holds a lock: a crash then
    leaves one known file, overwritten by the next write, rather than a new one each time);
    by default it is a fresh unique name.  ``crash_name`` adds the crash points
    ``<crash_name>_tmp`` (temp file complete, not renamed) and ``<crash_name>_replaced``
    (renamed, folder not yet fsynced).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if tmp_name is None:
        remove_stale_temp_files(folder)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=suffix, dir=folder)
        os.close(fd)
    else:
        tmp = os.path.join(folder, tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes it 0600
        if crash_name:
            crash_point(f"{crash_name}_tmp")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if crash_name:
        crash_point(f"{crash_name}_replaced")
    fsync_dir(folder)


def temp_prefix() -> str:
    """Prefix of this process's temp files: ``.tmp-<host>-<pid>-``, so that a later run can
    tell a dead writer's leftovers (killed between write and rename) from a live one's."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f".tmp-{host}-{os.getpid()}-"


#: Folders this process has already swept: one listing per folder, not one per write (a Ray
#: job writes thousands of tiles into one folder).
_SWEPT: set[str] = set()


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Remove temp files left in ``folder`` by writers of this host that are no longer
    running (a ``kill -9`` between write and rename); returns how many.  Files of other
    hosts (shared storage) and of live processes are left alone.  Each folder is swept
    once per process: a writer that dies later is found by the next process."""
    key = os.path.abspath(os.fspath(folder))
    if key in _SWEPT:
        return 0
    _SWEPT.add(key)
    host = temp_prefix().split("-")[1]
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        parts = name.split("-", 3)
        if len(parts) < 4 or parts[0] != ".tmp" or parts[1] != host or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class StagedWrites:
    """Several output files that appear together or not at all.

    ``path(final)`` gives a temp path beside ``final`` to write to (with any writer, atomic
    or not); leaving the ``with`` block normally renames every temp file over its final
    path, an exception removes them all, so a run that fails while writing its outputs
    leaves none of them (and no mix of two runs' files).  Only the renames themselves,
    done last and back to back, could be cut by a kill in between.

    >>> with StagedWrites() as staged:  # doctest: +SKIP
    ...     write_table(kept, staged.path("kept.jsonl"))
    ...     write_report(staged.path("report.html"), ...)
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, str]] = []

    def path(self, final: str | os.PathLike) -> str:
        final = os.path.abspath(os.fspath(final))
        folder = os.path.dirname(final)
        os.makedirs(folder, exist_ok=True)
        remove_stale_temp_files(folder)
        fd, tmp = tempfile.mkstemp(
            prefix=temp_prefix(), suffix="-" + os.path.basename(final), dir=folder
        )
        os.close(fd)
        self._staged.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._staged:
            os.replace(tmp, final)
        for folder in {os.path.dirname(final) for _, final in self._staged}:
            fsync_dir(folder)
        self._staged = []

    def abort(self) -> None:
        for tmp, _ in self._staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._staged = []

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write_bytes(
    path: str | os.PathLike,
    payload: bytes,
    *,
    tmp_name: str | None = None,
    crash_name: str | None = None,
) -> str:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write_with`, which
    ``tmp_name`` and ``crash_name`` are passed to; ``crash_name`` also adds
    ``<crash_name>_partial``, half the temp file written); returns its SHA-256 hex digest."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            if crash_name:
                half = len(payload) // 2
                f.write(payload[:half])
                f.flush()
                crash_point(f"{crash_name}_partial")
                f.write(payload[half:])
            else:
                f.write(payload)

    atomic_write_with(path, write, tmp_name=tmp_name, crash_name=crash_name)
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (memory ``O(chunk)``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: The file in which :class:`CheckedFiles` remembers a folder's checked files.
CHECKED_FILE = "checked.json"
#: A file changed less than this long before its check began is not remembered: file
#: timestamps come from a coarse clock, so a change right after the check could keep the
#: stat the check saw.  (Tests set it to 0.)
CHECKED_AFTER_NS = 2_000_000_000


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class CheckedFiles:
    """Which files of ``folder`` passed their SHA-256 check, remembered by their stat
    (size, mtime, ctime, inode, device) in :data:`CHECKED_FILE` there, so that a file
    unchanged since it was checked is not read again: opening a 10M-row index hashed its
    ~10 GiB of FAISS segments on every open (27 s), and a query from the command line
    paid that each time.

        >>> checked = CheckedFiles(folder)
        >>> checked.matches("ann/seg-000001-00000.faiss", want_sha256)  # hashed, remembered
        True
        >>> checked.save()  # later opens match it by its stat alone

    Why a stat proves the bytes: any write to a file, or a file renamed over it, gives it
    a new ctime, which no user call can set back (``os.utime`` sets mtime and atime, and
    moves ctime to now); a copy has another inode.  A file changed within
    :data:`CHECKED_AFTER_NS` of its check is not remembered (coarse timestamps).  What it
    does not catch: bits flipped by the disk itself under an unchanged stat; a full check
    (``dedup-index index verify``, ``DedupIndex.verify()``) hashes every file again.
    Best effort: a folder it cannot write to is hashed at every open, and a damaged or
    foreign record is ignored (and rewritten)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._changed = False
        try:
            known = json.loads((self.folder / CHECKED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        ok = isinstance(known, dict) and known.get("format") == "dedup-index-checked-files"
        files = known.get("files") if ok else None
        self._known: dict[str, list[Any]] = files if isinstance(files, dict) else {}

    def matches(self, name: str, sha256: str) -> bool:
        """Whether ``folder/name`` has SHA-256 ``sha256``: from its remembered stat, else
        by reading it (and remembering it when it matched and was not changed during
        or just before the check).  Raises ``OSError`` (e.g. ``FileNotFoundError``)."""
        path = self.folder / name
        before = os.stat(path)
        if self._known.get(name) == [sha256, *_stamp(before)]:
            return True
        begun = time.time_ns()
        if sha256_file(path) != sha256:
            return False
        after = os.stat(path)
        settled = max(before.st_mtime_ns, before.st_ctime_ns) < begun - CHECKED_AFTER_NS
        if settled and _stamp(after) == _stamp(before):
            self._known[name] = [sha256, *_stamp(before)]
            self._changed = True
        return True

    def save(self) -> None:
        """Write the record (atomically; files gone from the folder dropped from it), if
        anything was added; a failure to write is logged at debug level and ignored."""
        if not self._changed:
            return
        files = {n: v for n, v in self._known.items() if (self.folder / n).exists()}
        record = {"format": "dedup-index-checked-files", "files": files}
        try:
            write_json_atomic(self.folder / CHECKED_FILE, record)
        except OSError as err:  # read-only folder, a writer's sweep of temp files, ...
            logging.getLogger(__name__).debug(
                "could not record checked files in %s: %s", self.folder, err
            )
        self._changed = False


# -------------------------------------------------------------------------------- JSON


def write_json_atomic(
    path: str | os.PathLike,
    data: Any,
    *,
    tmp_name: str | None = None,
    crash_name: str | None = None,
) -> str:
    """Write ``data`` as JSON (sorted keys, indented, newline-terminated) atomically with
    :func:`atomic_write_bytes`; returns the file's SHA-256 hex digest."""
    payload = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")
    return atomic_write_bytes(path, payload, tmp_name=tmp_name, crash_name=crash_name)


def read_json(
    path: str | os.PathLike,
    error: Callable[[str], BaseException] = ValueError,
    *,
    missing: Callable[[str], BaseException] | None = None,
    format: tuple[str, str] | None = None,
    version: tuple[str, Any] | None = None,
    version_error: Callable[[str], BaseException] | None = None,
    what: str = "manifest",
) -> dict[str, Any]:
    """Read a JSON object from ``path``; every failure raises an error naming the file.

    ``error(message)`` (an exception class or any callable returning an exception) is raised
    for a file that is not valid UTF-8 JSON, not a JSON object, or whose ``format[0]``
    field is not ``format[1]``; ``version_error`` (default ``error``) where ``version[0]``
    is not ``version[1]``; ``missing`` (default ``error``) where the file does not exist.
    ``what`` names the file in messages ("manifest", "job file", ...).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise (missing or error)(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is corrupt (not UTF-8 text: {err})") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise error(f"{what} {path} is corrupt (not JSON: {err})") from err
    if not isinstance(data, dict):
        raise error(f"{what} {path} is corrupt (not a JSON object)")
    if format is not None and data.get(format[0]) != format[1]:
        raise error(
            f"{what} {path} is corrupt or of another kind: its {format[0]!r} is "
            f"{data.get(format[0])!r}, not {format[1]!r}"
        )
    if version is not None and data.get(version[0]) != version[1]:
        raise (version_error or error)(
            f"{what} {path} has format version {data.get(version[0])!r}; this dedup_index "
            f"reads version {version[1]!r} only"
        )
    return data


# -------------------------------------------------------------------------------- lock


class WriterLock:
    """An exclusive lock on the file ``path``, taken without waiting.

    :meth:`acquire` creates the lock file if needed and takes an exclusive ``flock`` on it
    (``msvcrt.locking`` on Windows).  If anyone else holds it (another process, or another
    ``WriterLock`` object in this one) it raises ``error`` at once: ``error`` is an
    exception, or a callable returning one; by default a ``BlockingIOError`` naming the
    file.  Other failures (a lock file that cannot be created in a read-only folder)
    raise their ``OSError``.  The lock goes with the process: a killed holder leaves no
    stale lock.  It belongs to the open file, so renaming the folder while holding it
    (the embedding cache's reset) keeps it.  Use as a context manager or with
    :meth:`acquire` / :meth:`release`; :meth:`release` is idempotent.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        error: BaseException | Callable[[], BaseException] | None = None,
    ) -> None:
        self.path = Path(path)
        self._error = error
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> WriterLock:
        """Take the lock or raise the caller's error at once (see the class)."""
        if self._fd is not None:
            raise RuntimeError(f"the lock {self.path} is already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_file_mode())
        try:
            taken = _lock_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
            raise self._locked_error()
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays, so later writers lock the same inode)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _unlock_fd(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WriterLock({str(self.path)!r}, locked={self.locked})"

    def _locked_error(self) -> BaseException:
        err = self._error
        if err is None:
            return BlockingIOError(
                errno.EWOULDBLOCK, f"{self.path} is locked by another writer", str(self.path)
            )
        if isinstance(err, BaseException):
            return err
        return err()


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock_fd(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EDEADLK):
                return False
            raise
        return True

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    _CONTENDED = frozenset({errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK})

    def _lock_fd(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in _CONTENDED:  # some filesystems say EACCES for "held"
                return False
            raise
        return True

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# ------------------------------------------------------------------------- crash hooks


def crash_point(name: str) -> None:
    """Test hook: end the process here, as a kill would, if :data:`CRASH_ENV` says so.

    ``DEDUP_INDEX_CRASH_AT=name`` ends it at the first arrival at ``crash_point(name)``,
    ``name:nth`` at the ``nth`` arrival in this process.  The exit is ``os._exit(77)``:
    no ``finally`` blocks, no buffers flushed, no temp files removed.  Without the variable
    this is one dictionary lookup.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(nth or 1):
        os._exit(CRASH_EXIT_CODE)


def crash_once(marker: str | os.PathLike, message: str | None = None) -> bool:
    """Test hook for processes that share no environment or counter (Ray workers, whose
    retry runs in a fresh process): if the file ``marker`` exists, delete it (an atomic
    claim, so exactly one process wins it), log ``message`` as a warning and end this
    process as :func:`crash_point` does.  Returns False (and does nothing) when there is
    no marker."""
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return False
    if message:
        logging.getLogger("dedup_index").warning("%s", message)
    os._exit(CRASH_EXIT_CODE)
