"""One identity for an image value: the key the index, the cache, the CLI and the operator use.

The same photo must get the same key whichever door it came in by, so there is exactly one
function that makes it, :func:`image_key`:

- a path (``str``, ``os.PathLike``, a datasets dict with a ``path`` and no ``bytes``): the
  path *as given*, in POSIX form, relative to the input's image root when it is relative
  (``"week1/a.jpg"``), never resolved: keys stay the same when the collection moves;
- ``http(s)://`` URLs: the URL as given;
- content without a name (file bytes, a datasets dict with ``bytes``, a ``data:`` URI, a
  numpy array, an in-memory PIL image): a SHA-256 of the content, from
  :func:`content_key`, e.g. ``"sha256:9f86..."``;
- anything else: ``"row:<row>"``, the row it came from.

:func:`content_key` is also what the embedding cache fingerprints content by
(:func:`dedup_index.encode.cache.fingerprint`, which adds a file's resolved path, size and
modification time for paths, since a cached embedding must follow the file's bytes).

>>> image_key("photos/a.jpg")
'photos/a.jpg'
>>> image_key(b"\\xff\\xd8 not really a jpeg")[:7]
'sha256:'
>>> image_key(None, row=3)
'row:3'
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["CONTENT_KEY_KINDS", "content_key", "image_key", "image_path", "key_path", "printable"]

#: Prefixes of the keys :func:`image_key` gives values without a path (content hashes, rows).
CONTENT_KEY_KINDS = ("sha256", "datauri", "array", "pil", "row")


def image_path(value: Any) -> str | None:
    """The file path (or URL) a value names, as given, or None when it names none."""
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return None
        value = value.get("path")
    if isinstance(value, os.PathLike):
        value = os.fsdecode(os.fspath(value))
    if not isinstance(value, str) or not value:
        return None
    if value.lstrip()[:5].lower() == "data:":
        return None
    if value.lstrip()[:8].lower().startswith(("http://", "https://")):
        return value
    return PurePath(value).as_posix()


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name that is not (``caf\\xe9.jpg``, decoded by Python
    with surrogate escapes) gets its undecodable bytes written as ``\\xNN``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def content_key(value: Any) -> str | None:
    """A SHA-256 of the image content a value carries, or None when it carries none
    (paths, URLs, unsupported types).  Equal keys load as the same RGB image."""
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        data = value.get("bytes")
        return content_key(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
    if isinstance(value, str):
        if value.lstrip()[:5].lower() == "data:":
            return "datauri:" + hashlib.sha256(value.strip().encode("utf-8")).hexdigest()
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(value).hexdigest() if len(value) else None
    if isinstance(value, np.ndarray):
        h = hashlib.sha256(f"{value.dtype.str}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).data)
        return "array:" + h.hexdigest()
    from PIL import Image

    if isinstance(value, Image.Image):
        return _pil_key(value)
    return None


def _pil_key(img: Any) -> str:
    """Pixels plus what the loader's conversion to RGB depends on (palette, transparency,
    EXIF orientation, the frame shown)."""
    h = hashlib.sha256(f"{img.mode}|{img.size}|frame {img.tell()}|".encode())
    h.update(img.tobytes())
    if img.mode in ("P", "PA") and img.palette is not None:
        h.update(f"|palette {img.palette.mode}|".encode())
        h.update(bytes(img.palette.tobytes()))
    h.update(f"|transparency {img.info.get('transparency')!r}".encode())
    h.update(f"|orientation {img.getexif().get(0x0112)!r}".encode())
    return "pil:" + h.hexdigest()


def image_key(value: Any, row: int | None = None) -> str:
    """The key of an image value: its path as given, else a hash of its content, else
    ``"row:<row>"`` (see the module docstring).  Raises ``ValueError`` for a value with
    neither a path nor content when no ``row`` is given."""
    path = image_path(value)
    if path is not None:
        return printable(path)
    key = content_key(value)
    if key is not None:
        return key
    if row is None:
        raise ValueError(
            f"a {type(value).__name__} value has neither a path nor image content to key it by"
        )
    return f"row:{row}"


def key_path(key: str) -> str | None:
    """The path or URL an image key names (to load that image again), or None for a
    content-hash or row key (the image itself is not kept anywhere)."""
    kind, sep, rest = str(key).partition(":")
    if sep and kind in CONTENT_KEY_KINDS:
        if rest.isdigit() if kind == "row" else len(rest) == 64 and rest.isalnum():
            return None
    return str(key)
