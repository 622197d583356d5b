"""Acting on a run's result: move the removed files aside, and put them back.

What ``dedup-index apply`` does, as functions Python callers can use too:

- :func:`move_removed` reads a removed-rows table (``dedup-index run --removed``, or the
  operator's rejects) and moves the files of its ``duplicate`` rows (other reasons on
  request) under a folder, keeping their paths relative to the image root, with a
  manifest that records every move;
- :func:`undo_moves` moves back what a manifest says was moved.

The rules, for every file: nothing is ever deleted (a file is only renamed, or copied,
verified and then unlinked at its old place); nothing is overwritten (the new name is
made with ``os.link``, which fails if the name exists; ``os.rename`` after a check where
hard links are not supported); a file whose size or modification time differs from the
ones the run recorded (``file_size``, ``file_mtime_ns``) is refused, as are symbolic
links, missing files, paths outside the image root, and a file that is the very file its
row duplicates (a table that lists one file twice).  Refusals are reported, one reason
each, and the other files still move.

The manifest is a JSON-lines journal: a header, then for each file a ``move`` record
written and fsynced *before* the file is touched and a ``done`` record after.  A run
killed at any point leaves every file either at its old place, at its new place, or (a
kill between the link and the unlink) at both under one inode; :func:`undo_moves` reads
the journal and, from the state of each file on disk, restores the old place in every
case.  Undo records its own steps in the same manifest, so an interrupted undo can be
rerun.

The size and modification time are recorded by the operator through
:func:`file_stamps` when it builds its rejects table.
"""

from __future__ import annotations

import csv
import errno
import filecmp
import json
import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DedupIndexError
from ..files import WriterLock, crash_point, fsync_dir
from .keys import image_path

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "REASONS",
    "STAMP_COLUMNS",
    "Move",
    "MoveError",
    "MoveReport",
    "Refusal",
    "file_stamp",
    "file_stamps",
    "move_removed",
    "read_manifest",
    "read_removed",
    "resolve_image_path",
    "undo_moves",
]

MANIFEST_FORMAT = "dedup-index-moves"
MANIFEST_VERSION = 1
#: The ``reject_reason`` values of a removed-rows table.
REASONS = ("duplicate", "load_error", "already_indexed")
#: The columns the operator records for path values: size and mtime at run time.
STAMP_COLUMNS = ("file_size", "file_mtime_ns")
_PARTIAL = ".dedup-index-partial"
#: ``os.link`` errors that mean "no hard links here" (FAT, some network filesystems,
#: protected_hardlinks): the move falls back to a checked ``os.rename``.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


class MoveError(DedupIndexError, ValueError):
    """Bad input to :func:`move_removed` / :func:`undo_moves` (an unreadable removed file
    or manifest, a missing folder, ...), raised before any file is moved or written."""


@dataclass
class Move:
    """One file moved (or, in a dry run, to be moved) from ``source`` to ``target``."""

    row: int | None
    source: Path
    target: Path
    size: int
    mtime_ns: int


@dataclass
class Refusal:
    """A row whose file was not moved, and why."""

    row: int | None
    path: str
    reason: str


@dataclass
class MoveReport:
    """What :func:`move_removed` or :func:`undo_moves` did.

    ``moved``: files moved (moved back, for an undo); ``refused``: files left where they
    are because a check failed; ``skipped``: nothing to do (a file listed twice, a file
    already back in place); ``manifest``: the journal (None for a dry run of a move)."""

    moved: list[Move] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[Refusal] = field(default_factory=list)
    manifest: Path | None = None
    dry_run: bool = False


class _Refused(Exception):
    """A per-file check failed: the file is left where it is."""


# ------------------------------------------------------------------------ paths and stamps


