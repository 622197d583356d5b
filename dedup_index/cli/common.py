"""What every subcommand shares: the usage error, logging, output paths and formats.

The exit-code contract of the command line lives here: :class:`UsageError` (bad arguments
or input, found before any work and before anything is written) exits 2; anything else
that goes wrong exits 1.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io.inputs import TABLE_FORMATS
from ..search import backends as backend_registry

#: Exit codes: done, something failed, bad arguments or input.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

FORMATS = tuple(dict.fromkeys(TABLE_FORMATS.values()))

#: The library's parameter names as the shell spells them: errors raised by the library's
#: one validation (the operator's constructor, the index) are shown with the flag.
FLAGS = {
    "on_duplicate_key='skip'": "--skip-existing",
    "input_image_key": "--image-key",
    "output_score_key": "--score-key",
    "model_name": "--model",
    "batch_size": "--batch-size",
    "num_workers": "--workers",
    "image_root": "--image-root",
    "cache_dir": "--cache",
    "ray_work_dir": "--ray-work-dir",
    "verify": "--verify",
    "precision": "--precision",
    "ray": "--ray",
    "threshold": "--threshold",
    "backend": "--backend",
    "policy": "--policy",
    "score": "--score",
    "device": "--device",
    "dim": "--dim",
}
_NAMES = "|".join(re.escape(k) for k in FLAGS if "=" not in k)
_FLAG_PATTERNS = (
    # on_duplicate_key='skip' -> --skip-existing (a value that is a flag of its own)
    (re.compile(r"on_duplicate_key='skip'"), lambda m: FLAGS[m.group(0)]),
    # model_name='x' -> --model x
    (
        re.compile(rf"(?<![\w.-])({_NAMES})=(?:'([^']*)'|\"([^\"]*)\")"),
        lambda m: f"{FLAGS[m.group(1)]} {m.group(2) if m.group(2) is not None else m.group(3)}",
    ),
    # image_root=... / image_root= / threshold must ... -> the flag
    (
        re.compile(rf"(?<![\w.-])({_NAMES})(?:=\.\.\.|=(?![\w'\"])|(?= must\b))"),
        lambda m: FLAGS[m.group(1)],
    ),
    # a bare parameter name with an underscore: batch_size -> --batch-size
    (
        re.compile(
            r"(?<![\w.-])("
            + "|".join(re.escape(k) for k in FLAGS if "_" in k and "=" not in k)
            + r")(?![\w=])"
        ),
        lambda m: FLAGS[m.group(1)],
    ),
)


# Choices of the options: backend names from the registry (it imports numpy only), the
# rest spelled out, so that building the parser imports nothing heavy (``--help`` stays
# instant); tests hold them equal to the library's.
BACKENDS = backend_registry.BACKENDS
POLICIES = ("reference", "greedy", "component")
SCORES = ("nearest", "pairs")
INDEX_BACKENDS = backend_registry.INDEX_BACKENDS


class UsageError(Exception):
    """Bad arguments or input: printed as ``dedup-index: error: ...``, exit code 2."""


def shell_message(text: str) -> str:
    """``text`` with the library's parameter names replaced by the command's flags:
    ``"batch_size must be an integer >= 1"`` -> ``"--batch-size must be ..."``."""
    for pattern, flag in _FLAG_PATTERNS:
        text = pattern.sub(flag, text)
    return text


@contextmanager
def usage_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Bad input found by the library (its ``ValueError``/``TypeError``, a model that
    cannot be loaded, a missing optional package, and ``extra``) as a :class:`UsageError`
    spoken in flags: exit code 2, nothing written."""
    from ..errors import ModelLoadError

    try:
        yield
    except (ValueError, TypeError, ImportError, ModelLoadError, *extra) as exc:
        raise UsageError(shell_message(str(exc))) from None


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


def check_writable(outputs: dict[str, str | None]) -> None:
    """Refuse, before any work, an output whose folder cannot be written (read-only file
    system, permissions): the first existing folder up its path must be writable."""
    for option, path in outputs.items():
        if path is None:
            continue
        folder = Path(path).expanduser().absolute().parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: the folder {str(folder)!r} is not writable")


def check_not_an_image(outputs: dict[str, str | None], images: Iterable[str]) -> None:
    """Refuse an output path that names one of the input's images (``--report x.jpg``
    would overwrite a photo).  ``images``: the input's image files, resolved paths."""
    given = {
        os.path.normpath(Path(path).expanduser().absolute()): option
        for option, path in outputs.items()
        if path is not None
    }
    if not given:
        return
    for image in images:
        option = given.get(os.path.normpath(image))
        if option is not None:
            raise UsageError(f"{option} {image} is one of the input's images; write elsewhere")


def check_positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{option} must be an integer >= 1, got {value}")


def check_threshold_arg(value: float | None, option: str = "--threshold") -> None:
    import math

    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise UsageError(f"{option} must be in [0, 1] (cosine similarity), got {value}")
