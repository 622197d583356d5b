"""``ImageDeduplicateFilter``: the DataFlow operator, a drop-in for DataFlow-MM's.

Same constructor and ``run`` signature as upstream and the reference ``i < j`` semantics,
composed from the package's stages: io (load) -> encode (CLIP) -> search -> policy.
Unlike upstream it reports every row it drops (a rejects file and a warning), refuses to
write an empty table when no image loads, keeps its model so ``run`` can be called again,
and fills ``max_similarity`` with the true nearest-neighbour similarity (``score="pairs"``
gives upstream's value).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .._validation import check_choice, check_positive_int, check_threshold
from ..dedup import SCORES, DedupResult, dedup_embeddings
from ..encode.cache import ON_MODEL_CHANGE, EmbeddingCache, fingerprint, model_identity
from ..encode.pipeline import iter_embedded_batches
from ..errors import DedupIndexError, ImagesFailedError, NoValidImagesError
from ..io import DEFAULT_MAX_PIXELS, LoadFailure
from ..policy import POLICIES
from ..progress import progress as progress_bar
from ..search import BACKENDS
from .storage import write_table

logger = logging.getLogger(__name__)

ON_ERROR = ("drop", "keep", "raise")
_SHOWN_FAILURES = 5


class MissingColumnError(DedupIndexError, ValueError):
    """The image column is not in the input table."""


@dataclass
class RunReport:
    """What one ``run`` did: counts, the dedup result, the rejects table and files."""

    rows_in: int
    kept: int
    removed_duplicates: int
    failed: int
    seconds: float
    result: DedupResult | None
    rejects: pd.DataFrame
    output_path: Any = None
    rejects_path: str | None = None
    failures: list[tuple[int, LoadFailure]] = field(default_factory=list)
    #: Rows whose image was decoded and run through the encoder in this run.
    embedded: int = 0
    #: Rows whose embedding came from the embedding cache (``cache_dir``), not the encoder.
    cached: int = 0

    def summary(self) -> str:
        text = (
            f"{self.rows_in} rows in: {self.kept} kept, {self.removed_duplicates} removed as "
            f"near-duplicates, {self.failed} failed to load ({self.seconds:.1f} s)"
        )
        if self.cached:
            text += f"; {self.embedded} embedded, {self.cached} from the embedding cache"
        return text


class _Embedded(NamedTuple):
    """What ``_embed`` returns: the valid rows' embeddings in row order, and counts."""

    embeddings: np.ndarray
    valid: list[int]
    failures: list[tuple[int, LoadFailure]]
    embedded: int
    cached: int


