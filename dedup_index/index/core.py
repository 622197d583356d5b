"""``DedupIndex``: incremental add-and-query with exactly the one-shot decisions.

One directory holds everything, as immutable files listed by one manifest:

- ``rows/rows-NNNNNN.npy`` + ``rows/keys-NNNNNN.json``: the rows (float32 or float16
  unit vectors, memory-mapped, never re-embedded) and keys of one ``add``;
- ``pairs/part-NNNNNN.parquet``: the pairs one ``add`` found;
- ``state-NNNNNN.npz``: per-row decisions and scores: a full state, then one *delta* per
  ``add`` (the rows whose decisions or scores changed, and the new rows);
- ``ann/seg-NNNNNN.faiss`` (``backend="ivf"``/``"hnsw"``): FAISS segments (see :mod:`.ann`);
- ``manifest.json``: format version, dimension, threshold, policy, model name, the row
  count and every file of the current generation with its SHA-256 checksum.

**Append-only.**  An ``add`` writes new files only and commits by replacing the manifest
(temp file, fsync, rename): nothing written before is rewritten, so an add costs what it
adds, and a process killed at any point leaves the previous generation readable; files
a dead writer left behind are not listed and are removed by the next writer.
:meth:`DedupIndex.compact` merges the files (one rows file, one pair part, one full
state, one FAISS segment with ``nlist`` grown to the row count) as one commit; the files
it supersedes are *retired*: listed in the manifest and deleted by a later commit once
``retain_seconds`` have passed, so readers still on the old generation keep working.
Indexes of format version 1 (one ``embeddings/`` store, one FAISS file) are read as they
are and written as version 2 by their next commit.

**Snapshot reads.**  Readers (``DedupIndex.open(path)``, mode ``"r"``) take no lock and
see the generation committed when they opened (or last called :meth:`DedupIndex.refresh`);
within a process, ``query`` runs on one immutable view, so queries may run in threads
while an ``add`` builds the next generation.

With ``backend="ivf"``/``"hnsw"`` new rows go through FAISS segments instead (see
:mod:`.ann`): pairs found are exact, some may be missed, and an old row's nearest score
is only raised through candidates found (a lower bound).  With the exact backends:

Adding rows ``Q`` to ``N`` indexed rows searches ``Q`` against the rows exactly
(:func:`~dedup_index.search.cross.cross_search`) and ``Q`` against itself (``blocked``),
so every pair involving a new row is found, every new row's nearest and best-earlier
score is exact, and old rows' nearest scores are raised where a new row is nearer.  The
decisions are then recomputed by the policy over all stored pairs (O(N + pairs), no
embeddings touched), so any number of batches, with closes and reopens in between, gives
what one-shot :func:`~dedup_index.dedup_embeddings` of the concatenation gives.  Under the
``reference`` policy removed rows stay in the index: later rows are compared with them too.

Writers take an exclusive lock on ``.lock`` (a second writer gets :class:`IndexLockedError`
at once).

**Millions of rows.**  :meth:`DedupIndex.add_store` builds an index from an on-disk
:class:`~dedup_index.store.EmbeddingStore` a batch at a time (one commit per batch), so
memory follows the batch, not the store; a ``float16`` index keeps its rows and its IVF
lists as float16, and FAISS segment files of :data:`~.ann.MMAP_BYTES` or more are
memory-mapped rather than loaded (see :mod:`.ann`).  Such a segment is hashed when first
opened, then known by its stat (``checked.json``: :class:`dedup_index.files.CheckedFiles`):
opening an index of 10M rows does not read its ~10 GiB of segments again.

A *verifying* index (``create(..., verify="geometric")``, or the first
``add_images(..., verify="geometric")`` on an empty one; recorded in the manifest) stores
only the pairs that :mod:`dedup_index.verify` confirms, so the same holds on verified pairs:
any number of adds equals one-shot ``verify="geometric"`` of the concatenation (see
:meth:`DedupIndex.add_images`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DedupIndexError
from ..files import (
    CheckedFiles,
    WriterLock,
    atomic_write_bytes,
    crash_point,
    read_json,
    sha256_file,
    write_json_atomic,
)
from ..policy import POLICIES, decide
from ..search import INDEX_BACKENDS, as_unit_float32
from ..search.blocked import HeapTrim, blocked_search
from ..search.cross import cross_search
from ..search.flat import faiss_module, flat_cross_search
from ..search.pairs import PairSet, concat_pairsets
from ..search.precision import check_precision
from ..store import (
    EmbeddingStore,
    PairFile,
    RowRange,
    SegmentedRows,
    StoreError,
    blocks_name,
    open_rows_file,
    write_pair_file,
    write_rows_segment,
)
from ..validation import check_choice, check_positive_int, check_threshold, resolve_device
from .ann import ANN_BACKENDS, MMAP_BYTES, AnnIndex, Segment
from .keys import KeyTable, repeated_keys

FORMAT = "dedup-index"
VERSION = 2
#: Older format versions read (and upgraded by the next commit).
READS_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
_STATE_FIELDS = (
    "keep",
    "duplicate_of",
    "duplicate_similarity",
    "group",
    "nearest",
    "earlier",
    "removed",
)
#: Folders of the immutable files (created by ``create``; scanned for leftovers).
_FOLDERS = ("rows", "pairs", "ann")
logger = logging.getLogger(__name__)

ON_DUPLICATE_KEY = ("error", "skip")
#: From this many rows in one ``add``, an approximate index finds the batch's own pairs
#: with the ``partitioned`` backend (GEMM tiles within clusters) instead of the exact
#: ``blocked`` tiles: a 1M-row batch takes minutes instead of hours.
ANN_BULK_ROWS = 20_000
#: Rows per ``add`` of :meth:`DedupIndex.add_store`: 512 MiB of float32 queries at
#: D = 512; the add's working memory is a small multiple of that, whatever the store's size.
STORE_BATCH_ROWS = 262_144
#: From this many rows, :meth:`DedupIndex.add_store` into an empty ``ivf`` index builds it
#: in one pass (:meth:`DedupIndex.add_store`'s ``one_pass``) instead of batch by batch:
#: at 10M rows, 38 batches of a quarter million were projected at 1.5-2 h.
ONE_PASS_ROWS = 1_000_000
#: Rows per FAISS segment of a one-pass build: a segment is built in memory before it is
#: written and memory-mapped, and that is the build's memory peak after the search (a
#: 512k-row float16 segment in 49,344 lists: +685 MiB at its peak; 1M rows: +1,202 MiB;
#: ``bench/RESULTS.md``).  More segments cost a query little: the quantizer is searched
#: once for all of them (:class:`~dedup_index.index.ann.AnnIndex`).
ONE_PASS_SEGMENT_ROWS = 1 << 19
#: Rows per rows file of a one-pass build: reads through a map may bring a whole part
#: into the RSS before its pages are released (scattered k-means samples), so a part is
#: at most 256 MiB of float16 rows.
ONE_PASS_FILE_ROWS = 1 << 18
#: Bytes read through a one-pass build's row maps before their pages are dropped from
#: the RSS (:class:`~dedup_index.store.SegmentedRows`'s ``release_after``).
ONE_PASS_MAPPED_BYTES = 256 << 20
#: Seconds a file superseded by ``compact`` or ``remove`` is kept for readers still on
#: the generation before (deleted by the first commit after that).
RETAIN_SECONDS = 600.0


class IndexError_(DedupIndexError):
    """Base of the persistent index's errors (the name avoids the builtin)."""


class IndexLockedError(IndexError_):
    """Another process holds the index open for writing."""


class IndexCorruptError(IndexError_):
    """A file of the index is missing, truncated or fails its checksum."""


