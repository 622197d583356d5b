"""An append-only embedding store on disk: growing shards, block checksums, a JSON manifest.

Embeddings of a large collection do not fit in memory, and encoding them is the slow part
of the pipeline, so they are written once, to disk, as they are produced, and read back
through memory maps by every later stage.  A store is one directory::

    manifest.json        format version, dim, dtype, shard_rows, row count, shards, keys,
                         SHA-256 of every block of every shard and of the keys, meta
    shard-00000.bin      rows [0, shard_rows), raw little-endian rows, grows as rows come
    shard-00001.bin      rows [shard_rows, 2*shard_rows)
    keys.jsonl           optional: one JSON string per row (an image path, an id, ...)

**Every byte is checked.**  Each shard is cut into blocks of ``block_rows`` rows (about
1 MiB) and the keys file into 1 MiB blocks; the manifest records the SHA-256 of each.  A
block is hashed and compared the first time anything in it is read (the keys file when
the keys are first read), so opening a store of a million rows stays instant while no
answer is ever computed from bytes that changed on disk since they were written: a
mismatch raises :class:`StoreCorruptError`, naming the file and the block (the block
hashing and checking is :mod:`dedup_index.store.blocks`, shared with the index's row
segments).  An append into a partly filled block first checks the bytes already there
against their recorded hash (it must read them to hash the grown block anyway), so
damage is never laundered into a fresh checksum.  :meth:`EmbeddingStore.verify` checks
everything at once.

**Shards grow as they fill.**  A shard file holds exactly the rows written to it (each
append writes at the end of the file), never a sparse preallocation: a 1,000-row store
takes 1,000 rows of disk, under a file-size limit too, and tools that do not know sparse
files copy only that.

The manifest is the commit point.  :meth:`EmbeddingStore.append` writes the new rows into
the shards and fsyncs them, appends the keys and fsyncs them, and only then replaces the
manifest atomically (temp file in the same directory, fsync, ``os.replace``, fsync of the
directory).  A crash at any moment therefore leaves the previous manifest in place; rows
and keys written beyond its count are ignored on open and cut off by the next append.
Committed rows are never rewritten, so readers may map a store while one writer appends;
each reader sees the rows committed when it opened.  One writer at a time.

Stores of format 1 (fixed-size sparse ``.npy`` shards, no checksums) are still read; their
rows cannot be checked (nothing recorded what they were), which a WARNING says.  Opening
one for appending upgrades it in place to format 2 (rows copied to growing shards, every
block hashed, logged), so an embedding cache gets its checksums on its next run.

Reading returns C-contiguous float32 arrays (fresh copies, never views of the maps) with
the semantics of the equivalent ndarray for ``len``, ``.shape``, ``x[a:b]``, ``x[k]`` and
``x[int_array]``, so search backends take a store wherever they take an array.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DedupIndexError
from ..files import crash_point, fsync_dir, read_json, write_json_atomic
from ..search.canonical import as_unit_float32
from ..validation import check_choice, check_positive_int
from .blocks import (
    BLOCK_BYTES,
    HashingThread,
    block_digests,
    block_rows_for,
    check_gather,
    check_range,
    digest,
    hashed_bytes,
    n_blocks,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_BYTES",
    "DEFAULT_SHARD_ROWS",
    "FORMAT_VERSION",
    "EmbeddingStore",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "open_or_array",
]

#: Version written to ``manifest.json`` (format 1 is still read, see the module docstring).
FORMAT_VERSION = 2
_READ_VERSIONS = (1, 2)
#: Rows per shard file.  Files grow as rows are appended; this only caps one file's size
#: (512 MiB at D = 512 float32).
DEFAULT_SHARD_ROWS = 262_144
#: Most bytes of shard pages reads may touch through the memory maps before the maps are
#: dropped (and made again on the next read).  A mapped page a read touched counts in the
#: process's RSS (``RssFile``) for as long as its map lives, so without a bound a search
#: streaming a 10 GB store would hold all 10 GB in its RSS (1M x 512 float32: 2.1 of a
#: 3.1 GB peak).  Unmapping drops only this process's view: the pages stay in the OS page
#: cache, and mapping a shard again costs about a millisecond.
MAX_MAPPED_BYTES = 512 << 20
#: Bytes of a shard one row read through a map may bring into the RSS, beyond the row:
#: the kernel maps a whole page-cache folio per fault (measured here, kernel 6.18: 1 MiB
#: per touch of a 256 MiB float16 shard), so a gather of scattered rows maps nearly all
#: of each shard it touches; the bound then holds per shard (maps dropped between them).
FOLIO_BYTES = 2 << 20

MANIFEST = "manifest.json"
KEYS_FILE = "keys.jsonl"
_MANIFEST_TMP = ".manifest.json.tmp"
_FORMAT_NAME = "dedup_index.EmbeddingStore"
_DTYPES = ("float32", "float16")
# Crash points (dedup_index.files.crash_point, tests/test_store.py): shard_chunk,
# shards_written, keys_written, manifest_partial, manifest_tmp, manifest_replaced.


class StoreError(DedupIndexError, OSError):
    """A store on disk is missing, corrupt, or does not match what was asked for."""


class StoreCorruptError(StoreError):
    """Bytes of a store's file differ from the checksum recorded when they were written."""


class StoreExistsError(StoreError, FileExistsError):
    """``create`` found a store (or other files) where it was asked to make a new one."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path holds no store (no ``manifest.json``)."""


def shard_name(k: int, version: int = FORMAT_VERSION) -> str:
    """File name of shard ``k`` in a store of format ``version``."""
    return f"shard-{k:05d}.npy" if version == 1 else f"shard-{k:05d}.bin"


