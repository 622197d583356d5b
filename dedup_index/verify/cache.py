"""Hashes and SIFT features kept beside the embedding cache, so a rerun decodes nothing twice.

With ``cache_dir`` (the operator's embedding cache, CLI ``--cache``), the verification
stage stores each image's hash and features under ``<cache_dir>/verify/<parameters>/``,
keyed by the same fingerprint as the embeddings (:func:`dedup_index.encode.cache.fingerprint`:
a path with its size and mtime, or a hash of the bytes or pixels), so an edited file is
new.  One small file per image and kind, written atomically; a file that cannot be read is
recomputed.  Load failures are not cached (the file may be fixed); "too small" and "no
features" are (they are facts of those pixels).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .geometry import Features, GeometricOptions

#: Bumped when what is stored changes meaning.
VERSION = 1


class FeatureCache:
    """Hashes and features of images by fingerprint, for one set of feature options."""

    def __init__(self, cache_dir: str | os.PathLike, options: GeometricOptions) -> None:
        params = f"v{VERSION}-side{options.side}-k{options.max_features}-c{options.contrast:g}"
        self.root = Path(cache_dir) / "verify" / params

    def _file(self, fp: str, kind: str) -> Path:
        key = hashlib.sha256(fp.encode("utf-8", "surrogatepass")).hexdigest()
        return self.root / key[:2] / f"{key[2:34]}.{kind}.npz"

    def _read(self, fp: str | None, kind: str):
        if fp is None:
            return None
        path = self._file(fp, kind)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def _write(self, fp: str | None, kind: str, **arrays: np.ndarray) -> None:
        if fp is None:
            return
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            atomic_write_bytes(self._file(fp, kind), buf.getvalue())
        except OSError:  # a read-only or full disk: the run goes on uncached
            pass

    def get_hash(self, fp: str | None):
        data = self._read(fp, "hash")
        return None if data is None else (data["hash"], data["mirror"])

    def put_hash(self, fp: str | None, hashes) -> None:
        self._write(fp, "hash", hash=hashes[0], mirror=hashes[1])

    def get_features(self, fp: str | None):
        """``(Features or None, reason or None)``, or None when not cached."""
        data = self._read(fp, "sift")
        if data is None:
            return None
        reason = str(data["reason"])
        if reason:
            return None, reason
        return Features(data["xy"], data["descriptors"], int(data["width"]), data["thumb"]), None

    def put_features(self, fp: str | None, features: Features | None, reason: str | None):
        if reason is not None and reason.startswith("load_error"):
            return
        if features is None:
            self._write(fp, "sift", reason=np.array(reason or "no_features"))
            return
        self._write(
            fp,
            "sift",
            reason=np.array(""),
            xy=features.xy,
            descriptors=features.descriptors,
            width=np.array(features.width),
            thumb=features.thumb if features.thumb is not None else np.zeros((0, 0), np.uint8),
        )


__all__ = ["FeatureCache"]
