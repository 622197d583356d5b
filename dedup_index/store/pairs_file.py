"""Pairs that outgrow memory: a Parquet file of ``(i, j, similarity)`` read in chunks.

At a low threshold or on a collection full of copies the pair list can be larger than
the embeddings.  :class:`PairSink` collects the pairs a search produces; below its memory
budget it hands back an ordinary in-memory :class:`~dedup_index.search.pairs.PairSet`,
above it it spills to a Parquet file, one row group per spill, and hands back a
:class:`PairFile`, which reads the file chunk by chunk with the same ``iter_chunks``
interface as a ``PairSet``.  Memory is then ``O(memory_budget)`` while collecting and
``O(chunk)`` while reading.

A search that tiles its input may report the same pair twice (overlapping tiles).  An
in-memory result is deduplicated; a spilled file keeps what was added, so
:meth:`PairFile.iter_chunks` may yield a pair more than once.  Consumers of chunks (the
policy sweep: "row j has some earlier duplicate", maxima of scores) are idempotent and
tolerate repeats; :meth:`PairFile.to_pairset` removes them.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import atomic_write_bytes, fsync_dir, sha256_file
from ..search.pairs import PairSet
from ..validation import check_positive_int
from .embeddings import StoreError

__all__ = ["DEFAULT_MEMORY_BUDGET", "PAIR_SCHEMA", "PairFile", "PairSink", "write_pair_file"]

#: Bytes of pairs a :class:`PairSink` holds in memory before spilling (24 bytes a pair).
DEFAULT_MEMORY_BUDGET = 256 << 20
_PAIR_BYTES = 24
#: Columns and types of a pair file.
PAIR_SCHEMA = pa.schema(
    [
        pa.field("i", pa.int64(), nullable=False),
        pa.field("j", pa.int64(), nullable=False),
        pa.field("similarity", pa.float64(), nullable=False),
    ]
)


class PairFile:
    """A Parquet file of pairs with columns ``i``, ``j`` (int64) and ``similarity`` (float64).

    Opening reads only the footer, or, given ``sha256`` (the hex digest a manifest recorded
    for it, see :func:`write_pair_file`), first checks the whole file against it and raises
    :class:`~dedup_index.store.StoreError` naming the file if it differs.  Pairs are in the
    order they were written, possibly with repeats (see the module docstring).
    ``cleanup_dir`` is for :class:`PairSink`: a temporary directory removed with the file
    by :meth:`cleanup`, when this object is garbage-collected, or at interpreter exit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cleanup_dir: str | None = None,
        sha256: str | None = None,
    ) -> None:
        self._path = Path(path)
        self._finalizer = (
            None
            if cleanup_dir is None
            else weakref.finalize(self, shutil.rmtree, cleanup_dir, ignore_errors=True)
        )
        if sha256 is not None:
            try:
                digest = sha256_file(self._path)
            except FileNotFoundError:
                raise StoreError(f"pair file {self._path} does not exist") from None
            if digest != sha256:
                raise StoreError(
                    f"pair file {self._path} fails its checksum: the file is corrupted or truncated"
                )
        try:
            meta = pq.read_metadata(self._path)
        except FileNotFoundError:
            raise StoreError(f"pair file {self._path} does not exist") from None
        except (OSError, pa.ArrowInvalid) as err:
            raise StoreError(
                f"pair file {self._path} is not a readable Parquet file: {err}"
            ) from err
        names = meta.schema.names
        missing = [c for c in PAIR_SCHEMA.names if c not in names]
        if missing:
            raise StoreError(f"pair file {self._path} lacks column(s) {missing}; it has {names}")
        self._rows = int(meta.num_rows)

    @property
    def path(self) -> Path:
        """The Parquet file."""
        return self._path

    def __len__(self) -> int:
        """Rows in the file, repeats included."""
        return self._rows

    def __repr__(self) -> str:
        return f"PairFile({str(self._path)!r}, rows={self._rows})"

    def iter_chunks(self, rows: int = 1 << 20) -> Iterator[PairSet]:
        """The pairs in file order as ``PairSet`` chunks of at most ``rows`` pairs.

        Read batch by batch, so memory is ``O(rows)`` plus one Parquet row group.  Chunks
        are not sorted and may repeat pairs.
        """
        rows = check_positive_int(rows, "rows")
        pf = pq.ParquetFile(self._path)
        try:
            for batch in pf.iter_batches(batch_size=rows, columns=PAIR_SCHEMA.names):
                yield PairSet(
                    _column(batch, "i", np.int64),
                    _column(batch, "j", np.int64),
                    _column(batch, "similarity", np.float64),
                )
        finally:
            pf.close()

    def to_pairset(self) -> PairSet:
        """All pairs in memory, sorted by ``(i, j)``, each pair once."""
        table = pq.read_table(self._path, columns=PAIR_SCHEMA.names)
        return _sorted_unique(
            _column(table, "i", np.int64),
            _column(table, "j", np.int64),
            _column(table, "similarity", np.float64),
        )

    def to_frame(self):  # -> pandas.DataFrame, imported lazily
        """The pairs as a DataFrame (``i``, ``j``, ``similarity``), sorted and deduplicated
        like :meth:`to_pairset`."""
        return self.to_pairset().to_frame()

    def cleanup(self) -> None:
        """Delete the temporary directory of a sink-made file now (no-op for other files)."""
        if self._finalizer is not None:
            self._finalizer()