def resolve_image_path(value: Any, image_root: str | os.PathLike | None = None) -> Path | None:
    """The local file an image value names, resolved as the image loader resolves it
    (``~`` expanded, relative paths joined to ``image_root``, else to the current
    directory), or None for values that name no local file (bytes, URLs, data URIs)."""
    raw = image_path(value)
    if raw is None or raw.lstrip()[:8].lower().startswith(("http://", "https://")):
        return None
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    if image_root is not None:
        return Path(os.fsdecode(os.fspath(image_root))).expanduser() / path
    return path.absolute()


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file (symbolic links followed), else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def file_stamps(
    values: Iterable[Any], image_root: str | os.PathLike | None = None
) -> tuple[list[int | None], list[int | None]]:
    """Sizes and modification times (ns) of the files ``values`` name (None where a value
    names no existing regular file): the ``file_size`` and ``file_mtime_ns`` columns that
    let :func:`move_removed` refuse a file changed since the run."""
    sizes: list[int | None] = []
    mtimes: list[int | None] = []
    for value in values:
        path = resolve_image_path(value, image_root)
        found = file_stamp(path) if path is not None else None
        sizes.append(found[0] if found else None)
        mtimes.append(found[1] if found else None)
    return sizes, mtimes


# ------------------------------------------------------------------------ the removed file