class ImageDeduplicateFilter:
    """Remove near-duplicate images from a table, keeping the first of each group.

    Args:
        model_name: CLIP checkpoint, hub id or local directory.
        threshold: cosine similarity in [0, 1]; ``>=`` means near-duplicate.
        batch_size: images per model forward pass.
        device: ``"cuda"`` if available else ``"cpu"`` when left as None (upstream's
            default, resolved without importing torch at module import).

    Keyword-only options (not in upstream):
        image_root: folder that relative image paths are resolved against.
        on_error: rows whose image fails to load: ``"drop"`` (upstream; with a warning and
            a record in the rejects file), ``"keep"`` (kept, score NaN) or ``"raise"``.
        rejects_path: file (.jsonl/.json/.csv/.parquet/.pickle) recording every row that
            left the output and why.  Default with a ``FileStorage``: next to the step
            file, ``{prefix}_step{n}_rejects.jsonl``; with other storages, no file
            (still in ``last_report.rejects``).
        score: ``"nearest"`` (true nearest-neighbour similarity, the documented meaning)
            or ``"pairs"`` (upstream's value: only scores >= threshold, else 0).
        backend, policy, threads: passed to :func:`dedup_index.dedup_embeddings`.
        max_pixels: images larger than this are refused as decompression bombs.
        encoder: an already-built encoder (anything with ``encode(images) -> (N, D)``);
            ``model_name``/``device`` are then not loaded.
        index_path: dedup against a persistent :class:`~dedup_index.index.DedupIndex`
            (created on first use): rows duplicating indexed images, or earlier rows of
            the table, are removed; the table's rows join the index, keyed by path (or a
            content hash).  Rows whose key is already indexed leave as ``already_indexed``.
        cache_dir: directory of a persistent
            :class:`~dedup_index.encode.cache.EmbeddingCache` (created on first use).
            Each image value is fingerprinted (a path with its size and mtime, a hash of
            bytes or pixels); those already cached are neither decoded nor embedded, the
            rest are embedded and added to the cache batch by batch as they are computed,
            so a rerun embeds nothing and an interrupted run resumes where it stopped.
            Cached rows are the encoder's own float32 vectors, so decisions equal those of
            a run without the cache (on the same device; an encoder's last bits may also
            depend on how images were batched, as they do between batch sizes).
        on_model_change: the cache at ``cache_dir`` holds another model's embeddings:
            ``"error"`` (default, raised at construction) or ``"reset"`` (moved aside to
            ``<cache_dir>.stale-<timestamp>`` with a warning; the run starts afresh).
        progress: show an images/s progress bar while embedding: ``None`` (default)
            when stderr is a terminal and ``DEDUP_INDEX_PROGRESS`` is not ``0``.
        num_workers: processes that load, decode and preprocess images while the model
            runs: ``None`` (default) picks ``min(CPUs - 1, 4)``, ``0`` loads in this
            process. Results do not depend on it.
        ray: run embedding and search on a Ray cluster
            (:func:`dedup_index.distributed.dedup_images`): ``True`` joins ``RAY_ADDRESS``
            or starts a local cluster, a string is the cluster's address.  The decisions
            are those of the exact ``blocked`` backend (bit for bit); ``backend`` must be
            ``"auto"`` or ``"blocked"``, and ``cache_dir``/``index_path``/``encoder`` do not
            apply (the actors load ``model_name`` themselves).
        ray_work_dir: shared folder for the Ray run's embedding shards and search tiles;
            rerunning with the same folder resumes both (default: a temporary folder).
    """

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch32",
        threshold: float = 0.90,
        batch_size: int = 32,
        device: str | None = None,
        *,
        image_root: str | os.PathLike | None = None,
        on_error: str = "drop",
        rejects_path: str | os.PathLike | None = None,
        score: str = "nearest",
        backend: str = "auto",
        policy: str = "reference",
        threads: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        encoder: Any = None,
        index_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        on_model_change: str = "error",
        progress: bool | None = None,
        num_workers: int | None = None,
        ray: bool | str = False,
        ray_work_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model_name = model_name
        self.threshold = check_threshold(threshold)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.image_root = image_root
        self.on_error = check_choice(on_error, ON_ERROR, "on_error")
        self.rejects_path = rejects_path
        self.score = check_choice(score, SCORES, "score")
        self.backend = check_choice(backend, BACKENDS, "backend")
        self.policy = check_choice(policy, POLICIES, "policy")
        self.threads = check_positive_int(threads, "threads", allow_none=True)
        self.max_pixels = max_pixels
        self.index_path = index_path
        if not isinstance(ray, (bool, str)) or ray == "":
            raise ValueError(f"ray must be True, False or a Ray address string, got {ray!r}")
        self.ray = ray
        self.ray_work_dir = ray_work_dir
        if ray:
            clash = {
                "backend": backend not in ("auto", "blocked"),
                "index_path": index_path is not None,
                "cache_dir": cache_dir is not None,
                "encoder": encoder is not None,
            }
            bad = [name for name, on in clash.items() if on]
            if bad:
                raise ValueError(
                    f"ray=... runs the exact tile search with actors that load model_name; "
                    f"it does not take {', '.join(bad)} (backend must be 'auto' or 'blocked', "
                    f"got {backend!r}; use ray_work_dir to resume a run)"
                )
        elif ray_work_dir is not None:
            raise ValueError("ray_work_dir is only used with ray=True or a Ray address")
        if encoder is None:
            from ..encode import load_encoder

            logger.info("loading image model %s", model_name)
            encoder = load_encoder(
                model_name, device=device, batch_size=self.batch_size, threads=self.threads
            )
        self.encoder = encoder
        self.device = getattr(encoder, "device", device)
        self.progress = progress
        if num_workers is not None and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise ValueError(f"num_workers must be an int >= 0 or None, got {num_workers!r}")
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.on_model_change = check_choice(on_model_change, ON_MODEL_CHANGE, "on_model_change")
        # The cache is keyed to the model that really embeds: an encoder object's own name.
        self.cache_model_name = model_identity(getattr(encoder, "model_name", None) or model_name)
        if cache_dir is not None and self.on_model_change == "error":
            EmbeddingCache.check_model(
                cache_dir, model_name=self.cache_model_name, dim=_encoder_dim(encoder)
            )
        self.last_report: RunReport | None = None

    def run(
        self,
        storage: Any,
        input_image_key: str = "image",
        output_score_key: str = "max_similarity",
    ) -> list[str]:
        """Read the table, drop near-duplicates, write kept rows; returns the two column names."""
        start = time.perf_counter()
        frame = storage.read("dataframe")
        if isinstance(frame, list):
            frame = pd.DataFrame(frame)
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(
                f"storage.read('dataframe') returned {type(frame).__name__}, not a DataFrame"
            )
        if len(frame) == 0:
            raise NoValidImagesError(
                "the input table has no rows: nothing to deduplicate; nothing written"
            )
        if input_image_key not in frame.columns:
            raise MissingColumnError(
                f"image column {input_image_key!r} not found; the table has columns "
                f"{list(map(str, frame.columns))} (pass input_image_key=...)"
            )
        if output_score_key in frame.columns and output_score_key != input_image_key:
            logger.warning("column %r exists and will be overwritten", output_score_key)

        values = frame[input_image_key].tolist()
        if self.ray:
            embeddings = None
            result, valid, failures, n_embedded, n_cached = self._dedup_on_ray(values)
        else:
            embeddings, valid, failures, n_embedded, n_cached = self._embed(values)
        if failures:
            self._report_failures(failures, len(values))
        if not valid:
            raise NoValidImagesError(
                f"none of the {len(values)} images could be loaded (first reasons: "
                f"{_first_reasons(failures)}); nothing written"
            )
        if failures and self.on_error == "raise":
            raise ImagesFailedError(
                f"{len(failures)} of {len(values)} images failed to load (on_error='raise'): "
                f"{_first_reasons(failures)}; nothing written"
            )

        valid_pos = np.asarray(valid, dtype=np.int64)
        if self.ray:
            outcome = _Outcome.from_result(result, valid_pos, frame[input_image_key])
        elif self.index_path is None:
            result = dedup_embeddings(
                embeddings,
                self.threshold,
                self.backend,
                self.score,
                policy=self.policy,
                threads=self.threads,
                progress=self.progress,
            )
            outcome = _Outcome.from_result(result, valid_pos, frame[input_image_key])
        else:
            result = None
            outcome = self._against_index(embeddings, valid_pos, frame[input_image_key])
        scores = pd.Series(np.nan, index=range(len(frame)), dtype=np.float64)
        scores.iloc[valid_pos] = outcome.max_similarity
        keep_pos = valid_pos[outcome.keep]
        if self.on_error == "keep" and failures:
            keep_pos = np.sort(np.concatenate([keep_pos, [p for p, _ in failures]]))
        out = frame.iloc[keep_pos].reset_index(drop=True)
        out[output_score_key] = scores.iloc[keep_pos].to_numpy()

        rejects = self._rejects(frame, input_image_key, outcome, valid_pos, failures)
        output_path = storage.write(out)
        rejects_path = self._write_rejects(storage, rejects)
        report = RunReport(
            rows_in=len(frame),
            kept=len(out),
            removed_duplicates=int((~outcome.keep).sum()),
            failed=len(failures),
            seconds=time.perf_counter() - start,
            result=result,
            rejects=rejects,
            output_path=output_path,
            rejects_path=rejects_path,
            failures=failures,
            embedded=n_embedded,
            cached=n_cached,
        )
        self.last_report = report
        logger.info("ImageDeduplicateFilter: %s", report.summary())
        return [input_image_key, output_score_key]

    def _dedup_on_ray(self, values: list) -> tuple:
        """Embed and search on Ray; ``(result, valid, failures, embedded, reused)``."""
        from ..distributed import dedup_images

        try:
            result, failures = dedup_images(
                values,
                model_name=self.model_name,
                threshold=self.threshold,
                policy=self.policy,
                score=self.score,
                batch_size=self.batch_size,
                image_root=self.image_root,
                work_dir=self.ray_work_dir,
                address=None if self.ray is True else self.ray,
                progress=self.progress,
                max_pixels=self.max_pixels,
            )
        except NoValidImagesError as exc:
            raise NoValidImagesError(f"{exc}; nothing written") from None
        summary = result.info["embed"]
        valid = [int(r) for r in result.info["rows"]]
        return result, valid, failures, int(summary.embedded), int(summary.reused)

    def _embed(self, values: list) -> _Embedded:
        """Load and embed in batches so that only a few batches of images are in memory.

        Loading, decoding and preprocessing run in ``num_workers`` processes
        (:func:`~dedup_index.encode.pipeline.iter_embedded_batches`) ahead of the model.

        With ``cache_dir``, values already in the cache are taken from it (not decoded),
        and each batch embedded here is committed to the cache before the next one starts.
        """
        n = len(values)
        cache = None
        fingerprints: list[str | None] = []
        found = np.zeros(n, dtype=bool)
        cached_rows = np.zeros((0, 0), dtype=np.float32)
        if self.cache_dir is not None:
            cache = EmbeddingCache(
                self.cache_dir,
                model_name=self.cache_model_name,
                dim=_encoder_dim(self.encoder),
                on_model_change=self.on_model_change,
            )
        try:
            if cache is not None:
                fingerprints = [
                    fingerprint(v, self.image_root, max_pixels=self.max_pixels) for v in values
                ]
                found, cached_rows = cache.lookup(fingerprints, max_pixels=self.max_pixels)
            todo = np.flatnonzero(~found)
            # Row p's embedding goes to out[p]; allocated once the dimension is known.
            out = None if not found.any() else np.empty((n, cached_rows.shape[1]), np.float32)
            if out is not None:
                out[found] = cached_rows
            is_valid = found.copy()
            failures: list[tuple[int, LoadFailure]] = []
            with progress_bar(len(todo), "embedding", unit="img", enabled=self.progress) as bar:
                # Workers load, decode and preprocess the next ranges while the model runs.
                for batch in iter_embedded_batches(
                    [values[p] for p in todo.tolist()],
                    self.encoder,
                    batch_size=self.batch_size,
                    num_workers=self.num_workers,
                    image_root=self.image_root,
                    max_pixels=self.max_pixels,
                    progress=bar.update,
                ):
                    failures.extend((int(todo[k]), f) for k, f in batch.failures)
                    if not batch.positions:
                        continue
                    positions = todo[batch.positions]
                    emb = batch.embeddings
                    if out is None:
                        out = np.empty((n, emb.shape[1]), np.float32)
                    out[positions] = emb
                    is_valid[positions] = True
                    if cache is not None:
                        cache.add(
                            [fingerprints[p] for p in positions.tolist()],
                            emb,
                            pixels=batch.pixels,
                        )
        finally:
            if cache is not None:
                cache.close()
        valid = np.flatnonzero(is_valid)
        n_cached = int(found.sum())
        if out is None:
            embeddings = np.zeros((0, 0), np.float32)
        else:
            embeddings = out if len(valid) == n else out[valid]
        if cache is not None:
            logger.info(
                "embedding cache %s: %d rows from the cache, %d embedded",
                self.cache_dir,
                n_cached,
                len(valid) - n_cached,
            )
        return _Embedded(embeddings, valid.tolist(), failures, len(valid) - n_cached, n_cached)

    def _report_failures(self, failures: list[tuple[int, LoadFailure]], total: int) -> None:
        action = {"drop": "dropped", "keep": "kept with no score", "raise": "raising"}[
            self.on_error
        ]
        logger.warning(
            "%d of %d images failed to load (%s); first: %s",
            len(failures),
            total,
            action,
            _first_reasons(failures),
        )

    def _rejects(self, frame, key, outcome: _Outcome, valid_pos, failures) -> pd.DataFrame:
        """One row per input row that left the output, with the reason."""
        removed = np.flatnonzero(~outcome.keep)
        dup_rows = pd.DataFrame(
            {
                "row": valid_pos[removed],
                "reject_reason": outcome.reason[removed],
                "duplicate_of_row": outcome.dup_row[removed],
                "duplicate_of": outcome.dup_label[removed],
                "similarity": outcome.similarity[removed],
                "error": None,
            }
        )
        parts = [dup_rows]
        if failures and self.on_error == "drop":
            parts.append(
                pd.DataFrame(
                    {
                        "row": [p for p, _ in failures],
                        "reject_reason": "load_error",
                        "duplicate_of_row": -1,
                        "duplicate_of": None,
                        "similarity": np.nan,
                        "error": [str(f) for _, f in failures],
                    }
                )
            )
        table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        table = table.sort_values("row", kind="stable").reset_index(drop=True)
        originals = frame.iloc[table["row"].to_numpy()].reset_index(drop=True)
        originals[key] = [_describe(v) for v in originals[key]]
        originals = originals.drop(columns=[c for c in table.columns if c in originals.columns])
        cols = ["row", "reject_reason", "duplicate_of_row", "duplicate_of", "similarity", "error"]
        return pd.concat([table[cols], originals], axis=1)

    def _against_index(self, embeddings, valid_pos, values) -> _Outcome:
        """Dedup against a persistent index: rows duplicating indexed images (or earlier
        rows of this table) go; all new rows join the index (see DedupIndex)."""
        from ..index import DedupIndex

        path = os.fspath(self.index_path)
        if os.path.exists(os.path.join(path, "manifest.json")):
            index = DedupIndex.open(
                path, mode="a", dim=embeddings.shape[1], model_name=self.model_name
            )
        else:
            index = DedupIndex.create(
                path,
                embeddings.shape[1],
                self.threshold,
                policy=self.policy,
                model_name=self.model_name,
            )
        with index:
            if abs(index.threshold - self.threshold) > 0:
                logger.warning(
                    "the index at %s was built with threshold %g; using it, not %g",
                    path,
                    index.threshold,
                    self.threshold,
                )
            keys = [_index_key(values.iat[p], p) for p in valid_pos]
            indexed = set(index.keys())
            known = np.array([k in indexed for k in keys], dtype=bool)
            fresh = np.flatnonzero(~known)
            added = index.add(embeddings[fresh], keys=[keys[k] for k in fresh])
            if known.any():
                known_sims = index.max_similarity([keys[k] for k in np.flatnonzero(known)])
        n = len(valid_pos)
        out = _Outcome.empty(n)
        out.keep[fresh] = added.kept
        out.max_similarity[fresh] = added.max_similarity
        out.similarity[fresh] = added.similarity
        row_of_key = {k: int(valid_pos[r]) for r, k in enumerate(keys)}
        for r, dup in zip(fresh, added.duplicate_of, strict=True):
            if dup is not None:
                out.dup_label[r] = dup
                out.dup_row[r] = row_of_key.get(dup, -1)
        if known.any():
            where = np.flatnonzero(known)
            out.keep[where] = False
            out.reason[where] = "already_indexed"
            out.dup_label[where] = [keys[k] for k in where]
            out.max_similarity[where] = known_sims
        return out

    def _write_rejects(self, storage: Any, rejects: pd.DataFrame) -> str | None:
        path = self.rejects_path
        if path is None and hasattr(storage, "side_file_path"):
            path = storage.side_file_path("rejects", "jsonl")
        if path is None:
            return None
        write_table(rejects, path)
        logger.info("wrote %d rejected rows to %s", len(rejects), path)
        return os.fspath(path)


