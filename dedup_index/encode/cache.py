"""A persistent embedding cache: never embed the same image twice with the same model.

Embedding is the slow stage (about 12 images/s for CLIP ViT-B/32 on a CPU), so a rerun
over the same table, a table that grew by a few rows, or a run resumed after a crash should
only embed what it has not embedded before.  :class:`EmbeddingCache` keeps the embeddings
in an :class:`~dedup_index.store.EmbeddingStore` directory, each row keyed by a
*fingerprint* of the image value that produced it (:func:`fingerprint`):

* a local path: ``"path:" + resolved absolute path + ":" + size + ":" + mtime_ns``, so a
  file that is edited (or replaced, or touched) gets a new fingerprint and is re-embedded;
* image file bytes (``bytes``, ``bytearray``, ``memoryview``, a datasets dict with
  ``bytes``): ``"sha256:" + hex digest`` of the bytes;
* a ``data:`` URI: ``"datauri:" + sha256`` of the URI text;
* a numpy array or a PIL image: a SHA-256 of the raw pixel bytes with the shape and the
  dtype or mode (and, for PIL, what the loader's conversion to RGB depends on: palette,
  transparency, EXIF orientation);
* anything else (URLs, missing files, multi-frame PIL images, unsupported types): None,
  meaning *never cached*; the caller loads such values every time, and reports failures.

Each row also records the decoded image's pixel count, so a later run with a smaller
``max_pixels`` still refuses a cached oversize image exactly as a run without the cache
would.  Stored keys are ``fingerprint + "\\t" + pixels``.

The store's ``meta`` records the model (``model_name``, ``dim``): embeddings of another
model are meaningless here, so opening the cache with another model raises
:class:`CacheModelMismatchError` (``on_model_change="error"``, the default) or, with
``on_model_change="reset"``, moves the old cache aside to ``<path>.stale-<timestamp>``
(nothing is deleted) with a loud WARNING and starts an empty one.

Integrity comes from the store too: its shards and keys carry SHA-256 checksums per block,
checked when first read, so a flipped byte in the cache raises :class:`CacheCorruptError`
(naming the file, saying to delete the cache folder) instead of serving a wrong
embedding.  A cache written before checksums existed (store format 1) gets them on the
first run that opens it for writing (logged); its older rows are taken as they are.

Durability comes from the store: every :meth:`EmbeddingCache.add` is committed (fsync,
atomic manifest) before it returns, so a process killed mid-run keeps every batch it
finished.  One process writes at a time: the writer holds the exclusive writer lock
(:class:`~dedup_index.files.WriterLock`, an ``flock``) on
``<path>/.lock``; a second process opening the same cache meanwhile uses it read-only
(it reads what was committed, and caches nothing new) and says so in a warning.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DedupIndexError
from ..files import WriterLock
from ..io import DEFAULT_MAX_PIXELS
from ..io.keys import content_key, image_path
from ..store.embeddings import MANIFEST, EmbeddingStore, StoreCorruptError
from ..validation import check_choice

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "ON_MODEL_CHANGE",
    "CacheCorruptError",
    "CacheError",
    "CacheModelMismatchError",
    "EmbeddingCache",
    "encoder_identity",
    "fingerprint",
    "model_identity",
]

#: ``meta["format"]`` of a cache's store; other stores are refused, never reset.
CACHE_FORMAT = "dedup_index.EmbeddingCache"
CACHE_VERSION = 1
ON_MODEL_CHANGE = ("error", "reset")
LOCK_FILE = ".lock"
_SEP = "\t"  # between the fingerprint and the pixel count in a stored key


class CacheError(DedupIndexError, OSError):
    """The cache directory cannot be used (not a cache, locked while a reset is needed)."""


class CacheModelMismatchError(CacheError, ValueError):
    """The cache holds embeddings of another model (or dimension) than the one in use."""


class CacheCorruptError(CacheError, StoreCorruptError):
    """Bytes of the cache's files changed on disk after they were written (their SHA-256
    no longer matches): no cached embedding is served from them."""


# ----------------------------------------------------------------------------- fingerprints


def fingerprint(
    value: Any,
    image_root: str | os.PathLike[str] | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> str | None:
    """A string that identifies the image ``value`` stands for, or None if it has none.

    Two values with the same fingerprint load as the same RGB image, so an embedding
    computed for one can be reused for the other.  Paths are resolved the way the loader
    resolves them (``~`` expanded, relative ones against ``image_root``, else the current
    directory), then to an absolute path without symlinks; the file's size and
    modification time (ns) are part of the fingerprint, so an edited file is new.  Bytes
    are hashed (SHA-256).  In-memory PIL images larger than ``max_pixels`` get None, so
    fingerprinting never decodes a decompression bomb.  See the module docstring for each
    kind of value; None means "do not cache" (the loader still loads or reports it).
    """
    try:
        return _fingerprint(value, image_root, max_pixels)
    except (OSError, ValueError, TypeError):  # unreadable or odd values: just not cached
        return None


def _fingerprint(value: Any, image_root: Any, max_pixels: int | None) -> str | None:
    """A path's file identity now, else the value's content key (one identity for an
    image: :mod:`dedup_index.io.keys`), else None."""
    path = image_path(value)
    if path is not None:
        if path.lstrip()[:8].lower().startswith(("http://", "https://")):
            return None  # never fetched, so never cached
        return _path_fingerprint(path, image_root)
    if isinstance(value, Image.Image):
        width, height = value.size
        if max_pixels is not None and width * height > max_pixels:
            return None  # hashing it would decode a decompression bomb
        if getattr(value, "n_frames", 1) != 1 or value.tell() != 0:
            return None  # the loader takes frame 0: rare enough not to cache
    return content_key(value)


def _path_fingerprint(raw: str, image_root: Any) -> str | None:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        root = Path.cwd() if image_root is None else Path(os.fspath(image_root)).expanduser()
        path = root / path
    resolved = os.path.realpath(path)
    st = os.stat(resolved)
    if not stat.S_ISREG(st.st_mode):
        return None
    return f"path:{resolved}:{st.st_size}:{st.st_mtime_ns}"


def encoder_identity(model_name: str, encoder: Any = None) -> str:
    """What a cache (and an index) records as "the model": :func:`model_identity` of the
    name, plus the arithmetic when it is not fp32 on the CPU (``" [cuda fp16]"``): rows of
    another precision or device differ in their last bits (bf16 vs fp32 cosine down to 0.97
    on noisy JPEGs) and must not mix with these."""
    name = model_identity(model_name)
    device = str(getattr(encoder, "device", "cpu") or "cpu").split(":")[0]
    precision = str(getattr(encoder, "precision", "fp32") or "fp32")
    if device == "cpu" and precision == "fp32":
        return name
    return f"{name} [{device} {precision}]"


def model_identity(model_name: str) -> str:
    """The name a cache records for a model: a local checkpoint directory becomes its
    absolute real path (so ``./ckpt`` run from two folders is not taken for one model);
    hub ids are kept as given."""
    name = str(model_name)
    if os.path.isdir(name):
        return os.path.realpath(name)
    return name


# ---------------------------------------------------------------------------------- cache


class EmbeddingCache:
    """Embeddings of one model, keyed by image fingerprint, kept on disk across runs.

    Args:
        path: the cache directory (an :class:`~dedup_index.store.EmbeddingStore`),
            created on first use.
        model_name: the model whose embeddings this holds (see :func:`model_identity`).
        dim: the embedding dimension if known.  With None the store is created at the
            first :meth:`add` with the dimension of what is added.
        on_model_change: what to do when the cache at ``path`` was built with another
            model or dimension: ``"error"`` raises :class:`CacheModelMismatchError`;
            ``"reset"`` moves it to ``<path>.stale-<timestamp>`` and starts empty.

    Use as a context manager (or call :meth:`close`) to release the writer lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model_name: str,
        dim: int | None = None,
        on_model_change: str = "error",
    ) -> None:
        self._path = Path(path)
        self._model_name = str(model_name)
        self._dim = None if dim is None else int(dim)
        self._on_model_change = check_choice(on_model_change, ON_MODEL_CHANGE, "on_model_change")
        self._store: EmbeddingStore | None = None
        self._lock: WriterLock | None = None
        self._index: dict[str, tuple[int, int]] = {}  # fingerprint -> (row, pixels)
        self._closed = False
        if (self._path / MANIFEST).exists():
            self._open_existing()
        elif self._dim is not None:
            self._create(self._dim)

    @classmethod
    def check_model(
        cls, path: str | os.PathLike[str], *, model_name: str, dim: int | None = None
    ) -> None:
        """Raise :class:`CacheModelMismatchError` now if the cache at ``path`` (if any)
        holds another model's embeddings: lets a caller fail at construction, before any
        work, without taking the lock or reading the keys."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            return
        with EmbeddingStore.open(path, mode="r") as store:
            problem = _mismatch(path, store, str(model_name), dim)
        if problem is not None:
            raise _mismatch_error(path, problem, str(model_name), dim)

    # ------------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The cache directory."""
        return self._path

    @property
    def model_name(self) -> str:
        """The model whose embeddings are cached."""
        return self._model_name

    @property
    def dim(self) -> int | None:
        """Embedding dimension; None while the cache is empty and none was given."""
        return self._dim

    @property
    def writable(self) -> bool:
        """False when another process holds the writer lock (this one only reads)."""
        return self._store is None or self._store.mode == "a"

    def __len__(self) -> int:
        """Number of distinct fingerprints cached."""
        return len(self._index)

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache({str(self._path)!r}, model_name={self._model_name!r}, "
            f"dim={self._dim}, rows={len(self)})"
        )

    # --------------------------------------------------------------------------- reading

    def lookup(
        self, fingerprints: Sequence[str | None], *, max_pixels: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which fingerprints are cached, and their embeddings.

        Returns ``(found, E)``: ``found`` a bool mask over ``fingerprints`` (None is never
        found), ``E`` the ``(found.sum(), dim)`` float32 embeddings of the found ones in
        their order, bit for bit what was added.  With ``max_pixels``, images recorded as
        larger count as not found (the loader will refuse them, as without a cache).
        """
        self._check_open()
        found = np.zeros(len(fingerprints), dtype=bool)
        rows = np.zeros(len(fingerprints), dtype=np.int64)
        for k, fp in enumerate(fingerprints):
            hit = None if fp is None else self._index.get(fp)
            if hit is None:
                continue
            row, pixels = hit
            if max_pixels is not None and (pixels < 0 or pixels > max_pixels):
                continue
            found[k] = True
            rows[k] = row
        if self._store is None or not found.any():
            return found, np.zeros((0, self._dim or 0), dtype=np.float32)
        try:
            return found, self._store[rows[found]]
        except StoreCorruptError as err:
            raise self._damaged(err) from err

    # --------------------------------------------------------------------------- writing

    def add(
        self,
        fingerprints: Sequence[str | None],
        embeddings: Any,
        *,
        pixels: Sequence[int] | None = None,
    ) -> int:
        """Cache ``embeddings[k]`` under ``fingerprints[k]``, durably; return rows added.

        Rows whose fingerprint is None, already cached, or repeated earlier in the call are
        skipped (a fingerprint keeps its first row).  ``pixels`` gives each image's
        ``width * height`` (see :meth:`lookup`; unknown counts as too large for any
        ``max_pixels``).  Unit rows (as encoders return them) are stored exactly as given;
        others are L2-normalised.  The append is committed when this returns.  In a
        read-only cache (another process writes it) nothing is added.
        """
        self._check_open()
        arr = np.asarray(embeddings, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(fingerprints):
            raise ValueError(
                f"embeddings of shape {arr.shape} do not match {len(fingerprints)} fingerprints"
            )
        if pixels is not None and len(pixels) != len(fingerprints):
            raise ValueError(f"got {len(pixels)} pixel counts for {len(fingerprints)} rows")
        if self._dim is not None and arr.shape[1] != self._dim:
            raise ValueError(
                f"embeddings have {arr.shape[1]} columns; the cache at {self._path} holds "
                f"dim {self._dim} ({self._model_name})"
            )
        take: list[int] = []
        seen: set[str] = set()
        for k, fp in enumerate(fingerprints):
            if fp is None or fp in self._index or fp in seen:
                continue
            seen.add(fp)
            take.append(k)
        if not take:
            return 0
        if self._store is None:
            self._create(arr.shape[1])
        store = self._store  # made by _create above, if it was missing
        if store.mode != "a":
            return 0
        rows = arr[take]
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        unit = bool(np.all(np.abs(norms - 1.0) <= 1e-3))
        px = [-1 if pixels is None else int(pixels[k]) for k in take]
        keys = [f"{fingerprints[k]}{_SEP}{p}" for k, p in zip(take, px, strict=True)]
        try:
            ids = store.append(rows, keys, normalize=not unit)
        except StoreCorruptError as err:
            raise self._damaged(err) from err
        for k, row, p in zip(take, ids, px, strict=True):
            self._index[fingerprints[k]] = (int(row), p)
        return len(take)

    def close(self) -> None:
        """Release the store and the writer lock; the cache is unusable afterwards."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self._unlock()
        self._closed = True

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the embedding cache at {self._path} is closed")

    def _damaged(self, err: StoreCorruptError) -> CacheCorruptError:
        return CacheCorruptError(
            f"the embedding cache at {self._path} is damaged, so none of it is used: {err}. "
            f"Delete the folder {self._path} and run again: nothing else is lost, the "
            "embeddings it held are computed again and cached afresh"
        )

    def _meta(self, dim: int) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "model_name": self._model_name,
            "dim": dim,
        }

    def _create(self, dim: int) -> None:
        """Make the store (or open one another process just made) and take the lock."""
        store = EmbeddingStore.create(self._path, dim, meta=self._meta(dim), exist_ok=True)
        store.close()
        self._open_existing()

    def _open_existing(self) -> None:
        locked = self._try_lock()
        store = EmbeddingStore.open(self._path, mode="a" if locked else "r")
        try:
            problem = _mismatch(self._path, store, self._model_name, self._dim)
        except CacheError:
            store.close()
            self._unlock()
            raise
        if problem is not None:
            store.close()
            self._handle_mismatch(problem, locked)
            return
        self._store = store
        self._dim = store.dim
        if not locked:
            logger.warning(
                "the embedding cache at %s is being written by another process (or cannot be "
                "written): using it read-only; embeddings computed by this run are not cached",
                self._path,
            )
        self._index = {}
        try:
            keys = store.keys() or []
        except StoreCorruptError as err:
            store.close()
            self._store = None
            self._unlock()
            raise self._damaged(err) from err
        for row, key in enumerate(keys):
            fp, _, px = key.rpartition(_SEP)
            self._index.setdefault(fp, (row, int(px)))

    def _handle_mismatch(self, problem: str, locked: bool) -> None:
        wanted = _describe_model(self._model_name, self._dim)
        if self._on_model_change == "error":
            self._unlock()
            raise _mismatch_error(self._path, problem, self._model_name, self._dim)
        if not locked:
            raise CacheError(
                f"the embedding cache at {self._path} was built with {problem} and must be "
                f"reset for {wanted}, but another process is writing it; retry when it is done"
            )
        stale = self._stale_path()
        os.rename(self._path, stale)  # under the lock, which moves along with the directory
        self._unlock()
        logger.warning(
            "EMBEDDING CACHE RESET: %s was built with %s, not %s; moved it aside to %s and "
            "started an EMPTY cache, so every image will be embedded again. Delete %s when "
            "it is no longer needed.",
            self._path,
            problem,
            wanted,
            stale,
            stale,
        )
        if self._dim is not None:
            self._create(self._dim)

    def _stale_path(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        candidate = self._path.with_name(f"{self._path.name}.stale-{stamp}")
        n = 1
        while candidate.exists():
            candidate = self._path.with_name(f"{self._path.name}.stale-{stamp}-{n}")
            n += 1
        return candidate

    def _try_lock(self) -> bool:
        """Take the writer lock (:class:`~dedup_index.files.WriterLock` on ``.lock``)
        without waiting; False if another process holds it or it cannot be taken (a
        read-only directory: readable, not writable)."""
        try:
            self._lock = WriterLock(self._path / LOCK_FILE).acquire()
        except OSError:
            return False
        return True

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


def _mismatch(path: Path, store: EmbeddingStore, model_name: str, dim: int | None) -> str | None:
    """What the cache in ``store`` was built with, if it cannot serve ``model_name``/``dim``
    (None if it can).  A store that is not a cache at all raises :class:`CacheError`."""
    meta = store.meta
    if meta.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"{path} holds an embedding store that is not an embedding cache (its meta has "
            "no cache format); pass another cache directory"
        )
    if meta.get("version") != CACHE_VERSION:
        return f"cache format version {meta.get('version')!r}"
    if meta.get("model_name") != model_name:
        return f"model {meta.get('model_name')!r} (dim {store.dim})"
    if dim is not None and store.dim != dim:
        return f"dimension {store.dim}"
    return None


def _describe_model(model_name: str, dim: int | None) -> str:
    return f"model {model_name!r}" + (f" (dim {dim})" if dim is not None else "")


def _mismatch_error(
    path: Path, problem: str, model_name: str, dim: int | None
) -> CacheModelMismatchError:
    return CacheModelMismatchError(
        f"the embedding cache at {path} was built with {problem}, but "
        f"{_describe_model(model_name, dim)} is in use: its embeddings cannot be reused. Pass "
        "another cache directory, or on_model_change='reset' to move the old cache aside "
        "and start afresh"
    )
