"""Progress bars for the slow stages (embedding images), on only where someone is watching.

Embedding a large collection takes hours on a CPU, so an interactive run should show how
far it got and at what rate; but a bar written into a log file, a CI transcript or a
pipeline's captured stderr is noise.  :func:`progress` therefore returns a real ``tqdm``
bar only when its stream is a terminal (or when the caller forces it), and otherwise a
do-nothing object with the same ``update`` / ``close`` / context-manager interface, so
callers never branch on whether a bar exists.

tqdm is imported lazily, only when a bar is actually shown; without tqdm installed the
no-op bar is returned (and a debug message logged).  Messages go through ``logging`` only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Protocol, TextIO

logger = logging.getLogger(__name__)

#: Set to ``0`` (or ``false``/``no``/``off``) to turn automatic progress bars off.
ENV_VAR = "DEDUP_INDEX_PROGRESS"
_OFF = {"0", "false", "no", "off"}


class ProgressBar(Protocol):
    """What callers may use: ``update(n)``, ``close()`` and ``with ...:``."""

    def update(self, n: float = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> Any: ...


class NullProgress:
    """A progress bar that shows nothing: the same interface as a tqdm bar, doing nothing."""

    disable = True

    def __init__(self, total: int | None = None, desc: str = "") -> None:
        self.total = total
        self.desc = desc
        self.n = 0

    def update(self, n: float = 1) -> None:
        """Count ``n`` more items (kept in ``self.n`` so callers can still read it)."""
        self.n += n

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_enabled(enabled: bool | None = None, file: TextIO | None = None) -> bool:
    """Whether :func:`progress` would show a bar.

    ``enabled=True`` or ``False`` decides outright.  ``None`` (automatic) shows a bar only
    when ``DEDUP_INDEX_PROGRESS`` is not ``0`` and the stream (``file``, else stderr) is a
    terminal: redirected or captured output gets no bar.
    """
    if enabled is not None:
        return bool(enabled)
    if os.environ.get(ENV_VAR, "").strip().lower() in _OFF:
        return False
    stream = sys.stderr if file is None else file
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(
    total: int | None,
    desc: str,
    unit: str = "img",
    enabled: bool | None = None,
    *,
    file: TextIO | None = None,
) -> ProgressBar:
    """A progress bar over ``total`` items showing the rate in ``unit``/s, or a no-op one.

    Args:
        total: number of items expected (None if unknown: tqdm then shows a count only).
        desc: label shown before the bar, e.g. ``"embedding"``.
        unit: item name for the count and rate (``img`` -> ``img/s``).
        enabled: ``True`` forces a bar, ``False`` forbids one, ``None`` decides
            automatically (see :func:`progress_enabled`).
        file: stream to write to (default stderr).
    """
    if not progress_enabled(enabled, file):
        return NullProgress(total, desc)
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr if file is None else file,
        disable=False,  # tqdm's own auto-disable is already decided above
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
    )


__all__ = ["ENV_VAR", "NullProgress", "ProgressBar", "progress", "progress_enabled"]
