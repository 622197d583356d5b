"""Names that a package exports but imports only on first use (PEP 562).

``import dedup_index`` (and ``dedup_index.encode``, ``dedup_index.distributed``) must stay
light: torch, transformers, FAISS and Ray load only in the stage that needs them.  A package
lists its exports as ``name -> defining module`` and installs the pair of functions this
module returns:

>>> __getattr__, __dir__ = lazy_exports(__name__, {"load_encoder": "dedup_index.encode"})
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports[name]`` is imported when
    ``name`` is first read, then cached in the package's namespace."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
