"""``DedupIndex``: incremental add-and-query with exactly the one-shot decisions.

One directory holds everything:

- ``embeddings/``: an :class:`~dedup_index.store.EmbeddingStore` (float32 unit rows and
  their keys), read tile by tile, never re-embedded;
- ``pairs/part-NNNNNN.parquet``: the pairs each ``add`` found, one immutable part per add;
- ``state-NNNNNN.npz``: per-row decisions and scores of one generation;
- ``manifest.json``: format version, dimension, threshold, policy, model name, the row
  count, the parts and state of the current generation with their SHA-256 checksums.
  It is written last (temp file, fsync, rename): a process killed at any point leaves the
  previous generation readable, and the next writer rolls back whatever the dead one
  appended.  A corrupted or truncated file is refused with an error naming it.

With ``backend="ivf"``/``"hnsw"`` new rows go through a FAISS index instead (see
:mod:`.ann`): pairs found are exact, some may be missed, and an old row's nearest score
is only raised through candidates found (a lower bound).  With the exact backends:

Adding rows ``Q`` to ``N`` indexed rows searches ``Q`` against the store exactly
(:func:`~dedup_index.search.cross.cross_search`) and ``Q`` against itself (``blocked``),
so every pair involving a new row is found, every new row's nearest and best-earlier
score is exact, and old rows' nearest scores are raised where a new row is nearer.  The
decisions are then recomputed by the policy over all stored pairs (O(N + pairs), no
embeddings touched), so any number of batches, with closes and reopens in between, gives
what one-shot :func:`~dedup_index.dedup_embeddings` of the concatenation gives.  Under the
``reference`` policy removed rows stay in the index: later rows are compared with them too.

Writers take an exclusive lock on ``.lock`` (a second writer gets :class:`IndexLockedError`
at once); readers (``DedupIndex.open(path)``, mode ``"r"``) take none and see the last
committed generation.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DedupIndexError
from ..files import WriterLock, atomic_write_bytes, crash_point, read_json, write_json_atomic
from ..policy import POLICIES, decide
from ..search import INDEX_BACKENDS, as_unit_float32
from ..search.blocked import blocked_search
from ..search.cross import cross_search
from ..search.flat import flat_cross_search
from ..search.pairs import PairSet, concat_pairsets
from ..store import EmbeddingStore, PairFile, StoreError, write_pair_file
from ..validation import check_choice, check_threshold
from .ann import ANN_BACKENDS, AnnIndex, Concat

FORMAT = "dedup-index"
VERSION = 1
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
logger = logging.getLogger(__name__)

ON_DUPLICATE_KEY = ("error", "skip")
#: From this many rows in one ``add``, an approximate index finds the batch's own pairs
#: with the ``partitioned`` backend (GEMM tiles within clusters) instead of one FAISS
#: range query per row: a 1M-row batch takes minutes instead of hours.
ANN_BULK_ROWS = 20_000


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

    @property
    def n_removed(self) -> int:
        return int((~self.kept).sum())


class DedupIndex:
    """A directory of embeddings, pairs and decisions that grows by ``add``."""

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str, lock_fd: WriterLock | None):
        self.path = path
        self.mode = mode
        self._manifest = manifest
        self._lock_fd = lock_fd
        self.store = EmbeddingStore.open(path / "embeddings", mode="a" if mode == "a" else "r")
        n = int(manifest["count"])
        if len(self.store) < n:
            raise IndexCorruptError(
                f"{path / 'embeddings'} holds {len(self.store)} rows but {path / MANIFEST} "
                f"says {n}: the embedding store is damaged"
            )
        if len(self.store) > n:  # a writer died after appending: roll back
            if mode == "a":
                self.store.truncate(n)
        self._state = _load_state(path, manifest)
        self._ann: AnnIndex | None = None
        if manifest.get("ann"):
            payload = _verified_bytes(path, manifest["ann"], manifest["checksums"])
            self._ann = AnnIndex.from_bytes(
                payload, manifest["backend"], manifest.get("backend_options", {})
            )
        self._keys: list[str] | None = None
        self._key_rows: dict[str, int] | None = None

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
    ) -> DedupIndex:
        """A new, empty index at ``path`` (which must not hold one), open for writing.

        ``backend``: ``"blocked"`` (numpy GEMM tiles) or ``"flat"`` (FAISS
        ``IndexFlatIP`` tiles), exact: every new row against every stored row, the same
        decisions bit for bit; or ``"ivf"`` / ``"hnsw"`` (a FAISS index; approximate,
        for very large indexes: see :mod:`dedup_index.index.ann`), with
        ``backend_options`` (``nlist``, ``nprobe``, ``m``, ``ef_search``...)."""
        path = Path(path)
        threshold = check_threshold(threshold)
        check_choice(policy, POLICIES, "policy")
        check_choice(backend, INDEX_BACKENDS, "backend")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if (path / MANIFEST).exists():
            raise IndexError_(f"{path} already holds a dedup index; use DedupIndex.open")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        try:
            (path / "pairs").mkdir(exist_ok=True)
            meta = {"model_name": model_name}
            EmbeddingStore.create(path / "embeddings", dim, dtype=dtype, meta=meta, exist_ok=True)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "dim": dim,
                "threshold": threshold,
                "policy": policy,
                "backend": backend,
                "model_name": model_name,
                "count": 0,
                "generation": 0,
                "backend_options": dict(backend_options or {}),
                "ann": None,
                "pairs": [],
                "state": None,
                "checksums": {},
            }
            write_json_atomic(path / MANIFEST, manifest)
            return cls(path, manifest, "a", lock_fd)
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
    ) -> DedupIndex:
        """Open an index (``mode="a"`` to add, with an exclusive lock).  ``dim`` and
        ``model_name``, when given, must match what the index was built with."""
        path = Path(path)
        check_choice(mode, ("r", "a"), "mode")
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
            return cls(path, manifest, mode, lock_fd)
        except BaseException:
            _unlock(lock_fd)
            raise

    def close(self) -> None:
        self.store.close()
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

    def __len__(self) -> int:
        return int(self._manifest["count"])

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = (self.store.keys() or [])[: len(self)]
        return self._keys

    def _rows_of(self, keys: Sequence[str]) -> np.ndarray:
        if self._key_rows is None:
            self._key_rows = {}
            for r, k in enumerate(self.keys()):
                self._key_rows.setdefault(k, r)
        missing = [k for k in keys if k not in self._key_rows]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in the index, e.g. {missing[:3]}")
        return np.array([self._key_rows[k] for k in keys], dtype=np.int64)

    def max_similarity(self, keys: Sequence[str]) -> np.ndarray:
        """Nearest-neighbour similarity of indexed ``keys`` (floored at 0)."""
        return self._state["nearest"][self._rows_of(keys)].copy()

    def decisions(self) -> dict[str, np.ndarray]:
        """Per-row arrays: keep, duplicate_of, duplicate_similarity, group, nearest, earlier."""
        return {k: v.copy() for k, v in self._state.items()}

    def pairs(self) -> PairSet:
        """Every pair ``i < j`` at or above the threshold, sorted."""
        sums = self._manifest["checksums"]
        parts = self._manifest["pairs"]
        return concat_pairsets(_open_part(self.path, p, sums).to_pairset() for p in parts)

    def stats(self) -> dict[str, Any]:
        keep = self._state["keep"]
        return {
            "rows": len(self),
            "kept": int(keep.sum()),
            "removed": int((~keep).sum()),
            "pairs": int(self._manifest.get("n_pairs", 0)),
            "dim": self.dim,
            "threshold": self.threshold,
            "policy": self.policy,
            "backend": self._manifest["backend"],
            "exact": self.exact,
            "model_name": self.model_name,
            "generation": int(self._manifest["generation"]),
            "bytes_on_disk": _tree_size(self.path),
        }

    def query(self, embeddings) -> list[list[tuple[str, float]]]:
        """For each query row, the indexed rows at or above the threshold as ``(key,
        similarity)``, most similar first.  Read-only."""
        q = self._prepare(embeddings)
        removed = self._state["removed"]
        live = ~removed if removed.any() else None
        if self._ann is not None:
            found = self._ann.search(
                q, _Prefix(self.store, len(self)), self.threshold, live, nearest=False
            )
        else:
            found = self._cross_search(
                q, _Prefix(self.store, len(self)), self.threshold, base_live=live, base_best=False
            )
        keys = self.keys()
        out: list[list[tuple[str, float]]] = [[] for _ in range(q.shape[0])]
        for qi, bi, s in sorted(zip(found.q, found.b, found.s, strict=True), key=lambda t: -t[2]):
            out[int(qi)].append((keys[int(bi)] if keys else str(int(bi)), float(s)))
        return out

    # ------------------------------------------------------------------ writing
    def add(
        self,
        embeddings,
        keys: Sequence[str] | None = None,
        *,
        on_duplicate_key: str = "error",
    ) -> AddResult:
        """Add rows; decisions equal one-shot dedup of everything added so far."""
        self._check_writable()
        q = self._prepare(embeddings)
        n_old = len(self)
        keys = [str(n_old + k) for k in range(q.shape[0])] if keys is None else list(keys)
        if len(keys) != q.shape[0]:
            raise ValueError(f"got {len(keys)} keys for {q.shape[0]} rows")
        fresh, skipped = self._new_keys(keys, on_duplicate_key)
        if skipped:
            keys, q = [keys[k] for k in fresh], q[fresh]
        m = q.shape[0]
        if m == 0:
            return AddResult([], np.zeros(0, bool), [], np.zeros(0), np.zeros(0), skipped)
        removed = self._state["removed"]
        live = None if not removed.any() else ~removed
        if self._manifest["backend"] in ANN_BACKENDS:
            new_pairs, nearest, earlier = self._ann_step(q, n_old, removed)
        else:
            new_pairs, nearest, earlier = self._exact_step(q, n_old, live)
        # Commit order: rows, pair part, state, manifest (the commit point).
        self.store.truncate(n_old)
        self.store.append(q, keys=keys, normalize=False)
        crash_point("rows_appended")
        generation = int(self._manifest["generation"]) + 1
        part = f"pairs/part-{generation:06d}.parquet"
        checksums = dict(self._manifest["checksums"])
        checksums[part] = _write_part(self.path / part, new_pairs)
        crash_point("pairs_written")
        parts = [*self._manifest["pairs"], part]
        n = n_old + m
        decisions = decide(n, _Parts(self.path, parts, checksums), self.policy)
        new_state = _state(
            decisions, nearest, earlier, np.concatenate([removed, np.zeros(m, bool)])
        )
        ann_payload = self._ann.to_bytes() if self._ann is not None else None
        self._commit(generation, parts, checksums, new_state, n, len(new_pairs), ann_payload)
        rows = np.arange(n_old, n)
        all_keys = self.keys()
        dup = new_state["duplicate_of"][rows]
        return AddResult(
            keys=keys,
            kept=new_state["keep"][rows].copy(),
            duplicate_of=[all_keys[int(d)] if d >= 0 else None for d in dup],
            similarity=new_state["duplicate_similarity"][rows].copy(),
            max_similarity=nearest[rows].copy(),
            skipped=skipped,
        )

    def remove(self, keys: Sequence[str]) -> int:
        """Take ``keys`` out: afterwards the index answers exactly as if they had never
        been added (one-shot dedup of the remaining rows, in their order).

        Under the ``reference`` policy this can bring rows back: a row removed only as a
        duplicate of a removed key becomes kept (it no longer has an earlier duplicate).
        Rows stay in the embedding store as tombstones; the scores are recomputed from the
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
        pairs, near, early = blocked_search(self.store[live], self.threshold)
        mapped = PairSet(live[pairs.i], live[pairs.j], pairs.s)
        decisions = decide(n, mapped, self.policy)
        nearest = np.full(n, np.nan)
        earlier = np.full(n, np.nan)
        nearest[live], earlier[live] = near, early
        new_state = _state(decisions, nearest, earlier, removed)
        generation = int(self._manifest["generation"]) + 1
        part = f"pairs/part-{generation:06d}.parquet"
        checksums = {
            k: v for k, v in self._manifest["checksums"].items() if not k.startswith("pairs/")
        }
        checksums[part] = _write_part(self.path / part, mapped)
        self._manifest = dict(self._manifest, n_pairs=0)
        self._commit(generation, [part], checksums, new_state, n, len(mapped))
        return len(rows)

    def _exact_step(self, q: np.ndarray, n_old: int, live: np.ndarray | None):
        """New rows against the committed ones (:meth:`_cross_search`) and among
        themselves (``blocked``: it gives the best-earlier scores too)."""
        state = self._state
        cross = self._cross_search(q, _Prefix(self.store, n_old), self.threshold, base_live=live)
        within, near_in, earlier_in = blocked_search(q, self.threshold)
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
        return flat_cross_search if self._manifest["backend"] == "flat" else cross_search

    def _ann_step(self, q: np.ndarray, n_old: int, removed: np.ndarray):
        """New rows join the FAISS index, then search it (old and new rows at once)."""
        m = q.shape[0]
        if m >= ANN_BULK_ROWS:
            return self._ann_bulk_step(q, n_old, removed)
        options = self._manifest.get("backend_options", {})
        if self._ann is None:
            self._ann = AnnIndex.build(self._manifest["backend"], q, options)
        else:
            self._ann.add(q)
        live = np.concatenate([~removed, np.ones(m, bool)])
        base = Concat(_Prefix(self.store, n_old), n_old, q)
        found = self._ann.search(q, base, self.threshold, live, self_offset=n_old)
        rows = found.q + n_old  # a found pair is (row, partner), either order
        lo, hi = np.minimum(rows, found.b), np.maximum(rows, found.b)
        new_pairs = concat_pairsets([PairSet(lo, hi, found.s)])
        nearest = np.concatenate([self._state["nearest"], np.zeros(m)])
        nearest = np.maximum(nearest, np.maximum(found.base_best, 0.0))
        nearest[n_old:] = np.maximum(nearest[n_old:], np.maximum(found.query_best, 0.0))
        # Best earlier partner among the candidates found (a lower bound).
        earlier = np.concatenate([self._state["earlier"], np.full(m, -np.inf)])
        cand_q, cand_b, cand_s = found.all_candidates
        before = cand_b < cand_q + n_old
        np.maximum.at(earlier, cand_q[before] + n_old, cand_s[before])
        return new_pairs, nearest, earlier

    def _ann_bulk_step(self, q: np.ndarray, n_old: int, removed: np.ndarray):
        """A large batch: its own pairs by ``partitioned`` search, its pairs with the old
        rows through the FAISS index (before the new rows join it).  Old rows are read
        only through the index and for rescoring the candidates it returns."""
        from ..search.partitioned import default_params, partitioned_search

        m = q.shape[0]
        inner, near_new, earlier_new, info = partitioned_search(
            q, self.threshold, params=default_params(m)
        )
        logger.info("bulk add of %d rows: in-batch pairs by partitioned (%s)", m, info.summary(m))
        nearest = np.concatenate([self._state["nearest"], near_new])
        earlier = np.concatenate([self._state["earlier"], earlier_new])
        parts = [PairSet(inner.i + n_old, inner.j + n_old, inner.s)]
        if n_old and self._ann is not None:
            found = self._ann.search(q, _Prefix(self.store, n_old), self.threshold, ~removed)
            parts.append(PairSet(found.b, found.q + n_old, found.s))  # old row < new row
            nearest[:n_old] = np.maximum(nearest[:n_old], np.maximum(found.base_best, 0.0))
            nearest[n_old:] = np.maximum(nearest[n_old:], np.maximum(found.query_best, 0.0))
            cand_q, _, cand_s = found.all_candidates  # every old row is an earlier row
            np.maximum.at(earlier, cand_q + n_old, cand_s)
        if self._ann is None:
            options = self._manifest.get("backend_options", {})
            self._ann = AnnIndex.build(self._manifest["backend"], q, options)
        else:
            self._ann.add(q)
        return concat_pairsets(parts), nearest, earlier

    def _commit(
        self, generation, parts, checksums, new_state, n, n_new_pairs, ann_payload=None
    ) -> None:
        """Write the state, then the manifest (the commit point); drop superseded files."""
        old_ann = self._manifest.get("ann")
        ann_name = old_ann
        if ann_payload is not None:
            ann_name = f"ann-{generation:06d}.faiss"
            checksums[ann_name] = atomic_write_bytes(self.path / ann_name, ann_payload)
            if old_ann:
                checksums.pop(old_ann, None)
        state_name = f"state-{generation:06d}.npz"
        checksums[state_name] = _write_state(self.path / state_name, new_state)
        old_state = self._manifest["state"]
        if old_state:
            checksums.pop(old_state, None)
        crash_point("state_written")
        manifest = dict(
            self._manifest,
            count=n,
            generation=generation,
            pairs=parts,
            state=state_name,
            checksums=checksums,
            n_pairs=int(self._manifest.get("n_pairs", 0)) + n_new_pairs,
            ann=ann_name,
        )
        write_json_atomic(self.path / MANIFEST, manifest)
        crash_point("manifest_written")
        stale = [old_state, *(p for p in self._manifest["pairs"] if p not in parts)]
        if old_ann != ann_name:
            stale.append(old_ann)
        for name in stale:
            if name and (self.path / name).exists():
                os.unlink(self.path / name)
        self._manifest, self._state = manifest, new_state
        self._keys = None
        self._key_rows = None

    def add_images(
        self,
        values: Sequence,
        *,
        encoder: Any,
        image_root: str | os.PathLike | None = None,
        keys: Sequence[str] | None = None,
        on_duplicate_key: str = "error",
        on_error: str = "raise",
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
        """
        from ..encode.pipeline import embed_images
        from ..errors import ImagesFailedError
        from ..io.keys import image_key

        self._check_writable()
        check_choice(on_error, ("raise", "skip"), "on_error")
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
        result = self.add(embedded.embeddings, [keys[fresh[p]] for p in embedded.positions])
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
        existing = set(self.keys())
        clash = [k for k in keys if k in existing]
        if clash and on_duplicate_key == "error":
            raise IndexError_(
                f"{len(clash)} key(s) are already in the index, e.g. {clash[:3]}; pass "
                "on_duplicate_key='skip' to leave them out"
            )
        return [p for p, k in enumerate(keys) if k not in existing], clash


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


class _Prefix:
    """The first ``n`` rows of a store, indexable like an array (committed rows only)."""

    def __init__(self, store: EmbeddingStore, n: int) -> None:
        self.store, self.n = store, n
        self.shape = (n, store.dim)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, _ = key.indices(self.n)
            return self.store[a:b]
        return self.store[key]


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
    import io

    if manifest["state"] is None:
        return {
            "keep": np.zeros(0, bool),
            "duplicate_of": np.zeros(0, np.int64),
            "duplicate_similarity": np.zeros(0),
            "group": np.zeros(0, np.int64),
            "nearest": np.zeros(0),
            "earlier": np.zeros(0),
            "removed": np.zeros(0, bool),
        }
    payload = _verified_bytes(root, manifest["state"], manifest["checksums"])
    with np.load(io.BytesIO(payload)) as data:
        state = {k: data[k] for k in _STATE_FIELDS if k in data}
    state.setdefault("removed", np.zeros(manifest["count"], bool))
    if any(v.shape[0] != manifest["count"] for v in state.values()):
        raise IndexCorruptError(f"{root / manifest['state']} does not match the row count")
    for part in manifest["pairs"]:  # parts are small to check and wrong answers are worse
        _open_part(root, part, manifest["checksums"])
    return state


def _load_manifest(path: Path) -> dict[str, Any]:
    return read_json(
        path / MANIFEST,
        IndexCorruptError,
        missing=lambda _: IndexError_(f"{path} is not a dedup index (no {MANIFEST})"),
        format=("format", FORMAT),
        version=("version", VERSION),
        version_error=IndexError_,
    )


def _tree_size(path: Path) -> int:
    """Bytes allocated on disk: store shards are preallocated sparse files, so their
    apparent size (``st_size``) says little about what they use."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())