@dataclass
class _Outcome:
    """Per valid row: kept?, its score, and for removed rows why and whom it duplicates."""

    keep: np.ndarray
    max_similarity: np.ndarray
    similarity: np.ndarray
    dup_row: np.ndarray
    dup_label: np.ndarray
    reason: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Outcome:
        return cls(
            np.ones(n, bool),
            np.zeros(n),
            np.full(n, np.nan),
            np.full(n, -1, np.int64),
            np.full(n, None, dtype=object),
            np.full(n, "duplicate", dtype=object),
        )

    @classmethod
    def from_result(cls, result: DedupResult, valid_pos: np.ndarray, values) -> _Outcome:
        out = cls.empty(len(valid_pos))
        out.keep[:] = result.keep
        out.max_similarity[:] = result.max_similarity
        out.similarity[:] = result.duplicate_similarity
        removed = result.removed
        out.dup_row[removed] = valid_pos[result.duplicate_of[removed]]
        out.dup_label[removed] = [_describe(values.iat[p]) for p in out.dup_row[removed]]
        return out


def _encoder_dim(encoder: Any) -> int | None:
    """The encoder's embedding dimension if it says (``dim``), else None (learnt later)."""
    try:
        dim = getattr(encoder, "dim", None)
    except Exception:  # noqa: BLE001 - a property that cannot answer yet
        return None
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _index_key(value: Any, row: int) -> str:
    """The index key of an image value: its path, else a hash of its content."""
    import hashlib

    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict) and value.get("path") and not value.get("bytes"):
        return str(value["path"])
    if isinstance(value, dict) and value.get("bytes"):
        value = value["bytes"]
    if isinstance(value, bytes | bytearray | memoryview):
        return "sha1:" + hashlib.sha1(bytes(value)).hexdigest()
    if isinstance(value, np.ndarray):
        return "sha1:" + hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
    if hasattr(value, "tobytes"):
        return "sha1:" + hashlib.sha1(value.tobytes()).hexdigest()
    return f"row:{row}"


def _first_reasons(failures: list[tuple[int, LoadFailure]]) -> str:
    shown = "; ".join(f"row {pos}: {f}" for pos, f in failures[:_SHOWN_FAILURES])
    more = len(failures) - _SHOWN_FAILURES
    return shown + (f"; ... and {more} more" if more > 0 else "")


def _describe(value: Any) -> Any:
    """A JSON-friendly stand-in for an image value (paths stay, bytes are summarised)."""
    if isinstance(value, (str, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    size = getattr(value, "size", None)
    return f"<{type(value).__name__} {size}>" if size is not None else f"<{type(value).__name__}>"
