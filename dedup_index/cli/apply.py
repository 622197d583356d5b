"""``dedup-index apply REMOVED --move-to DIR``: move the removed files aside; ``dedup-index
apply --undo MANIFEST``: put them back.

CLI glue around :func:`dedup_index.io.moves.move_removed` and
:func:`~dedup_index.io.moves.undo_moves`, which hold the rules (never delete, never
overwrite, refuse files changed since the run, one journal record before and after each
move).  Exit codes: 0 every file moved, 1 some refused (each named with its reason on
stderr), 2 bad arguments (nothing moved or written).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import EXIT_FAILURE, EXIT_OK, UsageError, shell_message

EXAMPLES = """\
examples:
  # a folder input: paths in removed.jsonl are relative to the folder
  dedup-index run photos/ --model efficientnet-lite0 --removed removed.jsonl
  dedup-index apply removed.jsonl --image-root photos --move-to trash/ --dry-run
  dedup-index apply removed.jsonl --image-root photos --move-to trash/

  # put everything back
  dedup-index apply --undo trash/dedup-index-undo-20260102-093000.jsonl

Only rows removed as near-duplicates are moved, unless --reason says otherwise; files
keep their path relative to --image-root under --move-to.  Nothing is deleted or
overwritten; a file whose size or modification time differs from the run's is refused.
exit codes: 0 all moved, 1 some refused (each named), 2 bad arguments (nothing moved)
"""

#: The library's parameter names as this command's flags.
_FLAGS = {
    "image_root=": "--image-root ",
    "move_to=": "--move-to ",
    "manifest=": "--manifest ",
    "image_key=": "--image-key",
    "reasons must": "--reason must",
}


def add_parser(sub: Any, parents: list) -> None:
    p = sub.add_parser(
        "apply",
        parents=parents,
        help="move the removed files to a folder (with an undo manifest), or undo that",
        description="Act on a run's removed rows (dedup-index run --removed FILE): move their "
        "files under --move-to, keeping their paths relative to --image-root, and write a "
        "manifest that records every move; --undo MANIFEST moves them back.  Only rows "
        "removed as near-duplicates (reject_reason 'duplicate') are moved by default.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "removed",
        metavar="REMOVED",
        nargs="?",
        help="the removed rows written by 'dedup-index run --removed' (.jsonl/.json/.csv/.parquet)",
    )
    p.add_argument(
        "--move-to",
        metavar="DIR",
        default=None,
        help="folder the files are moved under (created if missing), keeping their paths "
        "relative to --image-root",
    )
    p.add_argument(
        "--image-root",
        metavar="DIR",
        default=None,
        help="folder the removed file's relative paths resolve against: the run's "
        "--image-root, or for a folder INPUT that folder (default: the current directory)",
    )
    p.add_argument("--image-key", default="image", help="image column (default: %(default)s)")
    p.add_argument(
        "--reason",
        action="append",
        choices=("duplicate", "load_error", "already_indexed"),
        default=None,
        help="move the rows removed for this reason; repeat for several, e.g. --reason "
        "duplicate --reason load_error to move unloadable files too (default: duplicate only)",
    )
    p.add_argument(
        "--manifest",
        default=None,
        help="the undo manifest to write, a new file (default: "
        "DIR/dedup-index-undo-<UTC time>.jsonl)",
    )
    p.add_argument(
        "--undo",
        metavar="MANIFEST",
        default=None,
        help="move back every file this manifest records as moved (also after an "
        "interrupted apply or undo); refuses to overwrite",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check and print what would move; move and write nothing",
    )
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from ..io import moves

    if args.undo is not None:
        extra = [
            flag
            for flag, value in (
                ("REMOVED", args.removed),
                ("--move-to", args.move_to),
                ("--image-root", args.image_root),
                ("--manifest", args.manifest),
                ("--reason", args.reason),
            )
            if value
        ]
        if extra:
            raise UsageError(f"--undo takes only the manifest; drop {', '.join(extra)}")
        with _usage(moves.MoveError):
            report = moves.undo_moves(args.undo, dry_run=args.dry_run)
        verb = "would move back" if args.dry_run else "moved back"
    else:
        if args.removed is None or args.move_to is None:
            raise UsageError(
                "give the removed file and --move-to DIR (apply REMOVED --move-to DIR), "
                "or --undo MANIFEST"
            )
        with _usage(moves.MoveError):
            report = moves.move_removed(
                args.removed,
                args.move_to,
                image_root=args.image_root,
                image_key=args.image_key,
                reasons=args.reason or ("duplicate",),
                manifest=args.manifest,
                dry_run=args.dry_run,
            )
        verb = "would move" if args.dry_run else "moved"
    for move in report.moved:
        print(f"{verb} {_shown(move.source)} -> {_shown(move.target)}")
    for note in report.skipped:
        print(f"skipped row {note.row} {_shown(note.path)}: {note.reason}")
    for refusal in report.refused:
        print(
            f"dedup-index: refused row {refusal.row} {_shown(refusal.path)}: {refusal.reason}",
            file=sys.stderr,
        )
    line = f"{len(report.moved)} {verb}, {len(report.refused)} refused"
    if report.skipped:
        line += f", {len(report.skipped)} skipped"
    if args.dry_run:
        line += " (dry run: nothing moved)"
    elif args.undo is None and report.manifest is not None:
        line += f"; undo: dedup-index apply --undo {_shown(report.manifest)}"
    print(line)
    return EXIT_FAILURE if report.refused else EXIT_OK


@contextmanager
def _usage(error: type[BaseException]) -> Iterator[None]:
    """The library's ``error`` (raised before anything moves) as a usage error, in flags;
    narrower than :func:`.common.usage_errors`, which would also turn a ``ValueError``
    raised half-way through the moves into "nothing written"."""
    try:
        yield
    except error as exc:
        text = shell_message(str(exc))
        for name, flag in _FLAGS.items():
            text = text.replace(name, flag)
        raise UsageError(text) from None


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the current directory when it is under it, else as it is."""
    try:
        rel = Path(path).relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(rel)


__all__ = ["add_parser", "command"]
