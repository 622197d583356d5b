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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..dedup import SCORES, DedupResult, dedup_embeddings
from ..encode.cache import ON_MODEL_CHANGE, EmbeddingCache, encoder_identity, model_identity
from ..encode.models import recommended_threshold
from ..encode.pipeline import EmbeddedImages, embed_images
from ..errors import DedupIndexError, ImagesFailedError, NoValidImagesError
from ..io import DEFAULT_MAX_PIXELS, LoadFailure, try_load_image
from ..io.keys import content_key, image_key
from ..io.tables import shown_similarity, write_table
from ..policy import POLICIES
from ..search import check_backend, check_precision, get_backend
from ..validation import (
    check_choice,
    check_non_negative_int,
    check_positive_int,
    check_threshold,
)
from ..verify import candidate_threshold, check_verify, verify_result

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
    #: The threshold used, and where it came from ("given", or why the model's default).
    threshold: float | None = None
    threshold_source: str = "given"

    def threshold_note(self) -> str:
        """``"threshold 0.75 (recommended for efficientnet-lite0)"`` when no threshold was
        given; empty when the caller chose it."""
        if self.threshold is None or self.threshold_source == "given":
            return ""
        short = self.threshold_source.split(":")[0].split(";")[0]
        return f"threshold {self.threshold:g} ({short})"

    def summary(self) -> str:
        text = (
            f"{self.rows_in} rows in: {self.kept} kept, {self.removed_duplicates} removed as "
            f"near-duplicates, {self.failed} failed to load ({self.seconds:.1f} s)"
        )
        if self.cached:
            text += f"; {self.embedded} embedded, {self.cached} from the embedding cache"
        if self.threshold_note():
            text += f"; {self.threshold_note()}"
        return text


