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
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_choice, check_positive_int, check_threshold
from ..dedup import SCORES, DedupResult, dedup_embeddings
from ..errors import DedupIndexError, ImagesFailedError, NoValidImagesError
from ..io import DEFAULT_MAX_PIXELS, LoadFailure, try_load_image
from ..policy import POLICIES
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

    def summary(self) -> str:
        return (
            f"{self.rows_in} rows in: {self.kept} kept, {self.removed_duplicates} removed as "
            f"near-duplicates, {self.failed} failed to load ({self.seconds:.1f} s)"
        )


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
        if encoder is None:
            from ..encode import load_encoder

            logger.info("loading image model %s", model_name)
            encoder = load_encoder(
                model_name, device=device, batch_size=self.batch_size, threads=self.threads
            )
        self.encoder = encoder
        self.device = getattr(encoder, "device", device)
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
        embeddings, valid, failures = self._embed(values)
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

        result = dedup_embeddings(
            embeddings,
            self.threshold,
            self.backend,
            self.score,
            policy=self.policy,
            threads=self.threads,
        )
        valid_pos = np.asarray(valid, dtype=np.int64)
        scores = pd.Series(np.nan, index=range(len(frame)), dtype=np.float64)
        scores.iloc[valid_pos] = result.max_similarity
        keep_pos = valid_pos[result.keep]
        if self.on_error == "keep" and failures:
            keep_pos = np.sort(np.concatenate([keep_pos, [p for p, _ in failures]]))
        out = frame.iloc[keep_pos].reset_index(drop=True)
        out[output_score_key] = scores.iloc[keep_pos].to_numpy()

        rejects = self._rejects(frame, input_image_key, result, valid_pos, failures)
        output_path = storage.write(out)
        rejects_path = self._write_rejects(storage, rejects)
        report = RunReport(
            rows_in=len(frame),
            kept=len(out),
            removed_duplicates=result.n_removed,
            failed=len(failures),
            seconds=time.perf_counter() - start,
            result=result,
            rejects=rejects,
            output_path=output_path,
            rejects_path=rejects_path,
            failures=failures,
        )
        self.last_report = report
        logger.info("ImageDeduplicateFilter: %s", report.summary())
        return [input_image_key, output_score_key]

    def _embed(self, values: list) -> tuple[np.ndarray, list[int], list[tuple[int, LoadFailure]]]:
        """Load and embed in batches so that only one batch of decoded images is in memory."""
        chunks: list[np.ndarray] = []
        valid: list[int] = []
        failures: list[tuple[int, LoadFailure]] = []
        for start in range(0, len(values), self.batch_size):
            images = []
            for pos in range(start, min(len(values), start + self.batch_size)):
                image, failure = try_load_image(
                    values[pos], image_root=self.image_root, max_pixels=self.max_pixels
                )
                if failure is not None:
                    failures.append((pos, failure))
                else:
                    images.append(image)
                    valid.append(pos)
            if images:
                chunks.append(np.asarray(self.encoder.encode(images), dtype=np.float32))
        dim = chunks[0].shape[1] if chunks else 0
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return embeddings, valid, failures

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

    def _rejects(self, frame, key, result: DedupResult, valid_pos, failures) -> pd.DataFrame:
        """One row per input row that left the output, with the reason."""
        removed = result.removed
        dup_rows = pd.DataFrame(
            {
                "row": valid_pos[removed],
                "reject_reason": "duplicate",
                "duplicate_of_row": valid_pos[result.duplicate_of[removed]],
                "similarity": result.duplicate_similarity[removed],
                "error": None,
            }
        )
        dup_rows["duplicate_of"] = [
            _describe(frame[key].iat[p]) for p in dup_rows["duplicate_of_row"]
        ]
        parts = [dup_rows]
        if failures and self.on_error == "drop":
            parts.append(
                pd.DataFrame(
                    {
                        "row": [p for p, _ in failures],
                        "reject_reason": "load_error",
                        "duplicate_of_row": -1,
                        "similarity": np.nan,
                        "error": [str(f) for _, f in failures],
                        "duplicate_of": None,
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

    def _write_rejects(self, storage: Any, rejects: pd.DataFrame) -> str | None:
        path = self.rejects_path
        if path is None and hasattr(storage, "side_file_path"):
            path = storage.side_file_path("rejects", "jsonl")
        if path is None:
            return None
        write_table(rejects, path)
        logger.info("wrote %d rejected rows to %s", len(rejects), path)
        return os.fspath(path)


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
