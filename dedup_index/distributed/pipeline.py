"""``dedup_images``: embed on the cluster, then the distributed exact search, end to end."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..dedup import DedupResult
from ..errors import NoValidImagesError
from ..io import LoadFailure
from ..validation import check_threshold
from .embed import embed_table
from .search import dedup_store

logger = logging.getLogger(__name__)


def dedup_images(
    values: Any,
    *,
    model_name: str,
    threshold: float = 0.9,
    policy: str = "reference",
    score: str = "nearest",
    batch_size: int | None = None,
    column: str = "image",
    image_root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    num_gpus_per_actor: float = 0,
    tile_rows: int | None = None,
    address: str | None = None,
    progress: bool | None = None,
    **embed_options: Any,
) -> tuple[DedupResult, list[tuple[int, LoadFailure]]]:
    """Near-duplicate removal of ``values`` (see :func:`embed_table` for what they may be)
    on a Ray cluster.

    Returns ``(result, failures)``: ``result`` is over the rows whose image loaded, in
    input order (row ``k`` of the result is the ``k``-th valid row; ``result.info["rows"]``
    maps them to input positions, ``result.info["embed"]`` is the
    :class:`~dedup_index.distributed.embed.EmbedSummary`), as the single-machine operator
    decides;
    ``failures`` lists ``(input row, LoadFailure)`` for every other row.

    ``work_dir`` (shared storage on a real cluster) holds the embedding shards and store
    (``work_dir/embed``) and the search tiles (``work_dir/search``); rerunning with the same
    ``work_dir`` resumes both stages.  Default: a temporary directory, removed at the end.
    Other keyword arguments go to :func:`embed_table`.
    """
    threshold = check_threshold(threshold)
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="dedup-ray-")) if temporary else Path(work_dir)
    try:
        summary = embed_table(
            values,
            work / "embed",
            model_name=model_name,
            batch_size=batch_size,
            column=column,
            image_root=image_root,
            num_gpus_per_actor=num_gpus_per_actor,
            address=address,
            progress=progress,
            **embed_options,
        )
        if summary.n_valid == 0:
            reasons = "; ".join(str(f) for _, f in summary.failures[:3])
            raise NoValidImagesError(
                f"none of the {summary.n_rows} images could be loaded (first reasons: "
                f"{reasons or 'no rows'})"
            )
        result = dedup_store(
            summary.store_path,
            threshold,
            policy=policy,
            score=score,
            tile_rows=tile_rows,
            address=address,
            progress=progress,
            work_dir=None if temporary else work / "search",
        )
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    result.info["rows"] = summary.rows
    result.info["embed"] = summary
    if summary.failures:
        logger.warning(
            "%d of %d images failed to load and are not in the result (first: %s)",
            summary.n_failed,
            summary.n_rows,
            summary.failures[0][1],
        )
    return result, summary.failures
