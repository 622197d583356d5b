"""``dedup-index calibrate LABELS``: choose a threshold from labelled pairs.

LABELS is a table (.csv, .jsonl, .json, .parquet) with columns ``key_i``, ``key_j``
(image paths, relative ones resolved against ``--image-root`` or the table's folder) and
``is_duplicate``; or a folder where each subfolder is one group of duplicates (every pair
within a subfolder is a duplicate, every pair across subfolders is not; images directly in
the folder are groups of one).  The images are embedded with ``--model``; precision,
recall and F1 are printed per threshold for the embedding alone and, unless
``--verify none``, for verified pairs (:mod:`dedup_index.verify`); the lowest threshold
reaching ``--precision-target`` is recommended for each.  ``--report`` writes the table
and the precision/recall curves (inline SVG) as HTML.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .common import UsageError, usage_errors

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  # a folder of groups: photos/cat1/*.jpg are copies of each other, photos/cat2/... too
  dedup-index calibrate photos/ --model efficientnet-lite0 --precision-target 0.99

  # labelled pairs, with an HTML report of the curves
  dedup-index calibrate labels.csv --image-root /data/images --model efficientnet-lite0 \\
      --report calibration.html

exit codes: 0 done, 1 failure, 2 bad arguments or input
"""

COLUMNS = ("key_i", "key_j", "is_duplicate")


