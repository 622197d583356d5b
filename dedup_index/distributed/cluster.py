"""Connecting to a Ray cluster: an existing one, one at an address, or a local one."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """``ray``, or an error saying how to install it (the optional extra ``[ray]``)."""
    try:
        import ray
    except ImportError as err:  # pragma: no cover - ray is installed in the test env
        raise ImportError(
            "dedup_index.distributed needs Ray: pip install 'dedup-index[ray]' (ray[data] >= 2.40)"
        ) from err
    return ray


def connect(address: str | None = None, **init_kwargs: Any) -> Any:
    """Make sure this process is connected to a Ray cluster and return the ``ray`` module.

    - already connected (``ray.init`` called before, e.g. by a test or a notebook): that
      cluster is used as it is and ``address`` is not looked at;
    - ``address`` given (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``): joins it;
    - ``None``: the ``RAY_ADDRESS`` environment variable if set, otherwise a new local
      cluster on this machine's cores (what ``ray.init()`` does).

    ``init_kwargs`` go to ``ray.init`` (``num_cpus``, ``object_store_memory``, ...).  The
    dashboard is off unless asked for.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a string such as 'auto' or 'host:6379'; got {address!r}")
    init_kwargs.setdefault("include_dashboard", False)
    quiet = not logging.getLogger("dedup_index").isEnabledFor(logging.INFO)
    if quiet:  # Ray's own chatter only with -v (logging at INFO): our messages say enough
        quiet_ray()
        init_kwargs.setdefault("logging_level", logging.ERROR)
        init_kwargs.setdefault("log_to_driver", False)
    init_kwargs.setdefault("log_to_driver", True)
    logger.info("ray: connecting to %s", address or "a new local cluster (or RAY_ADDRESS)")
    if quiet:
        # The driver's core worker announces RAY_BACKEND_LOG_LEVEL on stderr as it starts,
        # whatever the level: keep that one line off the terminal (errors still raise).
        with _stderr_silenced():
            ray.init(address=address, **init_kwargs)
    else:
        ray.init(address=address, **init_kwargs)
    if quiet:
        import ray.data  # configures its loggers on import: quiet them after

        ray.data.DataContext.get_current().print_on_execution_start = False
        quiet_ray()
    return ray


@contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_ray() -> None:
    """Ray's Python loggers at ERROR and its C++ workers' stderr lines off (they go to the
    session's log files): what a user sees are this package's messages, once each."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data", "ray._private", "ray.rllib", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_cpus(ray: Any) -> int:
    """CPUs the cluster has now (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
