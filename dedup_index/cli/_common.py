"""What every subcommand shares: the usage error, logging, output paths and formats.

The exit-code contract of the command line lives here: :class:`UsageError` (bad arguments
or input, found before any work and before anything is written) exits 2; anything else
that goes wrong exits 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

#: Exit codes: done, something failed, bad arguments or input.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

#: Table formats the CLI reads and writes, by file extension.
TABLE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = tuple(dict.fromkeys(TABLE_FORMATS.values()))


# Choices of the options, spelled out so that building the parser imports nothing heavy
# (``--help`` stays instant); tests hold them equal to the library's.
BACKENDS = ("auto", "flat", "blocked", "partitioned", "ivf", "hnsw", "dense")
POLICIES = ("reference", "greedy", "component")
SCORES = ("nearest", "pairs")
INDEX_BACKENDS = ("blocked", "flat", "ivf", "hnsw")


class UsageError(Exception):
    """Bad arguments or input: printed as ``dedup-index: error: ...``, exit code 2."""


def setup_logging(verbose: int) -> None:
    """Warnings (or, with ``-v``, info) from the package to stderr; transformers quiet."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if verbose < 2:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def format_of(path: str | os.PathLike, default: str | None = None) -> str | None:
    """The table format of ``path`` from its extension, else ``default``."""
    return TABLE_FORMATS.get(Path(path).suffix.lower(), default)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (symlinks, ``..`` and relative paths resolved)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        try:
            return os.path.samefile(pa, pb)
        except OSError:
            pass
    return pa.expanduser().resolve() == pb.expanduser().resolve()


def check_outputs(inputs: Iterable[str | os.PathLike], outputs: dict[str, str | None]) -> None:
    """Refuse output paths that would overwrite an input, repeat, or are folders.

    ``outputs`` maps an option name (``--out``) to its path (None: not asked for).
    """
    inputs = [p for p in inputs if p is not None]
    given = [(opt, path) for opt, path in outputs.items() if path is not None]
    for opt, path in given:
        for source in inputs:
            if same_file(path, source):
                raise UsageError(
                    f"{opt} {path} would overwrite the input {source}; write elsewhere"
                )
        if Path(path).is_dir():
            raise UsageError(f"{opt} {path} is a folder; give a file path")
    for k, (opt, path) in enumerate(given):
        for other_opt, other in given[k + 1 :]:
            if same_file(path, other):
                raise UsageError(f"{opt} and {other_opt} name the same file {path}")


def check_positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{option} must be an integer >= 1, got {value}")


def check_threshold_arg(value: float | None, option: str = "--threshold") -> None:
    import math

    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UsageError(f"{option} must be in [0, 1] (cosine similarity), got {value}")