@dataclass(frozen=True)
class AddResult:
    """Outcome for the rows of one ``add``, in the order given.

    ``kept[k]`` is False for a near-duplicate; ``duplicate_of[k]`` is then the key of the
    row it duplicates (else None) and ``similarity[k]`` their canonical similarity (NaN
    when kept); ``max_similarity[k]`` is its nearest-neighbour score over the whole index.
    ``skipped`` lists keys left out because they were already indexed
    (``on_duplicate_key="skip"``).
    """

    keys: list[str]
    kept: np.ndarray
    duplicate_of: list[str | None]
    similarity: np.ndarray
    max_similarity: np.ndarray
    skipped: list[str]
    #: ``(key, LoadFailure)`` of images :meth:`DedupIndex.add_images` could not load.
    failures: list = field(default_factory=list)
    #: On a verifying index: every candidate pair this add found, with its evidence
    #: (:class:`~dedup_index.verify.Verification`; rows are index rows, see
    #: :attr:`verification_keys`); None otherwise.
    verification: Any = None
    #: The keys of the rows ``verification`` refers to (``{row: key}``).
    verification_keys: dict[int, str] = field(default_factory=dict)

    @property
    def n_removed(self) -> int:
        return int((~self.kept).sum())

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-able decision per added row, then one per image that failed to load
        (``kept`` None, with its ``error``); similarities shown at most 1.0."""
        out: list[dict[str, Any]] = [
            {
                "key": k,
                "kept": bool(kept),
                "duplicate_of": dup,
                "similarity": None if dup is None else min(float(s), 1.0),
                "max_similarity": min(float(m), 1.0),
            }
            for k, kept, dup, s, m in zip(
                self.keys,
                self.kept,
                self.duplicate_of,
                self.similarity,
                self.max_similarity,
                strict=True,
            )
        ]
        none = {"kept": None, "duplicate_of": None, "similarity": None, "max_similarity": None}
        out += [{"key": k, **none, "error": str(f)} for k, f in self.failures]
        return out


@dataclass
class _View:
    """One committed generation, as a reader sees it: never changed once built (the keys
    are read lazily, once; a writer's later views share them, appended to)."""

    manifest: dict[str, Any]
    rows: SegmentedRows
    state: dict[str, np.ndarray]
    ann: AnnIndex | None
    # rows file name -> its rows; ann file name -> (FAISS index, mapped path or None);
    # for reuse by refresh
    files: dict[str, Any]
    keys: KeyTable | None = None


class DedupIndex:
    """A directory of embeddings, pairs and decisions that grows by ``add``."""

    #: Where the exact searches of ``add``/``query``/``remove`` run (``create``/``open``'s
    #: ``device``, resolved; None: the CPU), and their CPU engine (``"torch"``: the
    #: device tile code on the CPU).  Facts of this process, not of the index: never
    #: written to the manifest.
    device: str | None = None
    engine: str | None = None

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str, lock_fd: WriterLock | None):
        self.path = path
        self.mode = mode
        self._lock_fd = lock_fd
        self._view = _load_view(path, manifest)
        if mode == "a":
            _collect_garbage(path, manifest)

    @property
    def _manifest(self) -> dict[str, Any]:
        return self._view.manifest

    @property
    def _state(self) -> dict[str, np.ndarray]:
        return self._view.state

    # ------------------------------------------------------------------ create, open
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dim: int,
        threshold: float = 0.9,
        *,
        policy: str = "reference",
        backend: str = "blocked",
        model_name: str | None = None,
        dtype: str = "float32",
        backend_options: dict[str, Any] | None = None,
        precision: str = "auto",
        verify: str = "none",
        device: str | None = None,
        engine: str | None = None,
    ) -> DedupIndex:
        """A new, empty index at ``path`` (which must not hold one), open for writing.

        ``backend``: ``"blocked"`` (numpy GEMM tiles) or ``"flat"`` (FAISS
        ``IndexFlatIP`` tiles), exact: every new row against every stored row, the same
        decisions bit for bit; or ``"ivf"`` / ``"hnsw"`` (FAISS segments; approximate,
        for very large indexes: see :mod:`dedup_index.index.ann`), with
        ``backend_options`` (``nlist``, ``nprobe``, ``m``, ``ef_search``, ``tail_rows``...).
        ``dtype="float16"`` stores rows at half the size (scores are then those of the
        rounded rows, exact and deterministic as ever).  ``precision``: the candidate
        arithmetic of the exact cross search (``"auto"``, ``"fp32"``, ``"bf16"``,
        ``"fp16"``: :mod:`dedup_index.search.precision`; the same decisions whichever),
        recorded in the manifest.  ``verify="geometric"``: a verifying index (see
        :meth:`add_images`): ``threshold`` is then the candidate threshold, and only
        pairs that verification confirms are stored and decided on.

        ``device``: where this process runs the exact searches (``"cuda"``, ``"cuda:N"``,
        ``"cpu"``, ``"auto"``; :func:`~dedup_index.validation.resolve_device`: CUDA asked
        for where there is none warns and runs on the CPU): the ``blocked`` index's cross
        search and every index's within-batch search run the GPU tile loop there, the
        same decisions bit for bit (FAISS's ``flat``/``ivf``/``hnsw`` cross searches stay
        on the CPU: FAISS has no GPU range search).  Not stored in the index: a machine
        fact, given again to :meth:`open` (an index built on a GPU opens on a laptop).
        ``engine="torch"``: the GPU tile code on the CPU (how the tests hold it)."""
        from ..verify import check_verify

        path = Path(path)
        check_precision(precision)
        check_verify(verify)
        device, engine = _search_device(device, engine)
        threshold = check_threshold(threshold)
        check_choice(policy, POLICIES, "policy")
        check_choice(backend, INDEX_BACKENDS, "backend")
        check_choice(str(np.dtype(dtype)), ("float32", "float16"), "dtype")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if (path / MANIFEST).exists():
            raise IndexError_(f"{path} already holds a dedup index; use DedupIndex.open")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        try:
            for folder in _FOLDERS:
                (path / folder).mkdir(exist_ok=True)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "dim": dim,
                "threshold": threshold,
                "policy": policy,
                "backend": backend,
                "model_name": model_name,
                "dtype": str(np.dtype(dtype)),
                "count": 0,
                "generation": 0,
                "backend_options": dict(backend_options or {}),
                "precision": precision,
                "verify": verify,
                "rows": [],
                "ann": [],
                "pairs": [],
                "state": [],
                "retired": [],
                "checksums": {},
            }
            write_json_atomic(path / MANIFEST, manifest)
            index = cls(path, manifest, "a", lock_fd)
            index.device, index.engine = device, engine
            return index
        except BaseException:
            _unlock(lock_fd)
            raise

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "r",
        *,
        dim: int | None = None,
        model_name: str | None = None,
        device: str | None = None,
        engine: str | None = None,
    ) -> DedupIndex:
        """Open an index (``mode="a"`` to add, with an exclusive lock).  ``dim`` and
        ``model_name``, when given, must match what the index was built with.
        ``device``/``engine``: where this process searches, as in :meth:`create`."""
        path = Path(path)
        check_choice(mode, ("r", "a"), "mode")
        device, engine = _search_device(device, engine)
        manifest = _load_manifest(path)
        if dim is not None and dim != manifest["dim"]:
            raise IndexError_(
                f"the index at {path} holds {manifest['dim']}-dimensional embeddings; got dim={dim}"
            )
        if model_name is not None and manifest["model_name"] not in (None, model_name):
            raise IndexError_(
                f"the index at {path} was built with model {manifest['model_name']!r}; "
                f"embeddings of {model_name!r} are not comparable with it"
            )
        lock_fd = _lock(path) if mode == "a" else None
        try:
            if mode == "a":  # the last writer may have died after its manifest: re-read
                manifest = _load_manifest(path)
            index = cls(path, manifest, mode, lock_fd)
            index.device, index.engine = device, engine
            return index
        except BaseException:
            _unlock(lock_fd)
            raise

    def refresh(self) -> bool:
        """Move a reader to the newest committed generation (files already loaded are
        reused).  Returns whether there was a newer one."""
        manifest = _load_manifest(self.path)
        if manifest["generation"] == self._manifest["generation"]:
            return False
        self._view = _load_view(self.path, manifest, reuse=self._view)
        return True

    def close(self) -> None:
        _unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> DedupIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def threshold(self) -> float:
        return float(self._manifest["threshold"])

    @property
    def exact(self) -> bool:
        """False with an approximate backend: pairs may be missed, scores are lower bounds."""
        return self._manifest["backend"] not in ANN_BACKENDS

    @property
    def policy(self) -> str:
        return str(self._manifest["policy"])

    @property
    def model_name(self) -> str | None:
        return self._manifest["model_name"]

    @property
    def verify_mode(self) -> str:
        """``"geometric"`` when the index stores only verified pairs, else ``"none"``."""
        return str(self._manifest.get("verify", "none"))

    @property
    def generation(self) -> int:
        """The committed generation this object reads (raised by each add)."""
        return int(self._manifest["generation"])

    def __len__(self) -> int:
        return int(self._manifest["count"])

    def keys(self) -> list[str]:
        return _view_keys(self.path, self._view).to_list(0, len(self))

    def _rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The first row of each of ``keys`` (a ``KeyError`` names those not indexed)."""
        keys = list(keys)
        rows = _view_keys(self.path, self._view).rows_of(keys, stop=len(self))
        missing = [k for k, r in zip(keys, rows.tolist(), strict=True) if r < 0]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in the index, e.g. {missing[:3]}")
        return rows

    def max_similarity(self, keys: Sequence[str]) -> np.ndarray:
        """Nearest-neighbour similarity of indexed ``keys`` (floored at 0)."""
        return self._state["nearest"][self._rows_of(keys)].copy()

    def decisions(self) -> dict[str, np.ndarray]:
        """Per-row arrays: keep, duplicate_of, duplicate_similarity, group, nearest, earlier."""
        return {k: v.copy() for k, v in self._state.items()}

    def embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored unit float32 rows ``start:stop`` in row order (removed keys included):
        what every decision of this index was taken on."""
        stop = len(self) if stop is None else min(stop, len(self))
        return np.asarray(self._view.rows[start:stop], dtype=np.float32)

    def pairs(self) -> PairSet:
        """Every pair ``i < j`` at or above the threshold, sorted."""
        sums = self._manifest["checksums"]
        parts = self._manifest["pairs"]
        return concat_pairsets(_open_part(self.path, p, sums).to_pairset() for p in parts)

    def stats(self) -> dict[str, Any]:
        view = self._view
        keep = view.state["keep"]
        manifest = view.manifest
        ann = view.ann
        return {
            "rows": int(manifest["count"]),
            "kept": int(keep.sum()),
            "removed": int((~keep).sum()),
            "pairs": int(manifest.get("n_pairs", 0)),
            "dim": self.dim,
            "threshold": self.threshold,
            "policy": self.policy,
            "backend": manifest["backend"],
            "exact": self.exact,
            "model_name": self.model_name,
            "verify": self.verify_mode,
            "dtype": manifest.get("dtype", "float32"),
            "generation": int(manifest["generation"]),
            "row_files": len(manifest["rows"]),
            "state_files": len(manifest["state"]),
            "ann_segments": 0 if ann is None else len(ann.segments),
            "ann_tail_rows": 0 if ann is None else int(manifest["count"]) - ann.covered,
            "nlist": None if ann is None else ann.nlist,
            "bytes_on_disk": _tree_size(self.path),
        }

    def query(self, embeddings) -> list[list[tuple[str, float]]]:
        """For each query row, the indexed rows at or above the threshold as ``(key,
        similarity)``, most similar first.  Read-only; safe to call from several threads,
        also while this process adds (each call reads one committed generation)."""
        view = self._view
        q = self._prepare(embeddings)
        removed = view.state["removed"]
        live = ~removed if removed.any() else None
        if view.manifest["backend"] in ANN_BACKENDS:
            ann = view.ann or _empty_ann(view.manifest)
            found = ann.search(q, view.rows, self.threshold, live, nearest=False)
        else:
            found = self._cross_search(
                q, view.rows, self.threshold, base_live=live, base_best=False
            )
        hit_keys = _view_keys(self.path, view).take(found.b)
        out: list[list[tuple[str, float]]] = [[] for _ in range(q.shape[0])]
        hits = zip(found.q.tolist(), hit_keys, found.s.tolist(), strict=True)
        for qi, key, s in sorted(hits, key=lambda t: -t[2]):
            out[qi].append((key, s))
        return out

    # ------------------------------------------------------------------ writing
    def add(
        self,
        embeddings,
        keys: Sequence[str] | None = None,
        *,
        on_duplicate_key: str = "error",
        verify: str | None = None,
        images: Sequence[Any] | None = None,
        image_root: str | os.PathLike | None = None,
        verify_options: dict[str, Any] | None = None,
    ) -> AddResult:
        """Add rows; decisions equal one-shot dedup of everything added so far.

        On a verifying index (``verify="geometric"``, see :meth:`add_images`) the rows'
        image values go in ``images`` (one per row, as the embeddings), with the
        ``image_root`` their paths and the indexed keys resolve against, and
        ``verify_options`` for :func:`~dedup_index.verify.verify_pairs`."""
        self._check_writable()
        mode = self._verify_mode_for(verify)
        if mode != "none" and images is None:
            raise ValueError(
                f"the index at {self.path} verifies pairs (verify={mode!r}): pass the rows' "
                "images (images=...), or use add_images"
            )
        q = self._as_stored(embeddings)
        n_old = len(self)
        keys = [str(n_old + k) for k in range(q.shape[0])] if keys is None else list(keys)
        if len(keys) != q.shape[0]:
            raise ValueError(f"got {len(keys)} keys for {q.shape[0]} rows")
        if images is not None and len(images) != q.shape[0]:
            raise ValueError(f"got {len(images)} images for {q.shape[0]} rows")
        fresh, skipped = self._new_keys(keys, on_duplicate_key)
        if skipped:
            keys, q = [keys[k] for k in fresh], q[fresh]
            images = None if images is None else [images[k] for k in fresh]
        m = q.shape[0]
        if m == 0:
            return AddResult([], np.zeros(0, bool), [], np.zeros(0), np.zeros(0), skipped)
        view = self._view
        removed = view.state["removed"]
        live = None if not removed.any() else ~removed
        built = None  # a FAISS segment of exactly the new rows, if the search made one
        if self._manifest["backend"] in ANN_BACKENDS:
            new_pairs, nearest, earlier, built = self._ann_step(q, n_old, live)
        else:
            new_pairs, nearest, earlier = self._exact_step(q, n_old, live)
        verification, verification_keys = None, {}
        if mode != "none":  # the candidates confirmed by hash or geometry are the pairs
            verification, verification_keys = self._verify_new_pairs(
                new_pairs, keys, list(images), image_root, verify_options
            )
            new_pairs = verification.pairs
        # New files only: rows and keys, pair part, FAISS segment, state delta; then the
        # manifest (the commit point).
        generation = self.generation + 1
        checksums = dict(self._manifest["checksums"])
        rows_name = f"rows/rows-{generation:06d}.npy"
        keys_name = f"rows/keys-{generation:06d}.json"
        checksums.update(write_rows_segment(self.path, rows_name, q, self._dtype))
        checksums[keys_name] = write_json_atomic(self.path / keys_name, keys)
        crash_point("rows_appended")
        part = f"pairs/part-{generation:06d}.parquet"
        checksums[part] = _write_part(self.path / part, new_pairs)
        crash_point("pairs_written")
        parts = [*self._manifest["pairs"], part]
        n = n_old + m
        decisions = decide(n, _Parts(self.path, parts, checksums), self.policy)
        new_state = _state(
            decisions, nearest, earlier, np.concatenate([removed, np.zeros(m, bool)])
        )
        rows_file = _open_rows(self.path, rows_name, m, self.dim)
        rows = view.rows.with_part(rows_file)
        ann, ann_entries = self._grow_ann(rows, generation, checksums, built)
        manifest = dict(
            self._manifest,
            count=n,
            pairs=parts,
            n_pairs=int(self._manifest.get("n_pairs", 0)) + len(new_pairs),
            rows=[*self._manifest["rows"], _rows_entry(rows_name, keys_name, m)],
            ann=ann_entries,
            verify=mode,
        )
        files = dict(view.files, **{rows_name: rows_file})
        if ann is not None and ann_entries and ann_entries[-1]["file"] not in files:
            seg = ann.segments[-1]
            files[ann_entries[-1]["file"]] = (seg.index, seg.path)
        self._commit(generation, manifest, checksums, new_state, rows, ann, files, None)
        # Committed: the next view shares the key table, appended to in place (O(batch),
        # not O(N); an older view reads only its first rows of it).
        if view.keys is not None:
            view.keys.extend(keys)
            self._view.keys = view.keys
        idx = np.arange(n_old, n)
        dup = new_state["duplicate_of"][idx]
        dup_keys = iter(_view_keys(self.path, self._view).take(dup[dup >= 0]))
        return AddResult(
            keys=keys,
            kept=new_state["keep"][idx].copy(),
            duplicate_of=[next(dup_keys) if d >= 0 else None for d in dup.tolist()],
            similarity=new_state["duplicate_similarity"][idx].copy(),
            max_similarity=nearest[idx].copy(),
            skipped=skipped,
            verification=verification,
            verification_keys=verification_keys,
        )

    def add_store(
        self,
        source: Any,
        *,
        batch_rows: int = STORE_BATCH_ROWS,
        start: int = 0,
        stop: int | None = None,
        on_duplicate_key: str = "error",
        progress: Any = None,
        one_pass: bool | None = None,
    ) -> dict[str, Any]:
        """Add the rows of an on-disk store, ``batch_rows`` at a time: how an index of
        millions of rows is built without ever holding them in memory.

        ``one_pass``: an empty ``ivf`` index is instead built in one pass and one commit
        (None: from :data:`ONE_PASS_ROWS` rows, when the rows' keys are distinct and the
        index does not verify): the rows are written as the index stores them, one
        ``partitioned`` search over them finds the pairs, and its centroids become the
        coarse quantizer, each row put in the list of its nearest centroid (no second
        clustering, no batch searched against the batches before it).  Memory stays
        bounded (rows files of :data:`ONE_PASS_FILE_ROWS` rows, FAISS segments of
        :data:`ONE_PASS_SEGMENT_ROWS` rows, written and memory-mapped one at a time); a
        killed build leaves the index empty (nothing is committed until the end: start
        again).

        ``source``: an :class:`~dedup_index.store.EmbeddingStore`, the path of one
        (opened read-only), or any ``(N, D)`` array-like with slicing (a memory-mapped
        ``.npy``).  Each batch is one :meth:`add` (one commit): memory is bounded by the
        batch, not the store (a float16 index keeps its rows, and its IVF lists, as
        float16; large FAISS segments stay on disk, see :mod:`.ann`), a process killed
        mid-way leaves every batch committed before it, and the decisions are those of
        the same adds made by hand (with an exact backend: one-shot dedup of the rows).
        Rows ``[start, stop)`` of the store are added; a build that was interrupted
        goes on with ``start=len(index)`` (when the index was empty before it).  Keys are
        the store's keys when it has them, else :meth:`add`'s default (the row numbers
        in the index).  ``progress``: called with ``(rows added so far, rows to add)``
        after each batch.  Returns ``{"rows", "removed", "batches", "seconds"}`` (no
        per-row result: at 10M rows that would be the largest object in the process)."""

        self._check_writable()
        batch_rows = check_positive_int(batch_rows, "batch_rows")
        if isinstance(source, (str, os.PathLike)):
            source = EmbeddingStore.open(source, mode="r")
        shape = getattr(source, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"source must be an EmbeddingStore, its path, or an (N, D) array-like; got "
                f"{type(source).__name__}"
            )
        total, dim = int(shape[0]), int(shape[1])
        if dim != self.dim:
            raise ValueError(
                f"the index holds {self.dim}-dimensional embeddings; the store holds {dim}"
            )
        stop = total if stop is None else stop
        if isinstance(start, bool) or not isinstance(start, int) or isinstance(stop, bool):
            raise ValueError(f"start and stop must be integers; got {start!r}, {stop!r}")
        if not 0 <= start <= stop <= total:
            raise ValueError(
                f"start={start}, stop={stop}: need 0 <= start <= stop <= {total} (the rows "
                "of the store)"
            )
        keys_of = _store_keys(source, start, stop)  # rows start..stop-1's, or None
        empty_ivf = (
            len(self) == 0 and self._manifest["backend"] == "ivf" and self.verify_mode == "none"
        )
        if one_pass and not empty_ivf:
            raise IndexError_(
                f"a one-pass build needs an empty 'ivf' index that does not verify; the index "
                f"at {self.path} is {self._manifest['backend']!r} with {len(self)} rows "
                f"(verify={self.verify_mode!r}): add the rows in batches (one_pass=False)"
            )
        if one_pass or (one_pass is None and empty_ivf and stop - start >= ONE_PASS_ROWS):
            distinct = keys_of is None or not repeated_keys(keys_of.array(), limit=1)
            if one_pass and not distinct:
                raise ValueError(
                    "the store's keys repeat: add its rows in batches (one_pass=False)"
                )
            one_pass = distinct
        if one_pass:
            del keys_of  # the build reads them again, and drops them before its search
            return self._build_one_pass(source, start, stop, progress)
        t0 = time.perf_counter()
        added = removed = batches = 0
        for a in range(start, stop, batch_rows):
            b = min(stop, a + batch_rows)
            rows = np.asarray(source[a:b])
            keys = None if keys_of is None else keys_of.to_list(a - start, b - start)
            result = self.add(rows, keys=keys, on_duplicate_key=on_duplicate_key)
            del rows
            self._view.rows.release_pages()  # pages read through the maps leave the RSS
            added += len(result.keys)
            removed += result.n_removed
            batches += 1
            logger.info(
                "add_store: rows %d-%d added (%d of %d), %.1f s",
                a,
                b - 1,
                b - start,
                stop - start,
                time.perf_counter() - t0,
            )
            if progress is not None:
                progress(b - start, stop - start)
        return {
            "rows": added,
            "removed": removed,
            "batches": batches,
            "seconds": time.perf_counter() - t0,
        }

    def _build_one_pass(self, source, start: int, stop: int, progress) -> dict[str, Any]:
        """:meth:`add_store`'s ``one_pass`` build of an empty ``ivf`` index (see there;
        the keys are distinct: checked there)."""
        from ..search.partitioned import default_params, partitioned_search

        t0 = time.perf_counter()
        n = stop - start
        keys = _store_keys(source, start, stop)  # None: the row numbers
        generation = self.generation + 1
        checksums = dict(self._manifest["checksums"])
        entries, parts = self._write_row_files(
            generation,
            n,
            lambda a, b: _PreparedRows(self, source, start + a, start + b),  # as add() stores
            (lambda a, b: [str(r) for r in range(a, b)]) if keys is None else keys.to_list,
            checksums,
            "add_store (one pass)",
        )
        crash_point("rows_appended")
        del keys  # in the keys files now, read back when first needed: not held in the search
        rows = SegmentedRows(parts, self.dim, release_after=ONE_PASS_MAPPED_BYTES)
        params = default_params(n)
        pairs, nearest, earlier, info = partitioned_search(
            rows,
            self.threshold,
            params=params,
            precision=self._manifest.get("precision", "auto"),
            keep_lists=True,
        )
        n_pairs = len(pairs)
        logger.info("add_store (one pass): %d pairs (%s)", n_pairs, info.summary(n))
        part = f"pairs/part-{generation:06d}.parquet"
        checksums[part] = _write_part(self.path / part, pairs)
        crash_point("pairs_written")
        del pairs
        # The partitioning's centroids are the coarse quantizer; each row joins the list of
        # its nearest centroid (the same rule as IVF's own add).
        centroids, home = info.centroids, info.home
        if centroids is None:  # too few rows to partition: one list
            centroids = np.asarray(rows[:1], dtype=np.float32)
            home = np.zeros(n, dtype=np.int32)
        ann, ann_entries, files = self._write_ivf_segments(
            generation, rows, centroids, home, checksums, progress
        )
        crash_point("ann_written")
        decisions = decide(n, _Parts(self.path, [part], checksums), self.policy)
        state = _state(decisions, nearest, earlier, np.zeros(n, dtype=bool))
        manifest = dict(
            self._manifest,
            count=n,
            pairs=[part],
            n_pairs=n_pairs,
            rows=entries,
            ann=ann_entries,
        )
        files.update({e["file"]: p for e, p in zip(entries, parts, strict=True)})
        view_rows = SegmentedRows(parts, self.dim)
        self._commit(generation, manifest, checksums, state, view_rows, ann, files, None, full=True)
        removed = int((~state["keep"]).sum())
        seconds = time.perf_counter() - t0
        logger.info("add_store (one pass): %d rows, %d removed, %.1f s", n, removed, seconds)
        return {"rows": n, "removed": removed, "batches": 1, "seconds": seconds}

    def _write_row_files(
        self,
        generation: int,
        n: int,
        rows_of: Any,
        keys_of: Any,
        checksums: dict[str, str],
        label: str,
        release: Any = None,
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Rows ``0..n-1`` of generation ``generation`` as rows files of
        :data:`ONE_PASS_FILE_ROWS` rows, each with its keys file (a one-pass build's and
        a compaction's: a file's rows and keys at a time, never all ``n`` as Python
        objects).  ``rows_of(a, b)``: rows ``[a, b)`` as stored (an array-like, read a
        block at a time); ``keys_of(a, b)``: their keys as a list; ``release``: called
        after each file (drops the pages read through a source's maps from the RSS).
        Records the checksums; returns ``(manifest rows entries, opened rows files)``."""
        entries, parts = [], []
        for k, a in enumerate(range(0, n, ONE_PASS_FILE_ROWS)):
            b = min(n, a + ONE_PASS_FILE_ROWS)
            rows_name = f"rows/rows-{generation:06d}-{k:05d}.npy"
            keys_name = f"rows/keys-{generation:06d}-{k:05d}.json"
            checksums.update(write_rows_segment(self.path, rows_name, rows_of(a, b), self._dtype))
            checksums[keys_name] = write_json_atomic(self.path / keys_name, keys_of(a, b))
            entries.append(_rows_entry(rows_name, keys_name, b - a))
            parts.append(
                _open_rows(self.path, rows_name, b - a, self.dim, checksums, blocks_name(rows_name))
            )
            if release is not None:
                release()
            logger.info("%s: rows %d-%d written", label, a, b - 1)
        return entries, parts

    def _write_ivf_segments(
        self,
        generation: int,
        rows: SegmentedRows,
        centroids: np.ndarray,
        home: np.ndarray,
        checksums: dict[str, str],
        progress: Any = None,
    ) -> tuple[AnnIndex, list[dict[str, Any]], dict[str, Any]]:
        """IVF segments over ``rows`` (all of the new generation's), each of
        :data:`ONE_PASS_SEGMENT_ROWS` rows, on one coarse quantizer of ``centroids``, row
        ``r`` in the list of centroid ``home[r]`` (found already: no coarse search).  A
        segment is built in memory, written, memory-mapped and dropped before the next,
        so memory is bounded by one segment whatever ``rows`` holds.  Records the
        checksums; ``progress(rows done, rows)`` after each segment.  Returns
        ``(AnnIndex, manifest ann entries, {file: (index, mapped path)})``."""
        from .ann import ivf_from_assignment

        faiss = faiss_module()
        n = rows.shape[0]
        ann = _empty_ann(self._manifest)
        entries, files = [], {}
        spans = [(a, min(n, a + ONE_PASS_SEGMENT_ROWS)) for a in range(0, n, ONE_PASS_SEGMENT_ROWS)]
        heap = HeapTrim()  # a dropped segment's lists are small heap blocks: give them back
        heap.maybe()  # and the tables of what came before the first segment
        fp16 = self._dtype == "float16"
        for k, (a, b) in enumerate(spans):
            quantizer = faiss.IndexFlatIP(self.dim)
            quantizer.add(centroids)
            index = ivf_from_assignment(quantizer, RowRange(rows, a, b), home[a:b], fp16=fp16)
            name = f"ann/seg-{generation:06d}-{k:05d}.faiss"
            index, mapped = _write_segment(self.path, name, index, checksums)
            ann = ann.with_segment(a, b, index, mapped)
            entries.append({"file": name, "start": a, "stop": b})
            files[name] = (ann.segments[-1].index, mapped)  # on the first one's quantizer
            del index
            heap.maybe()
            if progress is not None:
                progress(b, n)
        return ann, entries, files

    def _verify_mode_for(self, verify: str | None) -> str:
        """The verification of the next add: ``verify`` (None: the index's own).  An
        index stores either embedding pairs or verified pairs, never a mix: an empty index
        takes the mode of its first add, one with rows refuses the other mode."""
        from ..verify import check_verify

        mode = self.verify_mode
        if verify is None or check_verify(verify) == mode:
            return mode
        if len(self) == 0:
            return verify
        raise IndexError_(
            f"the index at {self.path} was built with verify={mode!r} ({len(self)} rows); "
            f"adding with verify={verify!r} would mix embedding and verified pairs: build "
            f"a new index with verify={verify!r}"
        )

    def _verify_new_pairs(
        self,
        pairs: PairSet,
        keys: list[str],
        images: list[Any],
        image_root: str | os.PathLike | None,
        options: dict[str, Any] | None,
    ):
        """Verify the candidate pairs of an add (index rows; the new rows are the last
        ``len(keys)``): new rows' images from ``images``, indexed rows' from their keys
        (resolved against ``image_root``).  Returns ``(Verification over index rows,
        {row: key})``."""
        from ..io.keys import key_path
        from ..verify import verify_pairs

        n_old = len(self)
        rows = np.unique(np.concatenate([pairs.i, pairs.j])) if len(pairs) else np.zeros(0, int)
        rows = rows.astype(np.int64)
        old = rows[rows < n_old]
        old_keys = dict(zip(old.tolist(), _view_keys(self.path, self._view).take(old), strict=True))
        values: list[Any] = []
        unavailable: dict[int, str] = {}
        row_keys: dict[int, str] = {}
        for local, r in enumerate(rows.tolist()):
            if r >= n_old:
                values.append(images[r - n_old])
                row_keys[r] = keys[r - n_old]
                continue
            key = old_keys[r]
            row_keys[r] = key
            path = key_path(key)
            values.append(path)
            if path is None:
                unavailable[local] = (
                    f"not_reloadable: indexed as {key[:20]}..., a content key; the index "
                    "keeps no image to verify against"
                )
        local = PairSet(np.searchsorted(rows, pairs.i), np.searchsorted(rows, pairs.j), pairs.s)
        opts = {"cache_dir": self.path, **(options or {})}
        found = verify_pairs(local, values, image_root=image_root, unavailable=unavailable, **opts)
        cand = found.candidates
        found = replace(
            found,
            candidates=PairSet(rows[cand.i], rows[cand.j], cand.s),
            failures={int(rows[k]): why for k, why in found.failures.items()},
        )
        lost = {row_keys[r]: why for r, why in found.failures.items() if r < n_old}
        if lost:
            shown = "; ".join(f"{k}: {why}" for k, why in list(lost.items())[:3])
            logger.warning(
                "%d indexed image(s) could not be loaded again to verify candidate pairs "
                "(their pairs count as not verified): %s",
                len(lost),
                shown,
            )
        return found, row_keys

    def compact(
        self,
        *,
        nlist: int | None = None,
        retain_seconds: float = RETAIN_SECONDS,
        progress: Any = None,
    ) -> dict[str, Any]:
        """Merge the files of every add into one generation (rows and keys files of
        :data:`ONE_PASS_FILE_ROWS` rows, one pair part, one full state and, for ``ivf``,
        FAISS segments of :data:`ONE_PASS_SEGMENT_ROWS` rows on one coarse quantizer
        retrained with ``nlist`` lists: default ``backend_options["nlist"]`` or
        :func:`~dedup_index.search.ivf.default_nlist` of the row count; for ``hnsw``, one
        graph over every row), as one atomic commit.  Decisions do not change.  The
        superseded files are deleted by a commit at least ``retain_seconds`` later
        (readers on the old generation keep working until then).  ``progress(rows done,
        rows)``: after each FAISS segment.  Returns :meth:`stats`.

        Memory is bounded for ``ivf`` as for a one-pass build (the keys a file at a
        time, the rows read through maps, the k-means on a sample of ``64 * nlist`` rows,
        each row's list found block by block, one segment in memory at a time): at 10M
        rows, the k-means sample (~1.7 GB at the default ``nlist``) is the peak.  An
        ``hnsw`` graph is built in memory whole (as FAISS searches it)."""
        self._check_writable()
        nlist = check_positive_int(nlist, "nlist", allow_none=True)
        view = self._view
        n = len(self)
        if n == 0:
            return self.stats()
        generation = self.generation + 1
        checksums: dict[str, str] = {}
        keys = _view_keys(self.path, view)
        entries, parts = self._write_row_files(
            generation,
            n,
            lambda a, b: RowRange(view.rows, a, b),
            keys.to_list,
            checksums,
            "compact",
            release=view.rows.release_pages,
        )
        crash_point("compact_rows_written")
        part = f"pairs/part-{generation:06d}.parquet"
        checksums[part] = _write_part(self.path / part, self.pairs())
        crash_point("compact_pairs_written")
        rows = SegmentedRows(parts, self.dim, release_after=ONE_PASS_MAPPED_BYTES)
        ann, ann_entries, files = None, [], {}
        backend = self._manifest["backend"]
        empty = _empty_ann(self._manifest) if backend in ANN_BACKENDS else None
        if backend == "ivf":
            from ..search.partitioned import assign_many

            centroids = empty.train_centroids(rows, nlist=nlist)
            logger.info("compact: %d rows to %d lists", n, centroids.shape[0])
            precision = self._manifest.get("precision", "auto")
            home = assign_many(rows, centroids, 1, 0.0, precision)[:, 0]
            rows.release_pages()
            ann, ann_entries, files = self._write_ivf_segments(
                generation, rows, centroids, home, checksums, progress
            )
            del home
        elif empty is not None:
            name = f"ann/seg-{generation:06d}.faiss"
            index, mapped = _write_segment(
                self.path, name, empty.build_segment(rows, fresh=True), checksums
            )
            ann = empty.with_segment(0, n, index, mapped)
            ann_entries = [{"file": name, "start": 0, "stop": n}]
            files = {name: (index, mapped)}
        crash_point("compact_ann_written")
        files.update({e["file"]: p for e, p in zip(entries, parts, strict=True)})
        manifest = dict(self._manifest, rows=entries, pairs=[part], ann=ann_entries)
        self._commit(
            generation,
            manifest,
            checksums,
            view.state,
            SegmentedRows(parts, self.dim),
            ann,
            files,
            keys,
            full=True,
            retain=retain_seconds,
        )
        return self.stats()

    def verify(self, *, full: bool = True) -> dict[str, int]:
        """Check every file of the current generation against its recorded SHA-256 (the
        rows too, which reads check block by block as they touch them).  Raises
        :class:`IndexCorruptError` naming the files that fail; returns
        ``{"files": ..., "bytes": ...}`` checked.

        ``full=False`` checks only the small files (keys, pair parts, state, block
        checksums; what ``index stats`` checks): not the rows files (nor a version-1
        index's embedding store) and FAISS segments, the large ones, which are checked
        as they are read and loaded."""
        manifest = self._manifest
        large = set() if full else _large_files(manifest)
        bad, files, size = [], 0, 0
        for name in sorted(_listed(manifest) - large):
            want = manifest["checksums"].get(name)
            if want is None and (self.path / name).is_dir():  # a version-1 index's store
                try:
                    with EmbeddingStore.open(self.path / name, mode="r") as store:
                        size += store.verify()["bytes"]
                    files += 1
                except StoreError as err:
                    bad.append(f"{name}: {err}")
                continue
            if want is None:
                continue
            try:
                got = sha256_file(self.path / name)
                size += (self.path / name).stat().st_size
            except FileNotFoundError:
                bad.append(f"{name} is missing")
                continue
            files += 1
            if got != want:
                bad.append(f"{name} fails its checksum")
        if bad:
            raise IndexCorruptError(f"the index at {self.path} is damaged: " + "; ".join(bad))
        return {"files": files, "bytes": size}

    def remove(self, keys: Sequence[str]) -> int:
        """Take ``keys`` out: afterwards the index answers exactly as if they had never
        been added (one-shot dedup of the remaining rows, in their order).

        Under the ``reference`` policy this can bring rows back: a row removed only as a
        duplicate of a removed key becomes kept (it no longer has an earlier duplicate).
        Rows stay in the embedding files as tombstones; the scores are recomputed from the
        remaining rows, which costs an exact search over them (O(N^2 D)).
        """
        self._check_writable()
        keys = list(keys)
        rows = self._rows_of(keys)
        removed = self._state["removed"].copy()
        if removed[rows].any():
            gone = [k for k, r in zip(keys, rows, strict=True) if removed[r]]
            raise KeyError(f"key(s) already removed: {gone[:3]}")
        removed[rows] = True
        live = np.flatnonzero(~removed)
        n = len(self)
        view = self._view
        pairs, near, early = blocked_search(view.rows[live], self.threshold, **self._where)
        mapped = PairSet(live[pairs.i], live[pairs.j], pairs.s)
        if self.verify_mode != "none":  # verified pairs are pair-local: those left stand
            kept = self.pairs()
            alive = ~removed[kept.i] & ~removed[kept.j]
            mapped = PairSet(kept.i[alive], kept.j[alive], kept.s[alive])
        decisions = decide(n, mapped, self.policy)
        nearest = np.full(n, np.nan)
        earlier = np.full(n, np.nan)
        nearest[live], earlier[live] = near, early
        new_state = _state(decisions, nearest, earlier, removed)
        generation = self.generation + 1
        part = f"pairs/part-{generation:06d}.parquet"
        checksums = dict(self._manifest["checksums"])
        checksums[part] = _write_part(self.path / part, mapped)
        manifest = dict(self._manifest, pairs=[part], n_pairs=len(mapped))
        self._commit(
            generation, manifest, checksums, new_state, view.rows, view.ann, view.files, view.keys
        )
        return len(rows)

    def _exact_step(self, q: np.ndarray, n_old: int, live: np.ndarray | None):
        """New rows against the committed ones (:meth:`_cross_search`) and among
        themselves (``blocked``: it gives the best-earlier scores too)."""
        rows, search = self._view.rows, self._cross_search
        if self._manifest["backend"] != "flat":  # old rows' bests only where they may rise
            search = partial(search, base_floor=self._state["nearest"])
        cross = search(q, rows, self.threshold, base_live=live)
        within, near_in, earlier_in = blocked_search(q, self.threshold, **self._where)
        return self._combine(cross, within, near_in, earlier_in, n_old)

    def _combine(self, cross, within, near_in, earlier_in, n_old: int):
        """Pairs, nearest and best-earlier scores of every row after adding ``q``, from
        ``q``'s search against the old rows (``cross``) and among themselves."""
        state = self._state
        new_pairs = concat_pairsets(
            [
                PairSet(cross.b, cross.q + n_old, cross.s),
                PairSet(within.i + n_old, within.j + n_old, within.s),
            ]
        )
        nearest = np.concatenate(
            [
                np.maximum(state["nearest"], np.maximum(cross.base_best, 0.0)),
                np.maximum(np.maximum(cross.query_best, near_in), 0.0),
            ]
        )
        earlier = np.concatenate([state["earlier"], np.maximum(cross.query_best, earlier_in)])
        return new_pairs, nearest, earlier

    @property
    def _cross_search(self):
        """New rows against committed ones, exact: FAISS flat tiles for ``flat``, the
        blocked backend's numpy tiles for ``blocked`` (the same bits either way)."""
        if self._manifest["backend"] == "flat":
            return flat_cross_search
        precision = self._manifest.get("precision", "auto")
        return partial(cross_search, precision=precision, **self._where)

    @property
    def _where(self) -> dict[str, Any]:
        """``device``/``engine`` for the tile searches (:meth:`create`'s ``device``)."""
        return {"device": self.device, "engine": self.engine}

    def _ann_step(self, q: np.ndarray, n_old: int, live: np.ndarray | None):
        """New rows against the old ones through the FAISS segments (and the exact
        tail), and among themselves: exactly (``blocked``), or from
        :data:`ANN_BULK_ROWS` rows by ``partitioned`` search (GEMM tiles in clusters).
        Returns :meth:`_combine`'s ``(pairs, nearest, earlier)`` and the FAISS segment of
        rows ``n_old:n_old + m`` the search built (IVF bulk adds; else None)."""
        view = self._view
        ann = view.ann or _empty_ann(self._manifest)
        m = q.shape[0]
        batch = ann.search_batch(q, view.rows, self.threshold, live) if m >= ANN_BULK_ROWS else None
        if batch is not None:  # IVF: the batch's own pairs from the same list products
            cross, within, near_in, earlier_in, segment = batch
            built = (n_old, n_old + m, segment)
            return (*self._combine(cross, within, near_in, earlier_in, n_old), built)
        cross = ann.search(q, view.rows, self.threshold, live, nearest=True)
        if m >= ANN_BULK_ROWS:
            from ..search.partitioned import default_params, partitioned_search

            clusters = max(1, min(4096, round(m / 64)))  # default_params' C, and a sample
            params = default_params(m, n_clusters=clusters, sample=min(m, 40 * clusters))
            # large enough that FAISS's k-means has nothing to warn about (>= 39 a list)
            within, near_in, earlier_in, info = partitioned_search(q, self.threshold, params=params)
            logger.info(
                "bulk add of %d rows: in-batch pairs by partitioned (%s)", m, info.summary(m)
            )
        else:
            within, near_in, earlier_in = blocked_search(q, self.threshold, **self._where)
        return (*self._combine(cross, within, near_in, earlier_in, n_old), None)

    def _grow_ann(
        self,
        rows: SegmentedRows,
        generation: int,
        checksums: dict[str, str],
        built: tuple | None = None,
    ):
        """The FAISS segments after an add: unchanged while the exact tail stays within
        ``tail_rows``, else plus one segment holding the tail (written as a new file;
        ``built``, :meth:`_ann_step`'s ``(start, stop, segment)``, is that segment when it
        covers exactly the tail)."""
        if self._manifest["backend"] not in ANN_BACKENDS:
            return None, []
        ann = self._view.ann or _empty_ann(self._manifest)
        entries = list(self._manifest["ann"])
        n, start = rows.shape[0], ann.covered
        if n - start <= ann.tail_rows:
            return ann, entries
        if built is not None and built[:2] == (start, n):  # the add's batch segment: no tail
            index = built[2]
        else:
            index = ann.build_segment(rows[start:n])
        name = f"ann/seg-{generation:06d}.faiss"
        index, mapped = _write_segment(self.path, name, index, checksums)
        crash_point("ann_written")
        entries.append({"file": name, "start": start, "stop": n})
        return ann.with_segment(start, n, index, mapped), entries

    def _commit(
        self,
        generation: int,
        manifest: dict[str, Any],
        checksums: dict[str, str],
        new_state: dict[str, np.ndarray],
        rows: SegmentedRows,
        ann: AnnIndex | None,
        files: dict[str, Any],
        keys: list[str] | None,
        *,
        full: bool = False,
        retain: float = RETAIN_SECONDS,
    ) -> None:
        """Write the state (a delta, or a full state when most rows changed), then the
        manifest (the commit point); retire superseded files, delete those retired long
        enough ago; publish the new view."""
        old = self._manifest
        n = int(manifest["count"])
        state_name = f"state-{generation:06d}.npz"
        changed = None if full or not old["state"] else _changed_rows(self._state, new_state)
        if changed is None or 2 * changed.shape[0] > n:
            checksums[state_name] = _write_state(self.path / state_name, new_state)
            states = [state_name]
        else:
            delta = {f: new_state[f][changed] for f in _STATE_FIELDS}
            delta.update(rows=changed, count=np.int64(n))
            checksums[state_name] = _write_state(self.path / state_name, delta)
            states = [*old["state"], state_name]
        crash_point("state_written")
        manifest = dict(manifest, version=VERSION, generation=generation, state=states)
        listed = _listed(manifest)
        manifest["checksums"] = {k: v for k, v in checksums.items() if k in listed}
        now = time.time()
        stale = sorted(_listed(old) - listed)
        retired = [dict(r) for r in old.get("retired", [])]
        if stale:
            retired.append({"until": now + float(retain), "files": stale})
        due = [r for r in retired if r["until"] <= now]
        manifest["retired"] = [r for r in retired if r["until"] > now]
        write_json_atomic(self.path / MANIFEST, manifest)
        crash_point("manifest_written")
        for entry in due:
            _delete(self.path, entry["files"])
        live_files = {k: v for k, v in files.items() if k in listed}
        self._view = _View(manifest, rows, new_state, ann, live_files, keys)

    @property
    def _dtype(self) -> str:
        return str(self._manifest.get("dtype", "float32"))

    def add_images(
        self,
        values: Sequence,
        *,
        encoder: Any,
        image_root: str | os.PathLike | None = None,
        keys: Sequence[str] | None = None,
        on_duplicate_key: str = "error",
        on_error: str = "raise",
        verify: str | None = None,
        verify_options: dict[str, Any] | None = None,
        **embed_options: Any,
    ) -> AddResult:
        """Load, embed and add image values, each keyed by
        :func:`~dedup_index.io.keys.image_key` (its path as given, else a hash of its
        content) unless ``keys`` are given.

        Keys already indexed are refused or skipped before anything is embedded
        (``on_duplicate_key``, as in :meth:`add`).  Images embed through the one embedding
        path (:func:`~dedup_index.encode.pipeline.embed_images`; ``embed_options``:
        ``batch_size``, ``num_workers``, ``max_pixels``, ``progress``, ``cache``).  Images
        that fail to load raise :class:`~dedup_index.errors.ImagesFailedError` before
        anything is added (``on_error="raise"``), or are left out and listed in
        ``result.failures`` as ``(key, LoadFailure)`` (``on_error="skip"``).

        **Verification** (``verify="geometric"``; None: the index's own mode, recorded in
        its manifest; see :mod:`dedup_index.verify`): the search's pairs, at the index's
        threshold (for a verifying index, the model's candidate threshold:
        :func:`~dedup_index.encode.models.candidate_threshold`), are candidates; each is
        confirmed by a perceptual hash or by SIFT features and a RANSAC model, and only
        verified pairs are stored and decided on.  So the policy runs on verified pairs
        and any number of adds gives the decisions of one-shot
        ``ImageDeduplicateFilter(verify="geometric")`` on the concatenation.  The new rows
        are verified from ``values``; the indexed rows from their keys, loaded again
        under ``image_root`` (give the same root, or run from the same folder, as the adds
        before).  An indexed image that can no longer be loaded (moved, deleted, or keyed
        by a content hash: the index keeps no pixels) leaves its candidate pairs **not
        verified**: they do not count, the new row is kept unless another pair removes
        it, a warning names the images, and ``result.verification.how`` holds the reason
        (``"load_error: ..."``, ``"not_reloadable: ..."``).  ``result.verification`` has
        every candidate of this add with its evidence.  Hashes and features are cached
        in the index folder (``<index>/verify/``; ``verify_options={"cache_dir": ...}``
        moves it), so indexed images are decoded again only once.  An index holds
        embedding pairs or verified pairs, never both: an empty index takes the mode of
        its first add, one with rows refuses the other mode.  ``verify_options`` go to
        :func:`~dedup_index.verify.verify_pairs` (``num_workers``, ``hash_max_distance``,
        ``options``, ``cache_dir``).  :meth:`query` answers on embeddings only.
        """
        from ..encode.pipeline import embed_images
        from ..errors import ImagesFailedError
        from ..io.keys import image_key

        self._check_writable()
        check_choice(on_error, ("raise", "skip"), "on_error")
        self._verify_mode_for(verify)  # before anything is embedded
        values = list(values)
        if keys is None:
            keys = [image_key(v, len(self) + k) for k, v in enumerate(values)]
        elif len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys for {len(values)} images")
        fresh, skipped = self._new_keys(list(keys), on_duplicate_key)
        embedded = embed_images(
            [values[k] for k in fresh], encoder, image_root=image_root, **embed_options
        )
        failures = [(keys[fresh[p]], f) for p, f in embedded.failures]
        if failures and on_error == "raise":
            shown = "; ".join(f"{k}: {f}" for k, f in failures[:5])
            raise ImagesFailedError(
                f"{len(failures)} of {len(fresh)} images failed to load, nothing added "
                f"({shown}); pass on_error='skip' to add the others"
            )
        options = dict(verify_options or {})
        if "max_pixels" in embed_options:
            options.setdefault("max_pixels", embed_options["max_pixels"])
        result = self.add(
            embedded.embeddings,
            [keys[fresh[p]] for p in embedded.positions],
            verify=verify,
            images=[values[fresh[p]] for p in embedded.positions],
            image_root=image_root,
            verify_options=options,
        )
        return replace(result, skipped=skipped, failures=failures)

    # ------------------------------------------------------------------ helpers
    def _check_writable(self) -> None:
        if self.mode != "a" or self._lock_fd is None:
            raise IndexError_(f"the index at {self.path} is open read-only; open it with mode='a'")

    def _prepare(self, embeddings) -> np.ndarray:
        arr = np.asarray(embeddings)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(
                f"the index holds {self.dim}-dimensional embeddings; got shape {arr.shape}"
            )
        return as_unit_float32(arr)

    def _as_stored(self, embeddings) -> np.ndarray:
        """Rows as this index stores and scores them: unit float32, rounded to float16
        for a float16 index (what ``add`` and a one-pass build write)."""
        q = self._prepare(embeddings)
        if self._dtype == "float16":
            q = q.astype(np.float16).astype(np.float32)  # scored as stored
        return q

    def _new_keys(self, keys: list[str], on_duplicate_key: str) -> tuple[list[int], list[str]]:
        """The one rule for keys already indexed: ``(positions of the keys to add, keys
        skipped)``; a key repeated within ``keys`` is a ``ValueError``, an indexed one an
        :class:`IndexError_` unless ``on_duplicate_key="skip"``."""
        check_choice(on_duplicate_key, ON_DUPLICATE_KEY, "on_duplicate_key")
        if len(set(keys)) != len(keys):
            counts: dict[str, int] = {}
            for k in keys:
                counts[k] = counts.get(k, 0) + 1
            dups = [k for k, c in counts.items() if c > 1]
            raise ValueError(f"keys repeat within this batch, e.g. {dups[:3]}")
        indexed = _view_keys(self.path, self._view).rows_of(keys, stop=len(self)) >= 0
        clash = [k for k, there in zip(keys, indexed.tolist(), strict=True) if there]
        if clash and on_duplicate_key == "error":
            raise IndexError_(
                f"{len(clash)} key(s) are already in the index, e.g. {clash[:3]}; pass "
                "on_duplicate_key='skip' to leave them out"
            )
        return np.flatnonzero(~indexed).tolist(), clash


def _store_keys(source: Any, start: int, stop: int) -> KeyTable | None:
    """The keys of rows ``start..stop-1`` of ``source`` when it is an embedding store
    with keys (read a block at a time, held as Arrow strings), else None."""
    if not isinstance(source, EmbeddingStore):
        return None
    keys, at = KeyTable(), 0
    for chunk in source.iter_keys():
        lo, hi = max(start - at, 0), min(stop - at, len(chunk))
        if lo < hi:
            keys.extend(chunk[lo:hi])
        at += len(chunk)
        if at >= stop:
            break
    return keys if at else None


def _search_device(device, engine) -> tuple[str | None, str | None]:
    """``create``/``open``'s ``device`` by the one device rule
    (:func:`~dedup_index.validation.resolve_device`), and ``engine`` checked."""
    check_choice(engine, (None, "numpy", "torch"), "engine")
    return resolve_device(device, what="searching the index"), engine


def _state(decisions, nearest, earlier, removed) -> dict[str, np.ndarray]:
    """The per-row state of a generation; removed keys: not kept, no group, no duplicate."""
    state = {
        "keep": decisions.keep,
        "duplicate_of": decisions.duplicate_of,
        "duplicate_similarity": decisions.duplicate_similarity,
        "group": decisions.group,
        "nearest": nearest,
        "earlier": earlier,
        "removed": removed,
    }
    if removed.any():
        state["keep"][removed] = False
        state["duplicate_of"][removed] = -1
        state["group"][removed] = -1
        state["duplicate_similarity"][removed] = np.nan
    return state


class _PreparedRows:
    """Rows ``[a, b)`` of ``source`` as ``index.add`` would store them (unit float32,
    rounded to a float16 index's dtype), read a slice at a time: what the one-pass build
    writes, streamed (never a whole segment in float32)."""

    def __init__(self, index: DedupIndex, source: Any, a: int, b: int) -> None:
        self.index, self.source, self.a = index, source, a
        self.shape = (b - a, index.dim)

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, _ = key.indices(self.shape[0])
        return self.index._as_stored(self.source[self.a + lo : self.a + hi])


class _Parts:
    """The stored pair parts as one chunked pair source for the policies."""

    def __init__(self, path: Path, parts: list[str], checksums: dict[str, str]) -> None:
        self.path, self.parts, self.checksums = path, parts, checksums

    def iter_chunks(self, rows: int = 1 << 20):
        for part in self.parts:
            yield from _open_part(self.path, part, self.checksums).iter_chunks(rows)


# ---------------------------------------------------------------------- files
def _lock(path: Path) -> WriterLock:
    """Take the index's writer lock (``.lock``) or raise :class:`IndexLockedError` at once."""
    return WriterLock(
        path / ".lock",
        lambda: IndexLockedError(
            f"the index at {path} is locked by another writer; open it read-only "
            "(mode='r') or wait for that process to finish"
        ),
    ).acquire()


def _unlock(lock: WriterLock | None) -> None:
    if lock is not None:
        lock.release()


def _write_part(path: Path, pairs: PairSet) -> str:
    """A pair part, written as a store pair file; returns its SHA-256 for the manifest."""
    return write_pair_file(path, pairs)


def _write_state(path: Path, state: dict[str, np.ndarray]) -> str:
    import io

    buf = io.BytesIO()
    np.savez(buf, **state)
    return atomic_write_bytes(path, buf.getvalue())


def _verified_bytes(root: Path, name: str, checksums: dict[str, str]) -> bytes:
    path = root / name
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(f"{path} is missing (listed in {root / MANIFEST})") from None
    want = checksums.get(name)
    if want is not None and hashlib.sha256(payload).hexdigest() != want:
        raise IndexCorruptError(f"{path} fails its checksum: the file is corrupted or truncated")
    return payload


def _open_part(root: Path, name: str, checksums: dict[str, str]) -> PairFile:
    """A pair part listed in the manifest, checked against its recorded checksum."""
    try:
        return PairFile(root / name, sha256=checksums.get(name))
    except StoreError as err:
        raise IndexCorruptError(f"{err} (listed in {root / MANIFEST})") from err


def _load_state(root: Path, manifest: dict) -> dict[str, np.ndarray]:
    """The per-row state: the first file listed is a full state, each later one a delta
    (``rows`` changed or added, their new values, the new row ``count``)."""
    import io

    state = {
        "keep": np.zeros(0, bool),
        "duplicate_of": np.zeros(0, np.int64),
        "duplicate_similarity": np.zeros(0),
        "group": np.zeros(0, np.int64),
        "nearest": np.zeros(0),
        "earlier": np.zeros(0),
        "removed": np.zeros(0, bool),
    }
    for k, name in enumerate(manifest["state"]):
        payload = _verified_bytes(root, name, manifest["checksums"])
        try:
            with np.load(io.BytesIO(payload)) as data:
                found = {f: data[f] for f in (*_STATE_FIELDS, "rows", "count") if f in data}
        except (ValueError, OSError) as err:
            raise IndexCorruptError(f"{root / name} is not a readable state file: {err}") from err
        if k == 0:
            found.setdefault("removed", np.zeros(found["keep"].shape[0], bool))
            state = {f: found[f] for f in _STATE_FIELDS}
            continue
        count, rows = int(found["count"]), found["rows"]
        grown = {}
        for f in _STATE_FIELDS:
            arr = np.empty(count, dtype=state[f].dtype)
            arr[: state[f].shape[0]] = state[f]
            arr[rows] = found[f]
            grown[f] = arr
        state = grown
    if any(v.shape[0] != manifest["count"] for v in state.values()):
        last = manifest["state"][-1] if manifest["state"] else MANIFEST
        raise IndexCorruptError(f"{root / last} does not match the row count")
    for part in manifest["pairs"]:  # parts are small to check and wrong answers are worse
        _open_part(root, part, manifest["checksums"])
    return state


def _load_manifest(path: Path) -> dict[str, Any]:
    manifest = read_json(
        path / MANIFEST,
        IndexCorruptError,
        missing=lambda _: IndexError_(f"{path} is not a dedup index (no {MANIFEST})"),
        format=("format", FORMAT),
    )
    if manifest.get("version") not in READS_VERSIONS:
        raise IndexError_(
            f"manifest {path / MANIFEST} has format version {manifest.get('version')!r}; "
            f"this dedup_index reads versions {READS_VERSIONS}"
        )
    if manifest["version"] == 1:  # one store, one FAISS file, one state: as segments
        n = int(manifest["count"])
        store_meta = path / "embeddings" / "manifest.json"
        dtype = "float32"
        if store_meta.exists():
            dtype = read_json(store_meta, IndexCorruptError).get("dtype", "float32")
        ann = manifest.get("ann")
        manifest = dict(
            manifest,
            dtype=dtype,
            rows=[{"store": "embeddings", "count": n}] if n else [],
            ann=[{"file": ann, "start": 0, "stop": n}] if ann else [],
            state=[manifest["state"]] if manifest.get("state") else [],
            retired=[],
        )
    return manifest


def _tree_size(path: Path) -> int:
    """Bytes allocated on disk: store shards are preallocated sparse files, so their
    apparent size (``st_size``) says little about what they use."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _listed(manifest: dict[str, Any]) -> set[str]:
    """Every file (or legacy store folder) the generation of ``manifest`` reads."""
    names = set(manifest["pairs"]) | set(manifest["state"])
    for entry in manifest["rows"]:
        names.update(v for k, v in entry.items() if k in ("file", "keys", "blocks", "store") and v)
    names.update(e["file"] for e in manifest["ann"])
    return names


def _large_files(manifest: dict[str, Any]) -> set[str]:
    """The files of a generation that are checked as they are read or loaded: rows files
    (block by block), version-1 embedding stores and FAISS segments."""
    names = {e.get("file") or e.get("store") for e in manifest["rows"]}
    names.update(e["file"] for e in manifest["ann"])
    return {n for n in names if n}


def _delete(root: Path, names) -> None:
    import shutil

    for name in names:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            os.unlink(target)


def _collect_garbage(root: Path, manifest: dict[str, Any]) -> None:
    """Remove what a writer killed before its commit left behind (files no manifest
    lists); run by each writer as it opens, under the lock."""
    keep = _listed(manifest) | {n for r in manifest.get("retired", []) for n in r["files"]}
    found = []
    for folder in _FOLDERS:
        if (root / folder).is_dir():
            found += [f"{folder}/{p.name}" for p in (root / folder).iterdir() if p.is_file()]
    found += [p.name for p in root.glob("state-*.npz")] + [p.name for p in root.glob(".tmp-*")]
    found += [p.name for p in root.glob("ann-*.faiss")]  # version 1 FAISS files
    orphans = [name for name in found if name not in keep]
    if orphans:
        logger.info("removing %d file(s) an interrupted writer left in %s", len(orphans), root)
        _delete(root, orphans)


def _changed_rows(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> np.ndarray:
    """Rows whose state differs between ``old`` and ``new`` (NaN equal to NaN), and every
    row ``new`` has beyond ``old``."""
    n_old = old["keep"].shape[0]
    n = new["keep"].shape[0]
    changed = np.zeros(n_old, bool)
    for f in _STATE_FIELDS:
        a, b = old[f], new[f][:n_old]
        if a.dtype.kind == "f":
            changed |= ~((a == b) | (np.isnan(a) & np.isnan(b)))
        else:
            changed |= a != b
    return np.concatenate([np.flatnonzero(changed), np.arange(n_old, n)]).astype(np.int64)


def _empty_ann(manifest: dict[str, Any]) -> AnnIndex:
    return AnnIndex(
        manifest["backend"],
        manifest.get("backend_options", {}),
        dtype=str(manifest.get("dtype", "float32")),
    )


def _write_segment(root: Path, name: str, index: Any, checksums: dict[str, str]):
    """Write the FAISS segment ``root/name`` (streamed, atomically), record its SHA-256
    in ``checksums``, and return ``(index, mapped path or None)``: a segment file of
    :data:`~dedup_index.index.ann.MMAP_BYTES` or more is opened again memory-mapped and
    the in-memory one dropped, so an index of millions of rows keeps its lists on disk."""
    checksums[name] = AnnIndex.write_segment(root / name, index)
    if (root / name).stat().st_size >= MMAP_BYTES:
        return AnnIndex.read_segment(root / name)
    return index, None


def _load_segment(root: Path, name: str, checksums: dict[str, str], checked: CheckedFiles):
    """A FAISS segment listed in the manifest, checked against its SHA-256, as
    ``(index, mapped path or None)``: a large one memory-mapped (hashed by streaming
    reads, never held in memory; not again while its stat is the one ``checked``
    remembers), a small one read whole."""
    path = root / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IndexCorruptError(f"{path} is missing (listed in {root / MANIFEST})") from None
    if size < MMAP_BYTES:
        return AnnIndex.segment_from_bytes(_verified_bytes(root, name, checksums)), None
    want = checksums.get(name)
    if want is not None and not checked.matches(name, want):
        raise IndexCorruptError(f"{path} fails its checksum: the file is corrupted or truncated")
    try:
        return AnnIndex.read_segment(path)
    except RuntimeError as err:  # FAISS: not a readable index file
        raise IndexCorruptError(f"{path} is not a readable FAISS segment: {err}") from err


def _rows_entry(rows_name: str, keys_name: str, count: int) -> dict[str, Any]:
    """A manifest ``rows`` entry: the rows file, its keys and its block-checksum file."""
    return {"file": rows_name, "keys": keys_name, "blocks": blocks_name(rows_name), "count": count}


def _open_rows(
    root: Path,
    name: str,
    count: int,
    dim: int,
    checksums: dict[str, str] | None = None,
    blocks: str | None = None,
) -> Any:
    """A rows file listed in the manifest; with ``checksums``, checked as it is read:
    block by block against its block-checksum file ``blocks`` (whole on first read for
    an index written before block files, which lists none)."""
    sums = checksums or {}
    try:
        return open_rows_file(
            root / name,
            count,
            dim,
            sums.get(name),
            blocks=None if blocks is None else root / blocks,
            blocks_sha256=None if blocks is None else sums.get(blocks),
        )
    except StoreError as err:
        raise IndexCorruptError(f"{err} (listed in {root / MANIFEST})") from err


def _load_view(root: Path, manifest: dict[str, Any], reuse: _View | None = None) -> _View:
    """The generation ``manifest`` describes: rows memory-mapped, state and FAISS
    segments loaded and checked (``reuse``: a view whose loaded files may be shared)."""
    old = {} if reuse is None else reuse.files
    dim = int(manifest["dim"])
    files: dict[str, Any] = {}
    parts = []
    for entry in manifest["rows"]:
        if entry.get("store"):  # version 1: rows in an EmbeddingStore
            name = entry["store"]
            part = old.get(name)
            if part is None:
                try:
                    store = EmbeddingStore.open(root / name, mode="r")
                except StoreError as err:
                    raise IndexCorruptError(f"{err} (listed in {root / MANIFEST})") from err
                if len(store) < entry["count"]:
                    raise IndexCorruptError(
                        f"{root / name} holds {len(store)} rows but {root / MANIFEST} says "
                        f"{entry['count']}: the embedding store is damaged"
                    )
                part = RowRange(store, 0, int(entry["count"]))
        else:
            name = entry["file"]
            part = old.get(name)
            if part is None:
                # Checked against its SHA-256 when first read: never an answer from
                # damaged rows (issue 13).
                part = _open_rows(
                    root,
                    name,
                    int(entry["count"]),
                    dim,
                    manifest["checksums"],
                    entry.get("blocks"),
                )
        files[name] = part
        parts.append(part)
    rows = SegmentedRows(parts, dim)
    if len(rows) != int(manifest["count"]):
        raise IndexCorruptError(
            f"{root / MANIFEST} lists {len(rows)} rows in its files but says {manifest['count']}"
        )
    state = _load_state(root, manifest)
    ann = None
    if manifest["backend"] in ANN_BACKENDS and manifest["ann"]:
        segments = []
        checked = CheckedFiles(root)
        for entry in manifest["ann"]:
            loaded = old.get(entry["file"])
            if loaded is None:
                loaded = _load_segment(root, entry["file"], manifest["checksums"], checked)
            index, mapped = loaded
            segments.append(Segment(int(entry["start"]), int(entry["stop"]), index, mapped))
        checked.save()
        ann = AnnIndex(
            manifest["backend"],
            manifest.get("backend_options", {}),
            segments,
            dtype=str(manifest.get("dtype", "float32")),
        )
        for entry, seg in zip(manifest["ann"], ann.segments, strict=True):
            files[entry["file"]] = (seg.index, seg.path)  # segments share one quantizer
    return _View(manifest, rows, state, ann, files)


def _view_keys(root: Path, view: _View) -> KeyTable:
    """The keys of a view's rows, read once from the files its manifest lists (a file at
    a time: never all of them as Python strings)."""
    if view.keys is None:
        keys = KeyTable()
        for entry in view.manifest["rows"]:
            count = int(entry["count"])
            if entry.get("store"):
                stored = _store_keys(view.files[entry["store"]].base, 0, count)
                had = len(keys)  # a store without keys: row numbers
                keys.extend(stored.array() if stored else [str(had + k) for k in range(count)])
                continue
            payload = _verified_bytes(root, entry["keys"], view.manifest["checksums"])
            part = json.loads(payload)
            del payload
            if not isinstance(part, list) or len(part) != count:
                raise IndexCorruptError(f"{root / entry['keys']} does not hold {count} keys")
            keys.extend(part)
        view.keys = keys
    return view.keys