class ImageDeduplicateFilter:
    """Remove near-duplicate images from a table, keeping the first of each group.

    Args:
        model_name: CLIP checkpoint, hub id or local directory.
        threshold: cosine similarity in [0, 1]; ``>=`` means near-duplicate.  None (the
            default): the model's recommended threshold
            (:func:`dedup_index.encode.models.recommended_threshold`: 0.75 for
            efficientnet-lite0; upstream's 0.90 for CLIP ViT-B/32 and any model without a
            measured one); ``threshold_source`` says which.
        batch_size: images per model forward pass; None (the default): 256 on CUDA, 32 on
            the CPU (:func:`dedup_index.encode.runtime.default_batch_size`).
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
        ray_gpus_per_actor: GPUs per Ray encoder actor (``num_gpus_per_actor`` of
            :func:`~dedup_index.distributed.embed_table`); None: one per actor when the
            cluster has GPUs and ``device`` is not ``"cpu"``. With ``ray``, ``device``
            is each actor's device (its own GPU by default) and the driver loads no model.
        verify: ``"none"`` (default: decisions on embedding similarity alone) or
            ``"geometric"``: the search's pairs are candidates, each confirmed by a
            perceptual hash or by SIFT features and a RANSAC model
            (:mod:`dedup_index.verify`); the policy runs on verified pairs only.  With
            ``threshold=None`` the search then runs at the model's candidate threshold
            (recall-oriented; 0.4 for efficientnet-lite0); a given threshold overrides it.
            ``result.info["verification"]`` holds every candidate with its evidence.
            With ``index_path`` the index is a verifying one (created so, or refused if
            it was built without verification; see
            :meth:`~dedup_index.index.DedupIndex.add_images`): indexed images are loaded
            again from their keys under ``image_root`` to verify new rows against them.
    """

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch32",
        threshold: float | None = None,
        batch_size: int | None = None,
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
        ray_gpus_per_actor: float | None = None,
        verify: str = "none",
        precision: str = "auto",
    ) -> None:
        self.threshold = None if threshold is None else check_threshold(threshold)
        self.batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
        self.image_root = image_root
        self.on_error = check_choice(on_error, ON_ERROR, "on_error")
        self.rejects_path = rejects_path
        self.score = check_choice(score, SCORES, "score")
        self.backend = check_backend(backend)
        self.policy = check_choice(policy, POLICIES, "policy")
        self.verify = check_verify(verify)
        self.precision = check_precision(precision)
        self.threads = check_positive_int(threads, "threads", allow_none=True)
        try_load_image(None, max_pixels=max_pixels)  # validates max_pixels
        self.max_pixels = max_pixels
        if num_workers is not None:
            check_non_negative_int(num_workers, "num_workers")
        self.num_workers = num_workers
        self.on_model_change = check_choice(on_model_change, ON_MODEL_CHANGE, "on_model_change")
        self.progress = progress
        self.index_path = index_path
        self.cache_dir = cache_dir
        self.ray, self.ray_work_dir = _check_ray(
            ray, ray_work_dir, backend, index_path=index_path, cache_dir=cache_dir, encoder=encoder
        )
        if self.ray:
            self.backend = "ray"
        self.ray_gpus_per_actor, self._ray_device = None, None
        if self.ray:
            from ..distributed.embed import check_actor_device, check_gpus_per_actor

            self.ray_gpus_per_actor = check_gpus_per_actor(ray_gpus_per_actor)
            self._ray_device = check_actor_device(device, self.ray_gpus_per_actor)
        if encoder is None and self.ray:
            pass  # the actors load the model on their own devices; the driver loads none
        elif encoder is None:
            from ..encode import load_encoder

            logger.info("loading image model %s", model_name)
            encoder = load_encoder(
                model_name, device=device, batch_size=self.batch_size, threads=self.threads
            )
        self.encoder = encoder
        self.device = getattr(encoder, "device", device)
        # The model that really embeds, by one name for the cache, the index and Ray:
        # an encoder object's own name, a local checkpoint as its real path.
        self.model_name = model_identity(getattr(encoder, "model_name", None) or model_name)
        self.threshold_source = "given"
        if self.threshold is None:
            self.threshold, self.threshold_source = recommended_threshold(self.model_name)
            if self.verify != "none":  # candidates for verification: the model's own cut
                self.threshold, self.threshold_source = candidate_threshold(
                    self.model_name, self.threshold
                )
        # The cache also keys on the arithmetic (device, precision): see encoder_identity.
        self.cache_identity = encoder_identity(self.model_name, encoder)
        if cache_dir is not None and self.on_model_change == "error":
            EmbeddingCache.check_model(
                cache_dir, model_name=self.cache_identity, dim=_encoder_dim(encoder)
            )
        self._ray_tmp: tempfile.TemporaryDirectory | None = None
        self.last_report: RunReport | None = None

    def run(
        self,
        storage: Any,
        input_image_key: str = "image",
        output_score_key: str = "max_similarity",
    ) -> list[str]:
        """Read the table, drop near-duplicates, write kept rows; returns the two column names."""
        start = time.perf_counter()
        frame = _read_frame(storage, input_image_key, output_score_key)
        values = frame[input_image_key].tolist()
        embedded = self._embed(values)
        failures = embedded.failures
        if failures:
            self._report_failures(failures, len(values))
        if not embedded.positions:
            raise NoValidImagesError(
                f"none of the {len(values)} images could be loaded (first reasons: "
                f"{_first_reasons(failures)}); nothing written"
            )
        if failures and self.on_error == "raise":
            raise ImagesFailedError(
                f"{len(failures)} of {len(values)} images failed to load (on_error='raise'): "
                f"{_first_reasons(failures)}; nothing written"
            )
        valid_pos = np.asarray(embedded.positions, dtype=np.int64)
        result, outcome = self._decide(embedded.embeddings, valid_pos, values)

        scores = pd.Series(np.nan, index=range(len(frame)), dtype=np.float64)
        scores.iloc[valid_pos] = outcome.max_similarity
        keep_pos = valid_pos[outcome.keep]
        if self.on_error == "keep" and failures:
            keep_pos = np.sort(np.concatenate([keep_pos, [p for p, _ in failures]]))
        out = frame.iloc[keep_pos].reset_index(drop=True)
        out[output_score_key] = shown_similarity(scores.iloc[keep_pos].to_numpy())

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
            embedded=embedded.embedded,
            cached=embedded.cached,
            threshold=self.threshold,
            threshold_source=self.threshold_source,
        )
        self.last_report = report
        logger.info("ImageDeduplicateFilter: %s", report.summary())
        return [input_image_key, output_score_key]

    # ------------------------------------------------------------------ the two steps
    def _embed(self, values: list) -> EmbeddedImages:
        """The embedding step: every value through the one embedding path, locally (with
        the embedding cache when ``cache_dir`` is set) or by Ray encoder actors."""
        if self.ray:
            return self._embed_on_ray(values)
        options = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "image_root": self.image_root,
            "max_pixels": self.max_pixels,
            "progress": self.progress,
        }
        if self.cache_dir is None:
            return embed_images(values, self.encoder, **options)
        with EmbeddingCache(
            self.cache_dir,
            model_name=self.cache_identity,
            dim=_encoder_dim(self.encoder),
            on_model_change=self.on_model_change,
        ) as cache:
            return embed_images(values, self.encoder, cache=cache, **options)

    def _embed_on_ray(self, values: list) -> EmbeddedImages:
        """Ray Data encoder actors write an embedding store under the work folder; the
        store stands in for the array (the tile search reads it from there)."""
        from ..distributed import embed_table
        from ..store import EmbeddingStore

        summary = embed_table(
            values,
            self._ray_folder() / "embed",
            model_name=self.model_name,
            batch_size=self.batch_size,
            image_root=self.image_root,
            num_gpus_per_actor=self.ray_gpus_per_actor,
            device=self._ray_device,
            address=None if self.ray is True else self.ray,
            progress=self.progress,
            max_pixels=self.max_pixels,
        )
        if summary.n_valid:
            embeddings = EmbeddingStore.open(summary.store_path)
        else:
            embeddings = np.zeros((0, 0), np.float32)
        return EmbeddedImages(
            embeddings,
            summary.rows.tolist(),
            summary.failures,
            embedded=summary.embedded,
            cached=summary.reused,
        )

    def _ray_folder(self) -> Path:
        """``ray_work_dir``, or a temporary folder kept for the run (removed with this
        operator, or at exit)."""
        if self.ray_work_dir is not None:
            return Path(self.ray_work_dir)
        if self._ray_tmp is None:
            self._ray_tmp = tempfile.TemporaryDirectory(prefix="dedup-ray-")
        return Path(self._ray_tmp.name)

    def _decide(self, embeddings: Any, valid_pos: np.ndarray, values: list):
        """The deciding step: one-shot search (any backend, Ray included) or the
        persistent index.  Returns ``(DedupResult or None, outcome per valid row)``."""
        if self.index_path is not None:
            return None, self._against_index(embeddings, valid_pos, values)
        options = None
        if self.backend == "ray":
            options = {
                "address": None if self.ray in (True, False) else self.ray,
                "work_dir": None if self.ray_work_dir is None else self._ray_folder() / "search",
            }
        result = dedup_embeddings(
            embeddings,
            self.threshold,
            self.backend,
            self.score,
            policy=self.policy,
            threads=self.threads,
            device=None if self.device is None else str(self.device),
            backend_options=options,
            progress=self.progress,
            precision=self.precision,
        )
        if self.verify != "none":  # the candidates confirmed by hash or geometry, decided again
            result = verify_result(
                result,
                [values[p] for p in valid_pos],
                image_root=self.image_root,
                max_pixels=self.max_pixels,
                num_workers=self.num_workers,
                cache_dir=self.cache_dir,
            )
        return result, _Outcome.from_result(result, valid_pos, values)

    def _against_index(self, embeddings, valid_pos, values) -> _Outcome:
        """Dedup against a persistent index: rows duplicating indexed images (or earlier
        rows of this table) go; new rows join the index; rows whose key is indexed
        already leave as ``already_indexed`` (``DedupIndex.add`` skips them)."""
        from ..index import DedupIndex

        path = os.fspath(self.index_path)
        dim = embeddings.shape[1]
        device = None if self.device is None else str(self.device)  # the search's too
        if os.path.exists(os.path.join(path, "manifest.json")):
            index = DedupIndex.open(
                path, mode="a", dim=dim, model_name=self.model_name, device=device
            )
        else:
            index = DedupIndex.create(
                path,
                dim,
                self.threshold,
                policy=self.policy,
                model_name=self.model_name,
                precision=self.precision,
                verify=self.verify,
                device=device,
            )
        keys = [image_key(values[p], int(p)) for p in valid_pos]
        with index:
            if index.threshold != self.threshold:
                logger.warning(
                    "the index at %s was built with threshold %g; using it, not %g",
                    path,
                    index.threshold,
                    self.threshold,
                )
            added = index.add(
                embeddings,
                keys=keys,
                on_duplicate_key="skip",
                verify=self.verify,
                images=[values[p] for p in valid_pos],
                image_root=self.image_root,
                verify_options={"max_pixels": self.max_pixels, "num_workers": self.num_workers},
            )
            known_sims = index.max_similarity(added.skipped)
        out = _Outcome.empty(len(valid_pos))
        row_of_key = {k: r for r, k in enumerate(keys)}
        fresh = np.array([row_of_key[k] for k in added.keys], dtype=np.int64)
        out.keep[fresh] = added.kept
        out.max_similarity[fresh] = added.max_similarity
        out.similarity[fresh] = added.similarity
        for r, dup in zip(fresh, added.duplicate_of, strict=True):
            if dup is not None:
                out.dup_label[r] = dup
                out.dup_row[r] = valid_pos[row_of_key[dup]] if dup in row_of_key else -1
        known = np.array([row_of_key[k] for k in added.skipped], dtype=np.int64)
        out.keep[known] = False
        out.reason[known] = "already_indexed"
        out.dup_label[known] = added.skipped
        out.max_similarity[known] = known_sims
        return out

    # ------------------------------------------------------------------ reporting
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
                "similarity": shown_similarity(outcome.similarity[removed]),
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
        # Each path's file size and mtime now, so `dedup-index apply` (io.moves) can refuse
        # files changed since the run; Int64: nanoseconds do not survive a float64.
        from ..io.moves import STAMP_COLUMNS, file_stamps

        for name, column in zip(
            STAMP_COLUMNS, file_stamps(originals[key], self.image_root), strict=True
        ):
            table[name] = pd.array(column, dtype="Int64")
        originals[key] = [_describe(v) for v in originals[key]]
        # The user's columns stay, verbatim; one named like ours is kept as "input:<name>".
        originals = originals.rename(
            columns={c: f"input:{c}" for c in originals.columns if c in table.columns}
        )
        cols = ["row", "reject_reason", "duplicate_of_row", "duplicate_of", "similarity", "error"]
        return pd.concat([table[cols + list(STAMP_COLUMNS)], originals], axis=1)

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
        out.dup_label[removed] = [image_key(values[p], int(p)) for p in out.dup_row[removed]]
        return out