class PairSink:
    """Collects pair chunks in memory and spills them to Parquet beyond ``memory_budget``.

    ``add`` buffers; when the buffer exceeds ``memory_budget`` bytes (24 per pair) it is
    written as a row group to ``path + ".tmp"`` (``path=None``: a file in a fresh temporary
    directory, deleted with the returned :class:`PairFile`).  :meth:`finish` returns a
    sorted, deduplicated ``PairSet`` if nothing was spilled (``path`` is then not written),
    otherwise writes the rest, moves the complete file to ``path`` atomically and returns a
    :class:`PairFile`.  :meth:`abort` (or leaving a ``with`` block without finishing)
    removes the partial file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self._budget = check_positive_int(memory_budget, "memory_budget")
        self._path = None if path is None else Path(path)
        self._tmpdir: str | None = None
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buf_pairs = 0
        self._n_pairs = 0
        self._done = False

    @property
    def n_pairs(self) -> int:
        """Pairs added so far, repeats included."""
        return self._n_pairs

    @property
    def spilled(self) -> bool:
        """Whether pairs have been written to disk."""
        return self._writer is not None

    def add(self, pairs: PairSet) -> None:
        """Add a chunk of pairs (any order; repeats allowed)."""
        if self._done:
            raise ValueError("this PairSink is finished; make a new one")
        i = np.asarray(pairs.i, dtype=np.int64)
        j = np.asarray(pairs.j, dtype=np.int64)
        s = np.asarray(pairs.s, dtype=np.float64)
        if not (i.ndim == j.ndim == s.ndim == 1 and i.shape == j.shape == s.shape):
            raise ValueError(
                f"pairs must be three 1-D arrays of one length; got shapes "
                f"{i.shape}, {j.shape}, {s.shape}"
            )
        if i.shape[0] == 0:
            return
        self._buf.append((i.copy(), j.copy(), s.copy()))
        self._buf_pairs += i.shape[0]
        self._n_pairs += i.shape[0]
        if self._buf_pairs * _PAIR_BYTES > self._budget:
            self._spill()

    def finish(self) -> PairSet | PairFile:
        """All pairs: a sorted, deduplicated ``PairSet`` in memory, or the spilled file."""
        if self._done:
            raise ValueError("this PairSink is already finished")
        if self._writer is None:
            self._done = True
            if not self._buf:
                return PairSet.empty()
            i, j, s = (np.concatenate(c) for c in zip(*self._buf, strict=True))
            self._buf = []
            return _sorted_unique(i, j, s)
        try:
            if self._buf:
                self._spill()
            self._writer.close()
            with open(self._tmp, "rb") as f:
                os.fsync(f.fileno())
            final = self._final_path()
            os.replace(self._tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        tmpdir, self._tmpdir = self._tmpdir, None
        return PairFile(final, cleanup_dir=tmpdir)

    def abort(self) -> None:
        """Drop everything: close and delete the partial file (and temporary directory)."""
        self._done = True
        self._buf = []
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the file is being thrown away anyway
                pass
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> PairSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._done:
            self.abort()

    def _final_path(self) -> Path:
        # No path given: the spill made a temporary directory for the file.
        return self._path if self._path is not None else Path(self._tmpdir) / "pairs.parquet"

    def _spill(self) -> None:
        if self._writer is None:
            if self._path is None:
                self._tmpdir = tempfile.mkdtemp(prefix="dedup-pairs-")
            final = self._final_path()
            self._tmp = final.with_name(final.name + ".tmp")
            self._writer = pq.ParquetWriter(self._tmp, PAIR_SCHEMA)
        i, j, s = (np.concatenate(c) for c in zip(*self._buf, strict=True))
        self._buf = []
        self._buf_pairs = 0
        table = pa.Table.from_arrays([pa.array(i), pa.array(j), pa.array(s)], schema=PAIR_SCHEMA)
        self._writer.write_table(table)


def write_pair_file(path: str | os.PathLike[str], pairs: PairSet) -> str:
    """Write ``pairs`` as one pair file (the :data:`PAIR_SCHEMA` Parquet that
    :class:`PairFile` reads), atomically; returns its SHA-256 hex digest, for a manifest to
    check it by (``PairFile(path, sha256=...)``).  The file is built in memory first: for
    pair sets that fit there (a :class:`PairSink` spills larger ones)."""
    table = pa.Table.from_arrays(
        [
            pa.array(np.asarray(pairs.i, dtype=np.int64)),
            pa.array(np.asarray(pairs.j, dtype=np.int64)),
            pa.array(np.asarray(pairs.s, dtype=np.float64)),
        ],
        schema=PAIR_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _column(table: pa.Table | pa.RecordBatch, name: str, dtype: type) -> np.ndarray:
    col = table.column(name)
    arr = col.to_numpy() if isinstance(col, pa.ChunkedArray) else col.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(arr, dtype=dtype)


def _sorted_unique(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> PairSet:
    """Sort by ``(i, j)`` and keep the first of each repeated pair."""
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    if i.shape[0] > 1:
        first = np.ones(i.shape[0], dtype=bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        i, j, s = i[first], j[first], s[first]
    return PairSet(i, j, s)
