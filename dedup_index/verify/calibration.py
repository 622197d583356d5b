"""Thresholds from labels: precision, recall and F1 per threshold, and a recommendation.

Given labelled pairs (their embedding similarity, whether they are duplicates, and
optionally whether verification confirmed them), :func:`threshold_table` gives the counts
at each threshold for the embedding alone (``similarity >= t``) and verified
(``similarity >= t`` and verified); :func:`recommend` picks the lowest threshold whose
precision reaches a target (the highest recall at that precision); :func:`pr_svg` draws
both curves as an inline SVG.  ``dedup-index calibrate`` is the command line of this.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

#: Thresholds tried by default: 0.30 to 0.99.
DEFAULT_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.30, 0.995, 0.01))


def _counts(
    pred: np.ndarray, dup: np.ndarray, positives: int
) -> tuple[int, int, float, float, float]:
    tp = int((pred & dup).sum())
    predicted = int(pred.sum())
    precision = tp / predicted if predicted else float("nan")
    recall = tp / positives if positives else float("nan")
    f1 = 2 * tp / (predicted + positives) if predicted + positives else float("nan")
    return predicted, tp, precision, recall, f1


def threshold_table(
    similarity: np.ndarray,
    is_duplicate: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    verified: np.ndarray | None = None,
    positives: int | None = None,
):
    """One row per threshold: ``threshold, predicted, tp, precision, recall, f1`` of the
    embedding alone, and the same prefixed ``verified_`` when ``verified`` is given.

    ``positives`` is the number of duplicate pairs in all (default: those among the scored
    pairs; more when pairs below the search threshold were not scored).
    """
    import pandas as pd

    s = np.asarray(similarity, dtype=np.float64)
    dup = np.asarray(is_duplicate, dtype=bool)
    if s.shape != dup.shape:
        raise ValueError("similarity and is_duplicate must have the same length")
    total = int(dup.sum()) if positives is None else int(positives)
    rows = []
    for t in thresholds:
        hit = s >= t
        row = dict(
            zip(
                ("predicted", "tp", "precision", "recall", "f1"),
                _counts(hit, dup, total),
                strict=True,
            )
        )
        row["threshold"] = float(t)
        if verified is not None:
            v = _counts(hit & np.asarray(verified, dtype=bool), dup, total)
            row.update(
                {
                    f"verified_{k}": x
                    for k, x in zip(
                        ("predicted", "tp", "precision", "recall", "f1"), v, strict=True
                    )
                }
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame[["threshold", *[c for c in frame.columns if c != "threshold"]]]


def recommend(table, target: float, prefix: str = ""):
    """The row of the lowest threshold whose ``{prefix}precision`` reaches ``target`` (and
    predicts something), or None."""
    ok = (table[f"{prefix}precision"] >= target) & (table[f"{prefix}predicted"] > 0)
    if not ok.any():
        return None
    return table[ok].sort_values("threshold").iloc[0]


def pr_svg(table, width: int = 560, height: int = 300) -> str:
    """Precision and recall against the threshold (solid: embedding only; dashed:
    verified, when the table has it), as an inline SVG."""
    pad = 40
    t = table["threshold"].to_numpy(dtype=float)
    lo, hi = float(t.min()), float(t.max())
    span = hi - lo or 1.0

    def xy(ts, vs):
        pts = [
            f"{pad + (x - lo) / span * (width - 2 * pad):.1f},"
            f"{height - pad - y * (height - 2 * pad):.1f}"
            for x, y in zip(ts, vs, strict=True)
            if np.isfinite(y)
        ]
        return " ".join(pts)

    lines = []
    series = [("precision", "#1f77b4", ""), ("recall", "#d62728", "")]
    if "verified_precision" in table:
        series += [("verified_precision", "#1f77b4", "6,4"), ("verified_recall", "#d62728", "6,4")]
    for col, colour, dash in series:
        lines.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-dasharray="{dash}" points="{xy(t, table[col].to_numpy(float))}">'
            f"<title>{escape(col)}</title></polyline>"
        )
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#444"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>'
        f'<text x="{pad}" y="{height - 10}" font-size="12">{lo:.2f}</text>'
        f'<text x="{width - pad - 24}" y="{height - 10}" font-size="12">{hi:.2f}</text>'
        f'<text x="{width / 2 - 30}" y="{height - 10}" font-size="12">threshold</text>'
        f'<text x="4" y="{pad + 4}" font-size="12">1.0</text>'
        f'<text x="4" y="{height - pad}" font-size="12">0.0</text>'
    )
    legend = (
        f'<text x="{width - pad - 250}" y="{pad - 12}" font-size="12">'
        "blue: precision, red: recall; dashed: verified</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">{axes}{legend}{"".join(lines)}</svg>'
    )


__all__ = ["DEFAULT_THRESHOLDS", "pr_svg", "recommend", "threshold_table"]
