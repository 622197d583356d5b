"""The ``dedup-index`` command line: ``run``, ``index``, ``verify`` and ``demo``.

Exit codes: 0 done; 2 bad arguments or input (missing input, empty table, no image
column, threshold outside [0, 1], an output that would overwrite the input, a model that
cannot be loaded), reported before anything is written; 1 any other failure (the message,
and the traceback with ``-v``).  Results go to stdout, logs and progress bars to stderr.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``command(args) -> int``; heavy imports (torch, FAISS) happen inside the commands, so
``dedup-index --help`` is quick.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .common import EXIT_FAILURE, EXIT_USAGE, UsageError, setup_logging

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  dedup-index demo                                   # offline demo with an HTML report
  dedup-index run photos/ --model efficientnet-lite0 --out kept.jsonl
  dedup-index index create my.index --model efficientnet-lite0
  dedup-index index add my.index photos/week1/
  dedup-index verify

'dedup-index COMMAND --help' shows each command's options and examples.
exit codes: 0 done, 1 failure, 2 bad arguments or input (nothing written)
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (argparse; ``--help`` on each, with examples)."""
    from .. import __version__
    from . import apply, calibrate, demo, index, run, serve, verify

    parser = argparse.ArgumentParser(
        prog="dedup-index",
        description="Remove near-duplicate images with image embeddings and a vector index.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dedup-index {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging; tracebacks on failure (-vv: transformers' logs too)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (run, apply, index, serve, verify, calibrate, demo):
        module.add_parser(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dedup-index`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments, 0 on --help
    verbose = args.verbose
    setup_logging(verbose)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"dedup-index: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dedup-index: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left (`... | head`): not a failure of ours.  Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # noqa: BLE001 - any failure: a message and exit 1
        if verbose:
            logger.exception("failed")
        print(f"dedup-index: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not verbose:
            print("(run again with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


__all__ = ["build_parser", "main"]
