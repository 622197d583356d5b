"""A histogram of per-row similarity as hand-written inline SVG (no matplotlib, no network).

The report must be one self-contained file that opens anywhere, so the plot is plain SVG
markup inside the HTML: bars, both axes with ticks and labels, and the run's threshold as a
vertical line.  Every bar carries a ``<title>`` (a hover tooltip with its range and count).
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

__all__ = ["histogram_svg"]

_X_STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def _nice_step(span: float, target: int) -> float:
    """A 1/2/5 x 10^k step that cuts ``span`` into about ``target`` intervals."""
    raw = span / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= raw:
            return factor * power
    return 10.0 * power  # pragma: no cover


def _x_range(values: np.ndarray, threshold: float) -> tuple[float, float]:
    """From a multiple of 0.05 at or below both the smallest value and the threshold
    (0.95 at most, so the axis never collapses), to 1."""
    low = min(float(values.min()) if values.size else threshold, threshold)
    low = max(0.0, min(low, 0.95))
    return round(math.floor(low / 0.05 + 1e-9) * 0.05, 6), 1.0


def _fmt(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def histogram_svg(
    values: np.ndarray,
    threshold: float,
    *,
    bins: int = 50,
    width: int = 760,
    height: int = 280,
    x_label: str = "nearest-neighbour cosine similarity",
    y_label: str = "rows",
) -> str:
    """SVG markup of a histogram of ``values`` over ``[lo, 1]`` with ``threshold`` marked.

    ``lo`` is a round number at or below the smallest value and the threshold, so the
    whole distribution and the threshold line are always in view.  Non-finite values are
    left out (their count is in the element's ``data-nonfinite`` attribute).  Values above
    1 (float rounding of identical vectors) fall in the last bin.
    """
    raw = np.asarray(values, dtype=np.float64).ravel()
    finite = raw[np.isfinite(raw)]
    lo, hi = _x_range(finite, threshold)
    counts, edges = np.histogram(np.clip(finite, lo, hi), bins=bins, range=(lo, hi))
    top = int(counts.max()) if counts.size else 0

    left, right, upper, lower = 64, 16, 28, 48
    pw, ph = width - left - right, height - upper - lower
    y_step = max(1, int(_nice_step(max(top, 1), 5)))
    y_max = max(y_step, math.ceil(max(top, 1) / y_step) * y_step)

    def sx(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    def sy(c: float) -> float:
        return upper + ph - c / y_max * ph

    out = [
        f'<svg class="histogram" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-bins="{bins}" data-total="{finite.size}" '
        f'data-nonfinite="{raw.size - finite.size}" '
        f'aria-label="histogram of {escape(x_label)} with the threshold {threshold:g} marked">',
        f'<rect x="{left}" y="{upper}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    # y grid, ticks and labels
    for c in range(0, y_max + 1, y_step):
        y = sy(c)
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
        )
        out.append(f'<line x1="{left - 5}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" stroke="#333"/>')
        out.append(
            f'<text class="ytick" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{c}</text>'
        )
    # bars
    for k, c in enumerate(counts):
        if c == 0:
            continue
        x0, x1 = sx(edges[k]), sx(edges[k + 1])
        y = sy(c)
        tip = f"{edges[k]:.4f} to {edges[k + 1]:.4f}: {int(c)} row{'s' if c != 1 else ''}"
        above = edges[k] >= threshold
        out.append(
            f'<rect class="bar" x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
            f'height="{upper + ph - y:.1f}" fill="{"#d9534f" if above else "#4a7ebb"}">'
            f"<title>{tip}</title></rect>"
        )
    # x axis ticks and labels
    x_step = next((s for s in _X_STEPS if (hi - lo) / s <= 10), 0.2)
    ticks = np.arange(math.ceil(lo / x_step - 1e-9), math.floor(hi / x_step + 1e-9) + 1) * x_step
    for v in ticks:
        x = sx(float(v))
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{upper + ph}" y2="{upper + ph + 5}" '
            'stroke="#333"/>'
        )
        out.append(
            f'<text class="xtick" x="{x:.1f}" y="{upper + ph + 18}" text-anchor="middle">'
            f"{_fmt(float(v), x_step)}</text>"
        )
    out.append(
        f'<line x1="{left}" x2="{left + pw}" y1="{upper + ph}" y2="{upper + ph}" stroke="#333"/>'
    )
    out.append(f'<line x1="{left}" x2="{left}" y1="{upper}" y2="{upper + ph}" stroke="#333"/>')
    out.append(
        f'<text class="xlabel" x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    out.append(
        f'<text class="ylabel" transform="translate(16 {upper + ph / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    # the threshold
    tx = sx(min(max(threshold, lo), hi))
    anchor = "end" if tx > left + pw * 0.75 else "start"
    dx = -4 if anchor == "end" else 4
    out.append(
        f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{upper - 6}" '
        f'y2="{upper + ph}" stroke="#c00" stroke-width="2" stroke-dasharray="6 3"/>'
    )
    out.append(
        f'<text class="threshold-label" x="{tx + dx:.1f}" y="{upper - 10}" '
        f'text-anchor="{anchor}" fill="#c00">threshold {threshold:g}</text>'
    )
    out.append("</svg>")
    return "\n".join(out)