class EmbeddingStore:
    """Append-only ``(N, D)`` unit-norm embeddings in memory-mapped shards, keys optional.

    Make one with :meth:`create`, reopen it with :meth:`open`.  ``len(store)``,
    ``store.shape``, ``store[a:b]``, ``store[k]`` and ``store[int_array]`` behave like the
    same operations on the equivalent float32 ndarray (out-of-range indices raise
    ``IndexError``); results are fresh float32 arrays, computed only from bytes whose
    SHA-256 matched the manifest (:class:`StoreCorruptError` otherwise).

    ``dtype="float16"`` halves the disk and the page cache.  Rows are then rounded to
    float16 when written, and every later stage (candidate search and canonical rescoring)
    works on the rounded vectors converted back to float32: scores differ from those of
    the float32 originals by up to about 1e-3, but they are still exact and deterministic
    functions of what is stored, so decisions stay identical across backends and machines.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str) -> None:
        # Use create() or open(); this only takes a manifest already checked by _load_manifest.
        self._path = path
        self._mode = mode
        self._version = int(manifest["version"])
        self._dim = int(manifest["dim"])
        self._storage = np.dtype(manifest["dtype"])
        self._row_bytes = self._dim * self._storage.itemsize
        self._shard_rows = int(manifest["shard_rows"])
        self._count = int(manifest["count"])
        self._n_shards = int(manifest["n_shards"])
        self._meta = manifest["meta"]
        sums = manifest.get("checksums")
        # Format 1 has no checksums: nothing to check its bytes against.
        self._block_rows = int(sums["block_rows"]) if sums else 0
        self._key_block = int(sums["key_block_bytes"]) if sums else 0
        self._digests: list[list[str]] | None = [list(d) for d in sums["shards"]] if sums else None
        self._key_digests: list[str] | None = list(sums["keys"]) if sums else None
        keys = manifest["keys"]
        self._has_keys: bool | None = None if keys is None else True
        if keys is None and self._count > 0:
            self._has_keys = False
        self._keys_bytes = 0 if keys is None else int(keys["bytes"])
        self._keys: list[str] | None = None
        self._key_index: dict[str, int] | None = None
        self._offsets: list[int] = []
        self._maps: list[np.ndarray | None] = []
        self._touched = 0  # bytes reads may have touched through the maps since made
        self._checked: list[np.ndarray] = []  # per shard: which blocks were hashed and matched
        self._closed = False
        for k in range(self._n_shards):
            self._offsets.append(self._check_shard(k))
            self._maps.append(None)
            self._checked.append(np.zeros(self._n_blocks(k), dtype=bool))
        if keys is not None:
            kpath = path / KEYS_FILE
            size = kpath.stat().st_size if kpath.exists() else -1
            if size < self._keys_bytes:
                what = "is missing" if size < 0 else f"has {size} bytes"
                raise StoreError(
                    f"keys file {kpath} {what}; the manifest says {self._keys_bytes} bytes "
                    f"for {self._count} keys (the store is damaged)"
                )

    # ------------------------------------------------------------------ creating, opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        dim: int,
        *,
        dtype: str | np.dtype = "float32",
        shard_rows: int = DEFAULT_SHARD_ROWS,
        meta: dict[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> EmbeddingStore:
        """Make an empty store in directory ``path`` and return it open for appending.

        ``meta`` is any JSON-serialisable dict kept in the manifest (model name, threshold,
        source file, ...).  If ``path`` already holds a store, this raises unless
        ``exist_ok``; with ``exist_ok`` the existing store is opened for appending after
        checking that its ``dim`` and ``dtype`` are the ones asked for (its own
        ``shard_rows`` and ``meta`` are kept).  A directory holding other files is refused.
        """
        path = Path(path)
        dim = check_positive_int(dim, "dim")
        shard_rows = check_positive_int(shard_rows, "shard_rows")
        storage = _dtype_name(dtype)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict or None; got {type(meta).__name__}")
        try:
            meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as err:
            raise TypeError(f"meta must be JSON-serialisable: {err}") from err
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise StoreExistsError(
                    f"{path} already holds an embedding store; open it with "
                    "EmbeddingStore.open(path, mode='a') or pass exist_ok=True"
                )
            store = cls.open(path, mode="a")
            if store.dim != dim or store.storage_dtype != np.dtype(storage):
                found = f"dim={store.dim}, dtype={store.storage_dtype.name}"
                store.close()
                raise StoreError(
                    f"the store at {path} has {found}, but dim={dim}, dtype={storage} was "
                    "asked for; use another directory or the store's own dim and dtype"
                )
            return store
        if path.exists() and not path.is_dir():
            raise StoreExistsError(f"{path} exists and is not a directory")
        if path.is_dir():
            others = sorted(p.name for p in path.iterdir() if p.name != _MANIFEST_TMP)
            if others:
                raise StoreExistsError(
                    f"{path} is not empty and holds no embedding store "
                    f"(found {', '.join(others[:5])}); use an empty or new directory"
                )
        path.mkdir(parents=True, exist_ok=True)
        row_bytes = dim * np.dtype(storage).itemsize
        manifest = {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dim": dim,
            "dtype": storage,
            "shard_rows": shard_rows,
            "count": 0,
            "n_shards": 0,
            "keys": None,
            "meta": meta,
            "checksums": {
                "algorithm": "sha256",
                "block_rows": block_rows_for(row_bytes),
                "key_block_bytes": BLOCK_BYTES,
                "shards": [],
                "keys": [],
            },
        }
        _write_manifest(path, manifest)
        return cls(path, manifest, "a")

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r") -> EmbeddingStore:
        """Open the store in ``path``: ``mode="r"`` reads only (never writes), ``"a"`` appends.

        Checks the manifest and that every shard it counts exists at full size, so a missing
        or truncated file fails here, naming it, rather than in the middle of a search; the
        bytes themselves are checked against their SHA-256 when first read.  A format-1
        store opened with ``mode="a"`` is upgraded to format 2 first (logged).
        """
        check_choice(mode, ("r", "a"), "mode")
        path = Path(path)
        manifest = _load_manifest(path)
        if manifest["version"] == 1:
            if mode == "a":
                manifest = _upgrade_v1(path, manifest)
            else:
                logger.warning(
                    "the embedding store at %s was written by an older dedup_index without "
                    "checksums (format 1): its rows are read unchecked. Opening it for "
                    "appending (any run that writes to it) adds checksums; or rebuild it",
                    path,
                )
        elif mode == "a":
            _remove_v1_leftovers(path)
        return cls(path, manifest, mode)

    # ------------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The store's directory."""
        return self._path

    @property
    def mode(self) -> str:
        """``"r"`` (read-only) or ``"a"`` (append)."""
        return self._mode

    @property
    def dim(self) -> int:
        """Number of columns D."""
        return self._dim

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, D)``, like an ndarray's."""
        return (self._count, self._dim)

    @property
    def ndim(self) -> int:
        """Always 2, like the equivalent ndarray."""
        return 2

    @property
    def dtype(self) -> np.dtype:
        """The dtype of what reads return: always float32, whatever the storage dtype."""
        return np.dtype(np.float32)

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype of the shards on disk: float32 or float16."""
        return self._storage

    @property
    def shard_rows(self) -> int:
        """Capacity of one shard file, in rows."""
        return self._shard_rows

    @property
    def checksummed(self) -> bool:
        """Whether the store records checksums (format 2); format-1 stores do not."""
        return self._digests is not None

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the user metadata given to :meth:`create`."""
        return json.loads(json.dumps(self._meta))

    @property
    def has_keys(self) -> bool | None:
        """Whether rows carry keys; None while the store is empty and no append has said."""
        return self._has_keys

    @property
    def nbytes_on_disk(self) -> int:
        """Bytes the store occupies on disk (allocated blocks where the platform reports
        them, so a format-1 store's unwritten sparse tail is not counted)."""
        files = [self._path / MANIFEST, self._path / KEYS_FILE]
        files += [self._path / shard_name(k, self._version) for k in range(self._n_shards)]
        total = 0
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            blocks = getattr(st, "st_blocks", None)
            total += st.st_size if blocks is None else blocks * 512
        return total

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self._mode!r}"
        return (
            f"EmbeddingStore({str(self._path)!r}, shape={self.shape}, "
            f"storage_dtype={self._storage.name}, {state})"
        )

    # --------------------------------------------------------------------------- writing

    def append(
        self,
        embeddings: object,
        keys: Sequence[str] | None = None,
        *,
        normalize: bool = True,
    ) -> np.ndarray:
        """Append ``(n, D)`` rows (and their keys) durably; return their row ids (int64).

        Rows are validated and L2-normalised by
        :func:`~dedup_index.search.canonical.as_unit_float32` (NaN, inf and zero rows are
        refused, naming the rows of ``embeddings``), then cast to the storage dtype.  Keys
        are all-or-nothing over the store's life: once rows were appended with keys, every
        append needs keys, and vice versa.  The append is committed when this returns; if
        the process dies before, the store reopens as it was before the call.
        """
        self._check_open()
        if self._mode != "a":
            raise StoreError(
                f"the store at {self._path} is open read-only (mode='r'); "
                "open it with mode='a' to append"
            )
        arr = np.asarray(embeddings)
        if arr.ndim == 2 and arr.shape[1] != self._dim:
            raise ValueError(
                f"embeddings have {arr.shape[1]} columns but the store at {self._path} "
                f"has dim {self._dim}"
            )
        unit = as_unit_float32(arr, normalize=normalize)
        n = unit.shape[0]
        key_list = self._check_keys(keys, n)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        data = unit if self._storage == np.float32 else unit.astype(self._storage)
        start = self._count
        stop = start + n
        digests = self._write_rows(np.ascontiguousarray(data), start)
        crash_point("shards_written")
        keys_record = None
        key_digests = self._key_digests
        if key_list is not None:
            nbytes, key_digests = self._write_keys(key_list)
            keys_record = {"count": stop, "bytes": nbytes}
            crash_point("keys_written")
        n_shards = -(-stop // self._shard_rows)
        manifest = self._manifest(
            count=stop, n_shards=n_shards, keys=keys_record, digests=digests, keys_sums=key_digests
        )
        _write_manifest(self._path, manifest)
        # Committed: update the in-memory view.
        for _ in range(self._n_shards, n_shards):
            self._offsets.append(0)
            self._maps.append(None)
            self._checked.append(np.zeros(0, dtype=bool))
        self._count = stop
        self._n_shards = n_shards
        self._digests = digests
        self._key_digests = key_digests
        for k in range(start // self._shard_rows, n_shards):
            # These shards grew: map them again, and hash the blocks that changed when
            # first read (they are checked like any others).
            self._maps[k] = None
            keep = self._checked[k][: (start - k * self._shard_rows) // self._block_rows]
            fresh = np.zeros(self._n_blocks(k), dtype=bool)
            fresh[: keep.shape[0]] = keep
            self._checked[k] = fresh
        if key_list is not None:
            self._has_keys = True
            self._keys_bytes = keys_record["bytes"]
            if self._keys is not None:
                self._keys.extend(key_list)
            if self._key_index is not None:
                for r, key in enumerate(key_list, start):
                    self._key_index.setdefault(key, r)
        else:
            self._has_keys = False
        return np.arange(start, stop, dtype=np.int64)

    def truncate(self, count: int) -> None:
        """Drop the rows from ``count`` on, durably (a new manifest with the lower count).

        For a caller that commits its own state after appending here (the persistent
        index): rows its commit never covered are rolled back before it appends again.
        """
        self._check_open()
        if self._mode != "a":
            raise StoreError(f"the store at {self._path} is open read-only; cannot truncate")
        if not 0 <= count <= self._count:
            raise ValueError(f"truncate(count={count}): must be in [0, {self._count}]")
        if count == self._count:
            return
        n_shards = -(-count // self._shard_rows)
        digests = [list(d) for d in self._digests[:n_shards]]
        if n_shards and count % self._shard_rows:
            # The new last shard ends inside a block: hash that block's kept rows, after
            # checking the whole old block against its recorded hash.
            k = n_shards - 1
            rows_k = count - k * self._shard_rows
            b = rows_k // self._block_rows
            kept = (rows_k - b * self._block_rows) * self._row_bytes
            del digests[k][b + (1 if kept else 0) :]
            if kept:
                old = self._read_block(k, b)
                digests[k][b] = digest(old[:kept])
        keys_record = None
        key_digests = self._key_digests
        if self._has_keys:
            nbytes = 0
            with open(self._path / KEYS_FILE, "rb") as f:
                for _ in range(count):
                    nbytes += len(f.readline())
            keys_record = {"count": count, "bytes": nbytes}
            key_digests = self._truncated_key_digests(nbytes)
        _write_manifest(
            self._path,
            self._manifest(
                count=count,
                n_shards=n_shards,
                keys=keys_record,
                digests=digests,
                keys_sums=key_digests,
            ),
        )
        self._count = count
        self._n_shards = n_shards
        self._digests = digests
        self._key_digests = key_digests
        if keys_record is not None:
            self._keys_bytes = keys_record["bytes"]
        del self._offsets[n_shards:]
        del self._maps[n_shards:]
        del self._checked[n_shards:]
        if n_shards:
            self._maps[-1] = None
            self._checked[-1] = np.zeros(self._n_blocks(n_shards - 1), dtype=bool)
        self._keys = None
        self._key_index = None
        if count == 0:
            self._has_keys = None

    def close(self) -> None:
        """Release the memory maps; the store object is unusable afterwards."""
        self._maps = [None] * len(self._maps)
        self._keys = None
        self._key_index = None
        self._closed = True

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_keys(self, keys: Sequence[str] | None, n: int) -> list[str] | None:
        if keys is None:
            if self._has_keys:
                raise ValueError(
                    f"the store at {self._path} has keys for its {self._count} rows; "
                    "every append must give keys (one str per row)"
                )
            return None
        if isinstance(keys, (str, bytes)):
            raise TypeError("keys must be a sequence of str (one per row), not a single string")
        key_list = list(keys)
        if len(key_list) != n:
            raise ValueError(f"got {len(key_list)} keys for {n} rows; give one key per row")
        for r, key in enumerate(key_list):
            if not isinstance(key, str):
                raise TypeError(f"keys must be str; key {r} is {type(key).__name__}: {key!r}")
        if self._has_keys is False:
            raise ValueError(
                f"the store at {self._path} has {self._count} rows without keys; "
                "appends to it cannot give keys (use a new store to keep keys)"
            )
        return key_list

    def _write_rows(self, data: np.ndarray, start: int) -> list[list[str]]:
        """Write ``data`` at rows ``start...`` at the ends of the shards; return every
        shard's block digests as they will be once these rows are committed."""
        digests = [list(d) for d in self._digests]
        rb = self._row_bytes
        raw = memoryview(data).cast("B")
        created = False
        r = 0
        while r < data.shape[0]:
            k, r0 = divmod(start + r, self._shard_rows)
            take = min(data.shape[0] - r, self._shard_rows - r0)
            fname = self._path / shard_name(k)
            b = r0 // self._block_rows
            prefix = b""
            if k >= self._n_shards:
                # A shard beyond the committed ones: (re)create it, discarding what a
                # crashed append may have left there.
                created = True
                digests.append([])
            with open(fname, "r+b" if k < self._n_shards else "wb") as f:
                if k < self._n_shards and r0 % self._block_rows:
                    # A partly filled block grows: check what is there before hashing it
                    # into the grown block's checksum.
                    prefix = self._read_block(k, b, f)
                if os.fstat(f.fileno()).st_size != r0 * rb:
                    f.truncate(r0 * rb)  # cut off what a crashed append left after its commit
                f.seek(r0 * rb)
                chunk = raw[r * rb : (r + take) * rb]
                # Hash while the kernel writes: both release the GIL, so the checksums
                # cost no time next to the fsync (bench/store_append.py).
                hashing = HashingThread(prefix, chunk, self._block_rows * rb)
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digests[k][b:] = hashing.result()
            crash_point("shard_chunk")
            r += take
        if created:
            fsync_dir(self._path)
        return digests

    def _write_keys(self, key_list: list[str]) -> tuple[int, list[str]]:
        """Append keys after the committed ones (dropping any uncommitted tail); return
        the keys file's new committed size and block digests."""
        kpath = self._path / KEYS_FILE
        payload = "".join(json.dumps(key) + "\n" for key in key_list).encode("ascii")
        created = not kpath.exists()
        bs = self._key_block
        b = self._keys_bytes // bs
        with open(kpath, "ab" if created else "r+b") as f:
            prefix = b""
            if self._keys_bytes % bs:
                f.seek(b * bs)
                prefix = f.read(self._keys_bytes - b * bs)
                self._check_key_block(b, prefix)
            f.truncate(self._keys_bytes)
            f.seek(self._keys_bytes)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self._path)
        digests = self._key_digests[:b] + block_digests(prefix, memoryview(payload), bs)
        return self._keys_bytes + len(payload), digests

    def _truncated_key_digests(self, nbytes: int) -> list[str]:
        bs = self._key_block
        b, kept = divmod(nbytes, bs)
        digests = list(self._key_digests[:b])
        if kept:
            with open(self._path / KEYS_FILE, "rb") as f:
                f.seek(b * bs)
                old = f.read(min(bs, self._keys_bytes - b * bs))
            self._check_key_block(b, old)
            digests.append(digest(old[:kept]))
        return digests

    def _manifest(
        self,
        *,
        count: int,
        n_shards: int,
        keys: dict[str, int] | None,
        digests: list[list[str]],
        keys_sums: list[str],
    ) -> dict:
        return {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dim": self._dim,
            "dtype": self._storage.name,
            "shard_rows": self._shard_rows,
            "count": count,
            "n_shards": n_shards,
            "keys": None if keys is None else {"file": KEYS_FILE, **keys},
            "meta": self._meta,
            "checksums": {
                "algorithm": "sha256",
                "block_rows": self._block_rows,
                "key_block_bytes": self._key_block,
                "shards": digests,
                "keys": keys_sums if keys is not None else [],
            },
        }

    # --------------------------------------------------------------------------- reading

    def __getitem__(self, key: Any) -> np.ndarray:
        """Rows as a fresh C-contiguous float32 array, with ndarray indexing semantics.

        ``int`` -> ``(D,)``; ``slice`` -> ``(m, D)``; integer array or list (any order,
        repeats, negatives counted from the end) -> ``idx.shape + (D,)``; a boolean mask
        of length N; a tuple indexes rows with its first item and columns with the rest.
        """
        self._check_open()
        if isinstance(key, tuple):
            if not key:
                return self.to_array()
            rows = self[key[0]]
            rest = key[1:]
            if not rest:
                return rows
            if rows.ndim == 1:
                return np.ascontiguousarray(rows[rest])
            return np.ascontiguousarray(rows[(slice(None),) * (rows.ndim - 1) + rest])
        if isinstance(key, (bool, np.bool_)):
            raise TypeError("a store cannot be indexed with a bool; use an index or a mask")
        if isinstance(key, numbers.Integral):
            k = int(key)
            if not -self._count <= k < self._count:
                raise IndexError(f"index {k} is out of bounds for a store of {self._count} rows")
            return self._range(k % self._count, k % self._count + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self._count)
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        if key is Ellipsis:
            return self.to_array()
        idx = np.asarray(key)
        if idx.dtype == np.bool_:
            if idx.shape != (self._count,):
                raise IndexError(
                    f"boolean index of shape {idx.shape} does not match a store of "
                    f"{self._count} rows"
                )
            return self._gather(np.flatnonzero(idx))
        if idx.size == 0 and idx.dtype.kind not in "iu":
            idx = idx.astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise IndexError(
                f"arrays used as indices must be of integer (or boolean) type; got {idx.dtype}"
            )
        flat = self._gather(idx.reshape(-1).astype(np.int64, copy=False))
        return flat.reshape(idx.shape + (self._dim,))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(store)``: all rows in memory (see :meth:`to_array`)."""
        if copy is False:
            raise ValueError("an EmbeddingStore cannot be viewed as an array without a copy")
        arr = self.to_array()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        """All rows in memory as ``dtype`` (an ndarray, like ``ndarray.astype``; loads all)."""
        return self.to_array().astype(dtype, copy=False)

    def to_array(self) -> np.ndarray:
        """All rows as one ``(N, D)`` float32 array in memory."""
        self._check_open()
        return self._range(0, self._count)

    def iter_blocks(
        self, block_rows: int = 65_536, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row_start, rows)`` float32 blocks of at most ``block_rows`` rows.

        Covers rows ``[start, stop)`` in order (``stop=None``: to the end), so memory stays
        ``O(block_rows * D)`` however large the store.
        """
        self._check_open()
        block_rows = check_positive_int(block_rows, "block_rows")
        stop = self._count if stop is None else stop
        if not 0 <= start <= stop <= self._count:
            raise IndexError(
                f"iter_blocks range [{start}, {stop}) is not within [0, {self._count}]"
            )
        for a in range(start, stop, block_rows):
            yield a, self._range(a, min(a + block_rows, stop))

    def keys(self) -> list[str] | None:
        """The key of every row, in row order, or None if the store has no keys."""
        self._check_open()
        if not self._has_keys:
            return None
        if self._keys is None:
            self._keys = self._read_keys()
        return list(self._keys)

    def key_index(self) -> dict[str, int]:
        """``key -> row``; a key given to several rows maps to the first.  Empty if no keys."""
        self._check_open()
        if self._key_index is None:
            index: dict[str, int] = {}
            for r, key in enumerate(self.keys() or []):
                index.setdefault(key, r)
            self._key_index = index
        return dict(self._key_index)

    def verify(self) -> dict[str, int]:
        """Hash every block of every shard and of the keys file against the manifest now.

        Raises :class:`StoreCorruptError` naming the first file and block that fail;
        returns ``{"rows": ..., "blocks": ..., "bytes": ...}`` checked (zeros for a format-1
        store, which records no checksums).  Reads already check what they touch; this is
        for a whole-store check (``dedup-index index verify``, a copy's check).
        """
        self._check_open()
        if self._digests is None:
            return {"rows": 0, "blocks": 0, "bytes": 0}
        blocks = 0
        for k in range(self._n_shards):
            self._checked[k][:] = False
            hashed = hashed_bytes()
            self._verify_rows(k, 0, self._rows_in_shard(k))
            self._touch(0, hashed)
            blocks += self._checked[k].shape[0]
        if self._has_keys:
            self._read_keys()
            blocks += len(self._key_digests)
        nbytes = self._count * self._row_bytes + (self._keys_bytes if self._has_keys else 0)
        return {"rows": self._count, "blocks": blocks, "bytes": nbytes}

    def iter_keys(self, rows: int = 1 << 20):
        """The key of every row in row order, ``rows`` keys at a time (lists of str;
        nothing for a store without keys): the keys file is read and checked a block at a
        time, never held whole (10M path keys are ~2 GB as one Python list)."""
        self._check_open()
        if self._has_keys:
            yield from self._key_chunks(max(1, int(rows)))

    def _read_keys(self) -> list[str]:
        return [key for chunk in self._key_chunks(1 << 20) for key in chunk]

    def _key_chunks(self, rows: int):
        """:meth:`iter_keys`'s reader: each checksum block checked as it is read."""
        kpath = self._path / KEYS_FILE
        checked = self._key_digests is not None
        bs = self._key_block if checked else 1 << 23
        short = StoreError(
            f"keys file {kpath} does not hold {self._count} keys in its first "
            f"{self._keys_bytes} bytes (the store is damaged)"
        )
        out: list[str] = []
        tail, line_no, left, b = b"", 0, self._keys_bytes, 0
        with open(kpath, "rb") as f:
            while left > 0:
                want = min(bs, left)
                data = f.read(want)
                if len(data) < want:
                    raise short
                if checked:
                    self._check_key_block(b, data)
                b, left = b + 1, left - want
                lines = (tail + data).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    line_no += 1
                    try:
                        key = json.loads(line)
                    except ValueError as err:
                        raise StoreError(
                            f"keys file {kpath}: line {line_no} is not JSON: {err}"
                        ) from err
                    if not isinstance(key, str):
                        raise StoreError(f"keys file {kpath}: line {line_no} is not a JSON string")
                    out.append(key)
                    if len(out) >= rows:
                        yield out
                        out = []
        if tail or line_no != self._count:
            raise short
        if out:
            yield out

    def _check_key_block(self, b: int, data: bytes) -> None:
        if self._key_digests is None:
            return
        if b >= len(self._key_digests) or digest(data) != self._key_digests[b]:
            lo = b * self._key_block
            raise StoreCorruptError(
                f"keys file {self._path / KEYS_FILE} is damaged: bytes {lo}-{lo + len(data)} "
                f"do not match the SHA-256 recorded in {self._path / MANIFEST} when they were "
                f"written. {_REBUILD}"
            )

    def _rows_in_shard(self, k: int) -> int:
        return min(self._shard_rows, self._count - k * self._shard_rows)

    def _n_blocks(self, k: int) -> int:
        if self._digests is None:
            return 0
        return n_blocks(self._rows_in_shard(k), self._block_rows)

    def _map(self, k: int) -> np.ndarray:
        mm = self._maps[k]
        if mm is None:
            mm = np.memmap(
                str(self._path / shard_name(k, self._version)),  # str: numpy resolves a Path
                dtype=self._storage,
                mode="r",
                offset=self._offsets[k],
                shape=(self._rows_in_shard(k), self._dim),
            )
            self._maps[k] = mm
        return mm

    def _touch(self, nbytes: int, hashed_before: int) -> None:
        """Count what a read just touched through the maps (``nbytes``, an upper bound,
        plus what it hashed); past :data:`MAX_MAPPED_BYTES` drop every map, so the
        mapped pages in this process's RSS stay under about that bound however much of
        the store is read.  Called after a read, when its rows are copied out."""
        self._touched += nbytes + hashed_bytes() - hashed_before
        if self._touched > MAX_MAPPED_BYTES:
            self._maps = [None] * len(self._maps)
            self._touched = 0

    def _read_block(self, k: int, b: int, f: Any = None) -> bytes:
        """The committed bytes of block ``b`` of shard ``k``, checked against its hash."""
        lo = b * self._block_rows
        hi = min(lo + self._block_rows, self._rows_in_shard(k))
        fname = self._path / shard_name(k, self._version)
        if f is None:
            with open(fname, "rb") as g:
                g.seek(lo * self._row_bytes)
                data = g.read((hi - lo) * self._row_bytes)
        else:
            f.seek(lo * self._row_bytes)
            data = f.read((hi - lo) * self._row_bytes)
        if digest(data) != self._digests[k][b]:
            raise self._corrupt(k, lo, hi)
        return data

    def _verify_rows(self, k: int, r0: int, r1: int) -> None:
        """Hash the not yet checked blocks of shard ``k`` holding rows ``[r0, r1)``."""
        if self._digests is not None:
            check_range(
                self._map(k),
                r0,
                r1,
                self._digests[k],
                self._checked[k],
                self._block_rows,
                lambda lo, hi: self._corrupt(k, lo, hi),
            )

    def _corrupt(self, k: int, lo: int, hi: int) -> StoreCorruptError:
        fname = self._path / shard_name(k, self._version)
        first = k * self._shard_rows
        return StoreCorruptError(
            f"shard file {fname} is damaged: the bytes of rows {first + lo}-{first + hi - 1} "
            f"do not match the SHA-256 recorded in {self._path / MANIFEST} when they were "
            f"written (no result was computed from them). {_REBUILD}"
        )

    def _range(self, a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, self._dim), dtype=np.float32)
        hashed = hashed_bytes()
        r = a
        while r < b:
            k, r0 = divmod(r, self._shard_rows)
            take = min(b - r, self._shard_rows - r0)
            self._verify_rows(k, r0, r0 + take)
            out[r - a : r - a + take] = self._map(k)[r0 : r0 + take]
            r += take
            self._touch(take * self._row_bytes + 2 * FOLIO_BYTES, hashed)
            hashed = hashed_bytes()
        return out

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (1-D int64) in the caller's order: one fancy index per shard."""
        n = self._count
        out = np.empty((idx.shape[0], self._dim), dtype=np.float32)
        if idx.shape[0] == 0:
            return out
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"index {int(idx[bad][0])} is out of bounds for a store of {n} rows")
        if (idx < 0).any():
            idx = np.where(idx < 0, idx + n, idx)
        shard = idx // self._shard_rows
        lo, hi = int(shard.min()), int(shard.max())
        hashed = hashed_bytes()
        if lo == hi:
            local = idx - lo * self._shard_rows
            self._verify_gather(lo, local)
            out[:] = self._map(lo)[local]
            self._touch(self._gather_touch(lo, local.shape[0]), hashed)
            return out
        order = np.argsort(shard, kind="stable")
        ordered = shard[order]
        cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, order.shape[0]], strict=True):
            k = int(ordered[a])
            pos = order[a:b]
            local = idx[pos] - k * self._shard_rows
            self._verify_gather(k, local)
            out[pos] = self._map(k)[local]
            self._touch(self._gather_touch(k, local.shape[0]), hashed)
            hashed = hashed_bytes()
        return out

    def _gather_touch(self, k: int, rows: int) -> int:
        """Bytes a gather of ``rows`` scattered rows of shard ``k`` may have mapped."""
        return min(self._rows_in_shard(k) * self._row_bytes, rows * (self._row_bytes + FOLIO_BYTES))

    def _verify_gather(self, k: int, local: np.ndarray) -> None:
        """Hash the not yet checked blocks of shard ``k`` holding rows ``local``."""
        if self._digests is not None:
            check_gather(
                self._map(k),
                local,
                self._digests[k],
                self._checked[k],
                self._block_rows,
                lambda lo, hi: self._corrupt(k, lo, hi),
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the store at {self._path} is closed")

    def _check_shard(self, k: int) -> int:
        """Check shard ``k``'s size (and a format-1 shard's header) against the manifest;
        return the offset of its rows in the file."""
        fname = self._path / shard_name(k, self._version)
        if self._version == 1:
            return self._check_v1_shard(k, fname)
        try:
            size = fname.stat().st_size
        except FileNotFoundError:
            raise StoreError(
                f"shard file {fname} is missing; the manifest of {self._path} counts "
                f"{self._n_shards} shard(s) for {self._count} rows (the store is damaged)"
            ) from None
        need = self._rows_in_shard(k) * self._row_bytes
        if size < need:
            raise StoreError(
                f"shard file {fname} is truncated: {size} bytes, the manifest needs {need} "
                "(the store is damaged)"
            )
        if len(self._digests[k]) != self._n_blocks(k):
            raise StoreError(
                f"manifest {self._path / MANIFEST} is corrupt: it lists "
                f"{len(self._digests[k])} checksums for shard {k}, which needs "
                f"{self._n_blocks(k)}"
            )
        return 0

    def _check_v1_shard(self, k: int, fname: Path) -> int:
        try:
            offset, shape, fortran, dtype, size = _npy_header(fname)
        except FileNotFoundError:
            raise StoreError(
                f"shard file {fname} is missing; the manifest of {self._path} counts "
                f"{self._n_shards} shard(s) for {self._count} rows (the store is damaged)"
            ) from None
        except ValueError as err:
            raise StoreError(f"shard file {fname} is not a valid .npy file: {err}") from err
        want = (self._shard_rows, self._dim)
        if tuple(shape) != want or fortran or dtype != self._storage:
            raise StoreError(
                f"shard file {fname} holds a {dtype} array of shape {tuple(shape)}; the "
                f"manifest says {self._storage.name} {want} (the store is damaged)"
            )
        need = offset + self._shard_rows * self._dim * self._storage.itemsize
        if size < need:
            raise StoreError(
                f"shard file {fname} is truncated: {size} bytes, the manifest needs {need} "
                "(the store is damaged)"
            )
        return offset


_REBUILD = (
    "Rebuild it from its source: for an embedding cache, delete the cache folder (its "
    "embeddings are computed again on the next run); for a Ray job's store, delete it and "
    "rerun the job"
)


def open_or_array(x: Any) -> Any:
    """Embeddings as search backends take them: a store stays, a store's path is opened.

    An :class:`EmbeddingStore` is returned unchanged; a ``str`` or path-like naming an
    existing directory is opened read-only (so a directory that is not a store fails with
    :class:`StoreNotFoundError`); anything else (an ndarray, a list) is returned as is.
    """
    if isinstance(x, EmbeddingStore):
        return x
    if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
        return EmbeddingStore.open(x, mode="r")
    return x


# ------------------------------------------------------------------------------ helpers


def _dtype_name(dtype: str | np.dtype) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    return check_choice(name, _DTYPES, "dtype")


def _npy_header(fname: Path) -> tuple[int, tuple, bool, np.dtype, int]:
    """``(data offset, shape, fortran, dtype, file size)`` of a format-1 ``.npy`` shard."""
    with open(fname, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return f.tell(), shape, fortran, dtype, os.fstat(f.fileno()).st_size


def _load_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST

    def missing(_: str) -> StoreNotFoundError:
        what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
        return StoreNotFoundError(
            f"{path} is not an embedding store: it {what} (make one with EmbeddingStore.create)"
        )

    m = read_json(mpath, StoreError, missing=missing, format=("format", _FORMAT_NAME))
    if m.get("version") not in _READ_VERSIONS:
        raise StoreError(
            f"manifest {mpath} has format version {m.get('version')!r}; this dedup_index "
            f"reads versions {', '.join(map(str, _READ_VERSIONS))}"
        )
    try:
        ints = {f: m[f] for f in ("dim", "shard_rows", "count", "n_shards")}
        keys, meta, dtype = m["keys"], m["meta"], m["dtype"]
    except KeyError as err:
        raise StoreError(f"manifest {mpath} is corrupt: field {err} is missing") from err
    bad = [f for f, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad or ints["dim"] < 1 or ints["shard_rows"] < 1:
        raise StoreError(f"manifest {mpath} is corrupt: bad value of {bad or ['dim/shard_rows']}")
    if dtype not in _DTYPES or not isinstance(meta, dict):
        raise StoreError(f"manifest {mpath} is corrupt: bad dtype {dtype!r} or meta")
    if ints["n_shards"] != math.ceil(ints["count"] / ints["shard_rows"]):
        raise StoreError(
            f"manifest {mpath} is corrupt: {ints['n_shards']} shards cannot hold exactly "
            f"{ints['count']} rows of {ints['shard_rows']} per shard"
        )
    if keys is not None and (
        not isinstance(keys, dict)
        or keys.get("count") != ints["count"]
        or not isinstance(keys.get("bytes"), int)
    ):
        raise StoreError(f"manifest {mpath} is corrupt: its keys record does not match count")
    if m["version"] >= 2:
        _check_checksums(mpath, m)
    return m


def _check_checksums(mpath: Path, m: dict[str, Any]) -> None:
    """The checksum record of a format-2 manifest is well formed (lengths are checked per
    shard on open, and for the keys here)."""
    sums = m.get("checksums")

    def ok_list(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(d, str) and len(d) == 64 for d in x)

    good = (
        isinstance(sums, dict)
        and sums.get("algorithm") == "sha256"
        and all(
            isinstance(sums.get(f), int) and not isinstance(sums.get(f), bool) and sums[f] >= 1
            for f in ("block_rows", "key_block_bytes")
        )
        and isinstance(sums.get("shards"), list)
        and len(sums["shards"]) == m["n_shards"]
        and all(ok_list(d) for d in sums["shards"])
        and ok_list(sums.get("keys"))
    )
    if good and m["keys"] is not None:
        good = len(sums["keys"]) == -(-m["keys"]["bytes"] // sums["key_block_bytes"])
    if not good:
        raise StoreError(f"manifest {mpath} is corrupt: its checksums record is malformed")


def _upgrade_v1(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a format-1 store (opened for appending) as format 2, in place; return the
    new manifest.  Rows are copied from the sparse ``.npy`` shards to growing ``.bin``
    ones and every block is hashed; the new manifest is the commit point (a crash before
    it leaves the format-1 store as it was), and the old shards are removed after it."""
    old = EmbeddingStore(path, manifest, "r")
    try:
        storage = old.storage_dtype
        row_bytes = old.dim * storage.itemsize
        block_rows = block_rows_for(row_bytes)
        shards = []
        for k in range(old._n_shards):
            rows = np.ascontiguousarray(old._map(k))
            with open(path / shard_name(k), "wb") as f:
                f.write(rows.data)
                f.flush()
                os.fsync(f.fileno())
            raw = memoryview(rows).cast("B")
            shards.append(block_digests(b"", raw, block_rows * row_bytes) if len(raw) else [])
        key_sums: list[str] = []
        if manifest["keys"] is not None:
            with open(path / KEYS_FILE, "rb") as f:
                data = f.read(manifest["keys"]["bytes"])
            if data:
                key_sums = block_digests(b"", memoryview(data), BLOCK_BYTES)
    finally:
        old.close()
    fsync_dir(path)
    new_manifest = dict(
        manifest,
        version=FORMAT_VERSION,
        checksums={
            "algorithm": "sha256",
            "block_rows": block_rows,
            "key_block_bytes": BLOCK_BYTES,
            "shards": shards,
            "keys": key_sums,
        },
    )
    _write_manifest(path, new_manifest)
    _remove_v1_leftovers(path)
    logger.warning(
        "upgraded the embedding store at %s to format %d: its %d rows and keys now have "
        "SHA-256 checksums, checked on every read (they were written without any, so they "
        "are taken as they are)",
        path,
        FORMAT_VERSION,
        manifest["count"],
    )
    return new_manifest


def _remove_v1_leftovers(path: Path) -> None:
    """Remove format-1 ``.npy`` shards left by an upgrade that was cut after its commit."""
    for leftover in path.glob("shard-*.npy"):
        try:
            leftover.unlink()
        except OSError:
            pass


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace ``manifest.json`` atomically and durably: the store's commit point."""
    write_json_atomic(path / MANIFEST, manifest, tmp_name=_MANIFEST_TMP, crash_name="manifest")