def read_removed(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a removed-rows table (.jsonl, .json, .csv, .parquet), as dicts.

    The text formats are parsed with the standard library rather than pandas, which reads
    an integer column with a missing value as float64 and so rounds ``file_mtime_ns``
    (about 1.7e18) to a multiple of 256 ns."""
    from .tables import read_table, type_from_extension

    path = Path(path)
    if not path.is_file():
        raise MoveError(f"removed file {str(path)!r} does not exist")
    try:
        kind = type_from_extension(str(path))
    except ValueError as exc:
        raise MoveError(str(exc)) from None
    try:
        if kind == "jsonl":
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif kind == "json":
            rows = json.loads(path.read_text(encoding="utf-8") or "[]")
        elif kind == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                rows = [
                    {k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)
                ]
        else:
            rows = read_table(path, kind).to_dict("records")
    except (OSError, ValueError) as exc:
        raise MoveError(f"cannot read the removed file {str(path)!r}: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MoveError(f"removed file {str(path)!r} is not a table of records")
    return rows


def _as_int(value: Any) -> int | None:
    """An integer cell from any format (``"12"``, ``12.0``, numpy ints), None if missing."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            return int(value) if value.strip().lstrip("-").isdigit() else int(float(value))
        if value != value:  # NaN
            return None
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _cell(value: Any) -> Any:
    """None for the missing-value markers of pandas and NumPy, the value otherwise."""
    if value is None:
        return None
    try:
        if value != value:  # NaN, NaT
            return None
    except (TypeError, ValueError):  # pd.NA compares ambiguously
        return None
    return value


# ----------------------------------------------------------------------------- journal


class _Journal:
    """The manifest: JSON lines appended and fsynced one at a time."""

    def __init__(self, path: Path, create: bool) -> None:
        self.path = path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "x" if create else "a", encoding="utf-8")  # noqa: SIM115
        if create:
            fsync_dir(path.parent)

    def record(self, entry: dict[str, Any]) -> None:
        """Append one record durably; a manifest that cannot be written stops the run
        (a ``RuntimeError``, not a per-file refusal): no move goes unrecorded."""
        try:
            self._file.write(json.dumps(entry, sort_keys=True) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise RuntimeError(f"cannot write the manifest {self.path}: {exc}; stopped") from exc

    def close(self) -> None:
        self._file.close()


def read_manifest(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A manifest's header and records.  A torn last line (a kill while it was being
    written) is ignored; anything else that is not a record raises :class:`MoveError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoveError(f"manifest {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise MoveError(
            f"{str(path)!r} is not a dedup-index move manifest (not UTF-8 text)"
        ) from None
    except OSError as exc:
        raise MoveError(f"cannot read the manifest {str(path)!r}: {exc}") from None
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # the last line, not newline-terminated: torn
                break
            raise MoveError(f"manifest {str(path)!r} is corrupt at line {n + 1}") from None
        if not isinstance(entry, dict):
            raise MoveError(f"manifest {str(path)!r} is corrupt at line {n + 1}")
        records.append(entry)
    if not records or records[0].get("format") != MANIFEST_FORMAT:
        raise MoveError(
            f"{str(path)!r} is not a dedup-index move manifest (no {MANIFEST_FORMAT!r} header)"
        )
    if records[0].get("version") != MANIFEST_VERSION:
        raise MoveError(
            f"manifest {str(path)!r} has version {records[0].get('version')!r}; this "
            f"dedup_index reads version {MANIFEST_VERSION} only"
        )
    return records[0], records[1:]


def _lock(manifest: Path) -> WriterLock:
    return WriterLock(
        manifest,
        lambda: MoveError(f"manifest {str(manifest)!r} is in use by another apply or undo"),
    ).acquire()


def _default_manifest(move_to: Path) -> Path:
    base = "dedup-index-undo-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path, n = move_to / f"{base}.jsonl", 1
    while os.path.lexists(path):
        n += 1
        path = move_to / f"{base}-{n}.jsonl"
    return path


# ------------------------------------------------------------------------ one file's move


def _check_file(path: Path, size: int | None, mtime_ns: int | None, since: str) -> None:
    """Refuse anything but the regular file with this size and mtime at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _Refused("no such file") from None
    except OSError as exc:
        raise _Refused(f"cannot read it: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _Refused("a symbolic link, not moved")
    if not stat.S_ISREG(st.st_mode):
        raise _Refused("not a regular file")
    if size is None or mtime_ns is None:
        raise _Refused(
            "no file_size/file_mtime_ns recorded for it, so a change since the run cannot "
            "be ruled out"
        )
    if st.st_size != size or st.st_mtime_ns != mtime_ns:
        what = []
        if st.st_size != size:
            what.append(f"size {size} -> {st.st_size}")
        if st.st_mtime_ns != mtime_ns:
            what.append(f"modified {(st.st_mtime_ns - mtime_ns) / 1e9:+.3f} s later")
        raise _Refused(f"changed since {since} ({', '.join(what)})")


def _same_inode(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are two names of one file (symbolic links not followed)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _place(src: Path, dst: Path) -> None:
    """Give the file ``src`` the name ``dst`` too (hard link), never overwriting; where
    hard links are not supported, rename it after checking ``dst`` is free."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise _Refused(f"{dst} already exists (never overwritten)") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(dst):
            raise _Refused(f"{dst} already exists (never overwritten)") from None
        os.rename(src, dst)


def _relocate(src: Path, dst: Path, journal: _Journal, entry: int, stage: str) -> None:
    """Move one file, ``src`` -> ``dst``; at every instant the file is at ``src``, at
    ``dst``, or at both (one inode, or a verified copy), never lost or overwritten."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not _same_inode(src, dst):  # else an interrupted move left both names: finish it
        if os.path.lexists(dst):
            raise _Refused(f"{dst} already exists (never overwritten)")
        try:
            _place(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            journal.record({"op": f"{stage}_copy", "id": entry})
            _copy_across(src, dst, stage)
            return
        fsync_dir(dst.parent)
        if not os.path.lexists(src):  # renamed (no hard links): done
            fsync_dir(src.parent)
            return
        crash_point(f"{stage}_linked")
    try:
        os.unlink(src)
    except OSError:
        os.unlink(dst)  # the second name of the same inode: back to the state before
        fsync_dir(dst.parent)
        raise
    fsync_dir(src.parent)


def _copy_across(src: Path, dst: Path, stage: str) -> None:
    """Another filesystem: copy to a partial file beside ``dst``, fsync, verify byte for
    byte, give it its name, and only then unlink ``src``."""
    partial = dst.with_name(f".{dst.name}{_PARTIAL}")
    try:
        shutil.copyfile(src, partial, follow_symlinks=False)
        shutil.copystat(src, partial, follow_symlinks=False)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        if not filecmp.cmp(src, partial, shallow=False):
            raise OSError(errno.EIO, f"the copy of {src} at {partial} differs from it")
        crash_point(f"{stage}_partial")
        _place(partial, dst)
    except BaseException:
        if os.path.lexists(partial):
            os.unlink(partial)
        raise
    if os.path.lexists(partial):
        os.unlink(partial)
    fsync_dir(dst.parent)
    crash_point(f"{stage}_copied")
    os.unlink(src)
    fsync_dir(src.parent)


# ----------------------------------------------------------------------------- apply


def move_removed(
    removed: str | os.PathLike | Sequence[dict[str, Any]],
    move_to: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    image_key: str = "image",
    reasons: Iterable[str] = ("duplicate",),
    manifest: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> MoveReport:
    """Move the files of a removed-rows table under ``move_to``, keeping their paths
    relative to ``image_root``, and record every move in ``manifest``.

    ``removed`` is the table's path (``dedup-index run --removed``) or its rows.  Only
    rows whose ``reject_reason`` is in ``reasons`` (default: duplicates only) are moved.
    ``image_root`` is the folder the table's relative paths resolve against: the run's
    ``--image-root``, or for a folder input the folder itself (default: the current
    directory).  ``manifest`` defaults to a new ``dedup-index-undo-<UTC time>.jsonl`` in
    ``move_to``; it must not exist.  ``dry_run``: check everything, move and write
    nothing.  Files that fail a check are refused (:attr:`MoveReport.refused`), the rest
    move; bad arguments raise :class:`MoveError` before anything is written.
    """
    reasons = tuple(reasons)
    bad = [r for r in reasons if r not in REASONS]
    if bad or not reasons:
        raise MoveError(f"reasons must be some of {', '.join(REASONS)}, got {reasons!r}")
    root = Path(image_root).expanduser() if image_root is not None else Path.cwd()
    if not root.is_dir():
        raise MoveError(f"image_root={str(root)!r} is not a folder")
    move_to = Path(move_to).expanduser()
    if os.path.lexists(move_to) and not move_to.is_dir():
        raise MoveError(f"move_to={str(move_to)!r} exists and is not a folder")
    if move_to.is_dir() and os.path.samefile(move_to, root):
        raise MoveError(f"move_to={str(move_to)!r} is the image root; give another folder")
    manifest_path = Path(manifest).expanduser() if manifest is not None else None
    if manifest_path is not None and os.path.lexists(manifest_path):
        raise MoveError(f"manifest={str(manifest_path)!r} exists; give a new file")
    source_name = None
    if isinstance(removed, (str, os.PathLike)):
        source_name = str(Path(removed).absolute())
        rows = read_removed(removed)
    else:
        rows = list(removed)
    if rows:
        columns = set().union(*(r.keys() for r in rows))
        if "reject_reason" not in columns:
            raise MoveError(
                "the removed table has no reject_reason column; give the table written by "
                "dedup-index run --removed (or the operator's rejects)"
            )
        if image_key not in columns:
            raise MoveError(
                f"image column {image_key!r} not found in the removed table; its columns are "
                f"{', '.join(sorted(map(str, columns)))} (pass image_key=)"
            )
        if not set(STAMP_COLUMNS) <= columns:
            raise MoveError(
                "the removed table has no file_size/file_mtime_ns columns, so files changed "
                "since the run cannot be told apart: run dedup-index run --removed again "
                "with this version"
            )

    report = MoveReport(dry_run=dry_run)
    plan = _plan(rows, root, move_to, image_key, reasons, report)
    if (
        rows
        and not plan
        and report.refused
        and all(r.reason == "no such file" for r in report.refused)
    ):
        raise MoveError(
            f"none of the {len(report.refused)} files to move exist under the image root "
            f"{str(root)!r} (first: {report.refused[0].path!r}): pass image_root= (the "
            "run's image root, or for a folder input the folder), unless they were "
            "already moved"
        )
    if dry_run:
        report.moved = plan
        return report

    if not plan:
        return report
    move_to.mkdir(parents=True, exist_ok=True)
    manifest_path = manifest_path or _default_manifest(move_to)
    journal = _Journal(manifest_path, create=True)
    report.manifest = manifest_path
    lock = _lock(manifest_path)
    try:
        journal.record(
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "removed": source_name,
                "image_root": str(root.absolute()),
                "move_to": str(move_to.absolute()),
                "reasons": list(reasons),
            }
        )
        for n, move in enumerate(plan):
            try:
                _check_file(move.source, move.size, move.mtime_ns, "the run")
                if os.path.lexists(move.target) and not _same_inode(move.source, move.target):
                    raise _Refused(f"{move.target} already exists (never overwritten)")
                journal.record(
                    {
                        "op": "move",
                        "id": n,
                        "row": move.row,
                        "from": str(move.source),
                        "to": str(move.target),
                        "size": move.size,
                        "mtime_ns": move.mtime_ns,
                    }
                )
                _relocate(move.source, move.target, journal, n, "apply")
                crash_point("apply_moved")
                now = file_stamp(move.target) or (None, None)
                journal.record({"op": "done", "id": n, "size": now[0], "mtime_ns": now[1]})
                report.moved.append(move)
            except _Refused as why:
                report.refused.append(Refusal(move.row, str(move.source), str(why)))
            except OSError as exc:
                report.refused.append(
                    Refusal(move.row, str(move.source), f"could not move it: {exc}")
                )
    finally:
        journal.close()
        lock.release()
    return report


def _plan(
    rows: Sequence[dict[str, Any]],
    root: Path,
    move_to: Path,
    image_key: str,
    reasons: tuple[str, ...],
    report: MoveReport,
) -> list[Move]:
    """The moves the checks allow; refusals and skips go to ``report``."""
    root_abs = os.path.abspath(root)
    move_to_abs = Path(os.path.abspath(move_to))
    plan: list[Move] = []
    seen: dict[str, int | None] = {}
    for r in rows:
        if r.get("reject_reason") not in reasons:
            continue
        row = _as_int(r.get("row"))
        value = _cell(r.get(image_key))
        shown = str(value)
        source = resolve_image_path(value, root) if isinstance(value, str) else None
        try:
            if source is None:
                raise _Refused("not a local file path")
            source = Path(os.path.abspath(source))
            shown = str(source)
            rel = os.path.relpath(source, root_abs)
            if rel == os.curdir or rel.split(os.sep, 1)[0] == os.pardir:
                raise _Refused(f"outside the image root {root_abs}")
            if str(source) in seen:
                report.skipped.append(
                    Refusal(row, shown, f"the same file as row {seen[str(source)]}, moved once")
                )
                continue
            target = move_to_abs / rel
            size, mtime = _as_int(r.get("file_size")), _as_int(r.get("file_mtime_ns"))
            if size is None or mtime is None:
                raise _Refused(
                    "no file_size/file_mtime_ns recorded: the run found no file here (bytes, "
                    "a URL, or a file missing then)"
                )
            if not os.path.lexists(source) and file_stamp(target) == (size, mtime):
                report.skipped.append(Refusal(row, shown, f"already moved to {target}"))
                continue
            _check_file(source, size, mtime, "the run")
            kept = _cell(r.get("duplicate_of"))
            kept_path = resolve_image_path(kept, root) if isinstance(kept, str) else None
            if r.get("reject_reason") == "duplicate" and kept_path is not None:
                try:
                    same = os.path.samefile(source, kept_path)
                except OSError:
                    same = False
                if same:
                    raise _Refused(
                        f"the same file as the kept row it duplicates "
                        f"(row {_as_int(r.get('duplicate_of_row'))}): moving it would "
                        "remove the kept image"
                    )
            if os.path.lexists(target) and not _same_inode(source, target):
                raise _Refused(f"{target} already exists (never overwritten)")
        except _Refused as why:
            report.refused.append(Refusal(row, shown, str(why)))
            continue
        seen[str(source)] = row
        plan.append(Move(row, source, target, size, mtime))
    return plan


# ------------------------------------------------------------------------------ undo


def undo_moves(manifest: str | os.PathLike, *, dry_run: bool = False) -> MoveReport:
    """Move back every file ``manifest`` records as moved (or being moved when a kill
    stopped the run), newest first, refusing to overwrite and refusing a file changed
    since it was moved.  A file already at its old place is skipped, so undo can be run
    again after an interrupted undo.  Undo's steps are appended to the manifest."""
    path = Path(manifest).expanduser()
    header, records = read_manifest(path)
    moves: dict[int, dict[str, Any]] = {}
    copied: set[int] = set()
    for rec in records:
        op, n = rec.get("op"), rec.get("id")
        if op == "move" and isinstance(n, int):
            moves[n] = dict(rec, moved_size=rec.get("size"), moved_mtime_ns=rec.get("mtime_ns"))
        elif op == "done" and n in moves and rec.get("size") is not None:
            # the file as it was at its new place (a copy's mtime may be rounded there)
            moves[n].update(moved_size=rec["size"], moved_mtime_ns=rec.get("mtime_ns"))
        elif op in ("apply_copy", "undo_copy"):
            copied.add(n)
    report = MoveReport(dry_run=dry_run, manifest=path)
    if dry_run:
        for n in sorted(moves, reverse=True):
            _undo_one(n, moves[n], n in copied, None, report)
        return report
    lock = _lock(path)
    journal = _Journal(path, create=False)
    try:
        journal.record(
            {"op": "undo_start", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
        for n in sorted(moves, reverse=True):
            _undo_one(n, moves[n], n in copied, journal, report)
    finally:
        journal.close()
        lock.release()
    return report


def _undo_one(
    n: int, rec: dict[str, Any], copied: bool, journal: _Journal | None, report: MoveReport
) -> None:
    old, new = Path(rec["from"]), Path(rec["to"])
    size, mtime = _as_int(rec.get("size")), _as_int(rec.get("mtime_ns"))
    move = Move(_as_int(rec.get("row")), new, old, size or 0, mtime or 0)
    at_old, at_new = os.path.lexists(old), os.path.lexists(new)
    try:
        if at_new and not at_old:
            _check_file(
                new,
                _as_int(rec.get("moved_size")),
                _as_int(rec.get("moved_mtime_ns")),
                "it was moved",
            )
            if journal is not None:
                journal.record({"op": "undo", "id": n})
                _relocate(new, old, journal, n, "undo")
                crash_point("undo_moved")
                journal.record({"op": "undone", "id": n})
            report.moved.append(move)
        elif at_old and at_new:
            # A kill between giving the file its second name and removing the first: both
            # names hold one inode, or (another filesystem) a verified copy.
            try:
                one_inode = os.path.samefile(old, new)
            except OSError:
                one_inode = False
            twin = one_inode or (copied and filecmp.cmp(old, new, shallow=False))
            if not twin:
                raise _Refused(f"{old} already exists (never overwritten); left at {new}")
            _check_file(old, size, mtime, "the run")
            if journal is not None:
                journal.record({"op": "undo", "id": n})
                os.unlink(new)
                fsync_dir(new.parent)
                journal.record({"op": "undone", "id": n})
            report.moved.append(move)
        elif at_old:
            report.skipped.append(Refusal(move.row, str(old), "already in place"))
        else:
            raise _Refused(f"neither {old} nor {new} exists")
    except _Refused as why:
        report.refused.append(Refusal(move.row, str(new), str(why)))
    except OSError as exc:
        report.refused.append(Refusal(move.row, str(new), f"could not move it back: {exc}"))
    if copied and journal is not None and os.path.lexists(old) and not os.path.lexists(new):
        for folder, name in ((old.parent, old.name), (new.parent, new.name)):
            partial = folder / f".{name}{_PARTIAL}"  # an interrupted copy's, never a user's
            if os.path.lexists(partial):
                os.unlink(partial)