def _encoder_dim(encoder: Any) -> int | None:
    """The encoder's embedding dimension if it says (``dim``), else None (learnt later)."""
    try:
        dim = getattr(encoder, "dim", None)
    except Exception:  # noqa: BLE001 - a property that cannot answer yet
        return None
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _read_frame(storage: Any, image_column: str, score_column: str) -> pd.DataFrame:
    """The storage's table, checked: a DataFrame with rows and the image column."""
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
    if image_column not in frame.columns:
        raise MissingColumnError(
            f"image column {image_column!r} not found; the table has columns "
            f"{list(map(str, frame.columns))} (pass input_image_key=...)"
        )
    if score_column in frame.columns and score_column != image_column:
        logger.warning("column %r exists and will be overwritten", score_column)
    return frame


def _check_ray(ray: Any, work_dir: Any, backend: str, **others: Any) -> tuple[bool | str, Any]:
    """``ray`` and ``ray_work_dir`` checked against the options Ray does not take."""
    if not isinstance(ray, (bool, str)) or ray == "":
        raise ValueError(f"ray must be True, False or a Ray address string, got {ray!r}")
    if not ray:
        if work_dir is not None:
            raise ValueError("ray_work_dir is only used with ray=True or a Ray address")
        return False, None
    bad = [name for name, value in others.items() if value is not None]
    allowed = get_backend("ray").replaces
    if backend not in (*allowed, "ray"):
        bad.insert(0, "backend")
    if bad:
        raise ValueError(
            f"ray=... runs the exact tile search with actors that load model_name; "
            f"it does not take {', '.join(bad)} (backend must be "
            f"{' or '.join(map(repr, allowed))}, got {backend!r}; use ray_work_dir to "
            "resume a run)"
        )
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError("ray=... needs Ray: pip install 'dedup-index[ray]'")
    return ray, work_dir


def _first_reasons(failures: list[tuple[int, LoadFailure]]) -> str:
    shown = "; ".join(f"row {pos}: {f}" for pos, f in failures[:_SHOWN_FAILURES])
    more = len(failures) - _SHOWN_FAILURES
    return shown + (f"; ... and {more} more" if more > 0 else "")


def _describe(value: Any) -> Any:
    """An image value as the rejects table keeps it: JSON-friendly and lossless where it can
    be (paths as given, bytes as ``base64:...``, lists and dicts as JSON); in-memory images
    and arrays by their content key (``pil:``/``array:`` + SHA-256)."""
    import base64
    import json

    if isinstance(value, (str, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "base64:" + base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict) and value.get("path") and value.get("bytes") is None:
        return str(value["path"])  # a datasets dict naming a file: its path, as given
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, default=_describe, ensure_ascii=False)
        except (TypeError, ValueError):
            return repr(value)
    key = content_key(value)
    return key if key is not None else repr(value)
