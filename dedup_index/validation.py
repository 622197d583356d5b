"""Parameter checks done up front, with messages that name the bad value and the range."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """Return ``threshold`` as a float in [0, 1] or raise ``ValueError``."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {threshold!r}")
    value = float(threshold)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (cosine similarity), got {threshold!r}")
    return value


def check_choice(value: Any, allowed: Iterable[str], name: str) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise ``ValueError``."""
    allowed = tuple(allowed)
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int >= 1 (or None when allowed); otherwise raise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_non_negative_int(value: Any, name: str) -> int:
    """Return ``value`` as an int >= 0; otherwise raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one): the one
    count of usable cores every worker pool sizes itself from."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(threads: int | None) -> int:
    """CPU workers of a search: ``threads`` if given, else the usable cores (at most 16)."""
    if threads is not None:
        count = int(threads)
        if count < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        return count
    return min(available_cpus(), 16)


def resolve_device(device: Any, *, what: str = "running") -> str | None:
    """The one rule for ``device=`` (encoders and search alike): None stays None (the
    caller's default), ``"auto"`` is ``"cuda"`` when available else ``"cpu"``; CUDA asked for
    where there is none warns and gives ``"cpu"`` (upstream pipelines hard-code
    ``device="cuda"``: run them anyway, and say so); an unknown device, or a ``cuda:N``
    beyond the GPUs present, is a ``ValueError``.  ``what`` names the work in the warning.
    ``"cpu"`` imports nothing; anything else imports torch."""
    if device is None or str(device) == "cpu":
        return None if device is None else "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {device!r}"
        ) from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            logger.warning(
                "device=%r asked for but CUDA is not available: %s on the CPU", str(device), what
            )
            return "cpu"
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"device={str(device)!r}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return str(parsed)