def add_parser(sub: Any, parents: list) -> None:
    p = sub.add_parser(
        "calibrate",
        parents=parents,
        help="precision/recall per threshold from labelled pairs or a folder of groups; "
        "recommends a threshold",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("labels", metavar="LABELS", help="a table of labelled pairs or a folder")
    p.add_argument("--model", default="efficientnet-lite0", help="default: %(default)s")
    p.add_argument("--image-root", default=None, help="folder relative keys resolve against")
    p.add_argument(
        "--verify",
        choices=("none", "geometric"),
        default="geometric",
        help="also score verified pairs (default: %(default)s)",
    )
    p.add_argument(
        "--precision-target",
        type=float,
        default=0.99,
        help="recommend the lowest threshold reaching this precision (default: %(default)s)",
    )
    p.add_argument(
        "--thresholds",
        default=None,
        help="comma-separated thresholds (default: 0.30 to 0.99 by 0.01; printed by 0.05)",
    )
    p.add_argument("--report", default=None, help="HTML report: the table and the P/R curves")
    p.add_argument("--device", default=None, help="cpu, cuda... (default: cuda if any)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on the CPU"
    )
    p.add_argument("--workers", type=int, default=None, help="decode/verify processes")
    p.set_defaults(func=command)


def read_labels(labels: str, image_root: str | None):
    """``(values, pairs)``: image paths, and either ``("groups", group id per image)`` or
    ``("pairs", (a, b, is_duplicate) arrays over the values)``."""
    import numpy as np
    import pandas as pd

    from ..io.inputs import list_images

    path = Path(labels)
    if not path.exists():
        raise UsageError(f"LABELS {labels} does not exist")
    if path.is_dir():
        values, group = [], []
        for rel in list_images(path):
            parts = Path(rel).parts
            values.append(str(path / rel))
            group.append(parts[0] if len(parts) > 1 else f"/{rel}")
        if len(values) < 2:
            raise UsageError(f"LABELS {labels}: fewer than two images")
        _, ids = np.unique(np.asarray(group, dtype=object).astype(str), return_inverse=True)
        return values, ("groups", ids)
    suffix = path.suffix.lower()
    readers = {
        ".csv": pd.read_csv,
        ".jsonl": lambda p: pd.read_json(p, lines=True),
        ".json": pd.read_json,
        ".parquet": pd.read_parquet,
    }
    if suffix not in readers:
        raise UsageError(
            f"LABELS {labels}: use a .csv, .jsonl, .json or .parquet table or a folder"
        )
    frame = readers[suffix](path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UsageError(
            f"LABELS {labels} lacks column(s) {missing}; it has {list(map(str, frame.columns))}"
        )
    if frame.empty:
        raise UsageError(f"LABELS {labels} has no rows")
    root = Path(image_root) if image_root else path.parent
    keys = pd.unique(pd.concat([frame["key_i"], frame["key_j"]]).astype(str))
    index = {k: n for n, k in enumerate(keys)}
    values = [str(k if Path(k).is_absolute() else root / k) for k in keys]
    a = frame["key_i"].astype(str).map(index).to_numpy(np.int64)
    b = frame["key_j"].astype(str).map(index).to_numpy(np.int64)
    dup = frame["is_duplicate"].map(_truth).to_numpy(bool)
    return values, ("pairs", (a, b, dup))


def _truth(value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "y", "t"):
            return True
        if text in ("0", "false", "no", "n", "f", ""):
            return False
        raise UsageError(f"is_duplicate must be true/false or 1/0, got {value!r}")
    return bool(value)


def command(args: argparse.Namespace) -> int:
    import numpy as np

    from ..verify.calibration import DEFAULT_THRESHOLDS, pr_svg, recommend, threshold_table

    if not 0.0 < args.precision_target <= 1.0:
        raise UsageError(f"--precision-target must be in (0, 1], got {args.precision_target}")
    thresholds = DEFAULT_THRESHOLDS
    if args.thresholds:
        try:
            thresholds = tuple(sorted(float(x) for x in args.thresholds.split(",") if x.strip()))
        except ValueError:
            raise UsageError(f"--thresholds: not numbers: {args.thresholds!r}") from None
        if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise UsageError("--thresholds must be numbers in [0, 1]")
    values, (kind, labels) = read_labels(args.labels, args.image_root)

    from ..encode import embed_images, load_encoder

    with usage_errors():
        encoder = load_encoder(args.model, device=args.device, batch_size=args.batch_size)
        embedded = embed_images(values, encoder, num_workers=args.workers)
    E = np.asarray(embedded.embeddings, dtype=np.float32)
    valid = np.asarray(embedded.positions, dtype=np.int64)
    row = np.full(len(values), -1, np.int64)
    row[valid] = np.arange(valid.size)
    for pos, failure in embedded.failures:
        logger.warning("left out (cannot load): %s: %s", values[pos], failure)
    low = min(thresholds)
    if kind == "groups":
        from ..dedup import dedup_embeddings

        group = labels[valid]
        found = dedup_embeddings(E, threshold=low).pairs
        a, b, s = np.asarray(found.i), np.asarray(found.j), np.asarray(found.s)
        dup = group[a] == group[b]
        _, sizes = np.unique(group, return_counts=True)
        positives = int((sizes * (sizes - 1) // 2).sum())
    else:
        pa, pb, pdup = labels
        ok = (row[pa] >= 0) & (row[pb] >= 0) & (pa != pb)
        if not ok.all():
            logger.warning("%d labelled pair(s) left out: an image did not load", int((~ok).sum()))
        a, b, dup = (
            np.minimum(row[pa[ok]], row[pb[ok]]),
            np.maximum(row[pa[ok]], row[pb[ok]]),
            pdup[ok],
        )
        s = np.einsum("ij,ij->i", E[a].astype(np.float64), E[b].astype(np.float64))
        positives = int(dup.sum())
    verified = None
    if args.verify != "none":
        from ..search import PairSet
        from ..verify import verify_pairs

        cand = np.flatnonzero(s >= low)
        order = cand[np.lexsort((b[cand], a[cand]))]
        pairs = PairSet(a[order], b[order], s[order])
        with usage_errors():
            v = verify_pairs(pairs, [values[p] for p in valid], num_workers=args.workers)
        verified = np.zeros(s.size, bool)
        verified[order] = v.verified
        print(f"verification: {v.summary()}")
    table = threshold_table(s, dup, thresholds, verified=verified, positives=positives)
    print(
        f"{valid.size} images, {positives} duplicate pairs, model {args.model}; "
        f"precision target {args.precision_target:g}"
    )
    shown = table[np.isclose((table.threshold * 100) % 5, 0) | (table.threshold >= 0.95)]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    lines = []
    for prefix, what in (("", "embedding only"), ("verified_", "with --verify geometric")):
        if f"{prefix}precision" not in table:
            continue
        best = recommend(table, args.precision_target, prefix)
        if best is None:
            lines.append(f"{what}: no threshold reaches precision {args.precision_target:g}")
        else:
            lines.append(
                f"{what}: recommended --threshold {best.threshold:.2f} (precision "
                f"{best[prefix + 'precision']:.3f}, recall {best[prefix + 'recall']:.3f}, "
                f"F1 {best[prefix + 'f1']:.3f})"
            )
    for line in lines:
        print(line)
    if args.report:
        from html import escape

        from ..files import atomic_write_bytes

        html = (
            "<!doctype html><meta charset='utf-8'><title>dedup-index calibration</title>"
            f"<h1>Calibration: {escape(str(args.labels))}</h1><p>{escape(args.model)}, "
            f"{valid.size} images, {positives} duplicate pairs</p>"
            + "".join(f"<p>{escape(line)}</p>" for line in lines)
            + pr_svg(table)
            + table.to_html(index=False, float_format=lambda x: f"{x:.3f}")
        )
        atomic_write_bytes(args.report, html.encode("utf-8"))
        print(f"wrote report: {args.report}")
    return 0


__all__ = ["add_parser", "command", "read_labels"]
