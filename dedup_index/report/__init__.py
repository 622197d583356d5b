"""A self-contained HTML report of one dedup run: open it anywhere, offline.

:func:`write_report` writes one ``.html`` file holding

- the summary counts (rows in, loaded, failed, kept, removed, groups, pairs, settings);
- a histogram of each row's nearest-neighbour similarity (``result.max_similarity``) with
  the threshold marked, as hand-written inline SVG;
- the threshold table (:func:`threshold_table`): rows removed at 0.80 ... 0.99 computed
  from the run's scores and pairs without searching again, each count marked exact, lower
  bound or unavailable according to what the backend and policy allow;
- the duplicate groups (each kept row with the rows removed in its favour, keys, rows and
  similarities), highest similarity first, paginated by a small inline script from an
  embedded JSON blob so that 100k groups still open (one page of DOM at a time; the page is
  addressable as ``report.html#page=N``);
- with ``verify="geometric"`` (``result.info["verification"]``), the candidate pairs
  verification did not confirm and the verified ones, with thumbnails of both images and
  the evidence (:mod:`.verification`);
- the rows that failed to load, with reasons.

No URL, stylesheet, font or script is fetched.  Thumbnails are small JPEG ``data:`` URIs
for the first groups only, up to ``max_thumbnails`` images (default 1000, a few kB each at
``thumb_px=96``): later groups show keys and scores, and the page says where thumbnails
stop.  Importing this package does not import torch, and matplotlib is not used.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import atomic_write_bytes
from .groups import MEMBERS_SHOWN, duplicate_groups, group_payload
from .histogram import histogram_svg
from .page import SCRIPT, STYLE, json_for_script, pager, table
from .thresholds import DEFAULT_THRESHOLDS, threshold_table
from .verification import PAIRS_LISTED, verification_section
from .verification import STYLE as PAIRS_STYLE

if TYPE_CHECKING:  # pragma: no cover
    from ..dedup import DedupResult

__all__ = ["DEFAULT_THRESHOLDS", "FAILURES_LISTED", "threshold_table", "write_report"]

logger = logging.getLogger(__name__)

#: Rows that failed to load listed one by one in the report (all are counted).
FAILURES_LISTED = 500


def _check_range(value: Any, name: str, lo: int, hi: int) -> int:
    """Return ``value`` as an int in ``[lo, hi]`` or raise naming the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _decimals(threshold: float) -> int:
    """4 decimals, or 6 when the threshold itself needs more than 2 (e.g. 0.9999)."""
    return 4 if round(threshold, 2) == threshold else 6


def _fmt_threshold(t: float) -> str:
    """0.80 style for thresholds with at most 2 decimals, else as many as it needs."""
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def _summary_rows(
    result: DedupResult, n_failures: int, n_groups: int, extra: Mapping[str, Any] | None
) -> list[tuple[str, str, str]]:
    approx = "" if result.exact else " (approximate: pairs may be missing)"
    rows = [
        ("rows", "rows in", f"{result.n + n_failures}"),
        ("loaded", "images loaded", f"{result.n}"),
        ("failed", "failed to load", f"{n_failures}"),
        ("kept", "kept", f"{result.n - result.n_removed}"),
        ("removed", "removed as near-duplicates", f"{result.n_removed}"),
        ("groups", "duplicate groups", f"{n_groups}"),
        ("pairs", "pairs at or above the threshold", f"{len(result.pairs)}"),
        ("threshold", "threshold", f"{result.threshold:g}"),
        ("policy", "keep policy", result.policy),
        ("backend", "search backend", result.backend + approx),
        ("score", "max_similarity score", result.score),
        ("seconds", "dedup time", f"{result.seconds:.2f} s"),
    ]
    for k, (name, value) in enumerate((extra or {}).items()):
        rows.append((f"extra-{k}", str(name), str(value)))
    return rows


def _threshold_section(result: DedupResult) -> str:
    ts = sorted(set(DEFAULT_THRESHOLDS) | {float(result.threshold)})
    df = threshold_table(result, ts)
    body = []
    for row in df.itertuples(index=False):
        known = row.status != "unavailable"
        lower = row.status == "lower bound"
        removed = "—" if not known else ("≥ " if lower else "") + f"{int(row.removed)}"
        kept = "—" if not known else ("≤ " if lower else "") + f"{int(row.kept)}"
        pct = "—" if not known else ("≥ " if lower else "") + f"{row.removed_pct:.1f} %"
        label = _fmt_threshold(row.threshold) + (" (this run)" if row.is_run_threshold else "")
        css = "status-" + row.status.split()[0]
        cls = ' class="run"' if row.is_run_threshold else ""
        body.append(
            f'<tr{cls} data-threshold="{row.threshold:g}"><td class="num">{label}</td>'
            f'<td class="num">{escape(removed)}</td><td class="num">{escape(kept)}</td>'
            f'<td class="num">{escape(pct)}</td><td class="{css}">{escape(row.status)}</td>'
            f'<td class="note">{escape(row.note)}</td></tr>'
        )
    if result.policy == "reference" and result.max_earlier_similarity is not None:
        how = (
            "Row j is removed at threshold t iff its best similarity to an earlier row is "
            "at least t; this run kept that score for every row, so each count is "
            + ("exact." if result.exact else "a lower bound (approximate backend).")
        )
    elif result.policy == "reference":
        how = (
            f"Backend {result.backend!r} keeps only the pairs at or above the run's threshold "
            f"{result.threshold:g}: counts at higher thresholds come from those pairs"
            + (" (exact)" if result.exact else " (lower bounds: pairs may be missing)")
            + "; below it only a lower bound is known (re-run with backend='blocked' for "
            "exact counts at every threshold)."
        )
    else:
        how = (
            f"The {result.policy} policy is re-applied to the run's pairs with score >= t; "
            f"pairs below the run's threshold {result.threshold:g} were not collected, so "
            "lower thresholds are "
            + ("lower bounds." if result.policy == "component" else "unavailable.")
        )
    return (
        f'<p class="note">{escape(how)} Counts are over the {result.n} rows that loaded, '
        f"under the {escape(result.policy)} policy.</p>"
        '<table class="thresholds"><thead><tr><th class="num">threshold</th>'
        '<th class="num">removed</th><th class="num">kept</th><th class="num">removed %</th>'
        "<th>status</th><th>note</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>"
    )


def _histogram_note(result: DedupResult) -> str:
    parts = [
        "Each row's highest cosine similarity to any other loaded row; the dashed line is the "
        f"threshold {result.threshold:g}, bars at or above it are red."
    ]
    if result.score == "pairs":
        parts.append(
            "This run used score='pairs' (upstream's value): rows without a pair at the "
            "threshold have 0 here, not their true nearest-neighbour similarity."
        )
    if not result.exact:
        parts.append("Approximate backend: values below the threshold are lower bounds.")
    return " ".join(parts)


def _failures_section(failures: Sequence[tuple[str, ...]]) -> str:
    if not failures:
        return "<p>Every image loaded.</p>"
    counts = Counter(str(f[1]).split(":", 1)[0].strip() or "unknown" for f in failures)
    by_reason = table(
        [[reason, n] for reason, n in counts.most_common()], ["reason", "rows"], cls="kv"
    )
    with_rows = all(len(f) > 2 for f in failures)
    listed = [[f[2], f[0], f[1]] if with_rows else [f[0], f[1]] for f in failures[:FAILURES_LISTED]]
    more = (
        f'<p class="note">The first {FAILURES_LISTED} of {len(failures)} are listed.</p>'
        if len(failures) > FAILURES_LISTED
        else ""
    )
    head = ["row", "key", "reason"] if with_rows else ["key", "reason"]
    return by_reason + "<h3>Rows</h3>" + table(listed, head) + more


def write_report(
    path: str | os.PathLike[str],
    *,
    result: DedupResult,
    keys: Sequence[str],
    values: Sequence | None = None,
    failures: Sequence[tuple[str, str]] = (),
    image_root: str | os.PathLike[str] | None = None,
    title: str = "dedup-index report",
    page_size: int = 50,
    thumb_px: int = 96,
    extra_summary: Mapping[str, Any] | None = None,
    max_thumbnails: int = 1000,
    rows: Sequence[int] | None = None,
) -> Path:
    """Write the HTML report of ``result`` to ``path`` (atomically) and return the path.

    Args:
        path: the ``.html`` file to write; its folder must exist.
        result: the :class:`~dedup_index.dedup.DedupResult` over the rows that loaded.
        keys: one display key per row of ``result`` (``keys[i]`` names row ``i``).
        values: the image value of each row (path, bytes, PIL image, ... anything
            :func:`dedup_index.io.try_load_image` takes), for thumbnails; None: no
            thumbnails.
        failures: ``(key, reason)`` of rows that failed to load (counted and listed).
        image_root: folder relative paths in ``values`` are resolved against.
        title: the page title.
        page_size: groups per page, in [1, 1000].
        thumb_px: longest side of a thumbnail in pixels, in [16, 512].
        extra_summary: more ``name: value`` lines for the summary (model, input file...).
        max_thumbnails: images given thumbnails in all, in [0, 100000]: whole groups in
            display order (kept row + first shown duplicates) until the cap.
        rows: the number to show for each row of ``result``: its input row, the one the
            kept, removed and pairs files use (default: the result's own row numbers).
            ``failures`` may then be ``(key, reason, row)``.
    """
    page_size = _check_range(page_size, "page_size", 1, 1000)
    thumb_px = _check_range(thumb_px, "thumb_px", 16, 512)
    max_thumbnails = _check_range(max_thumbnails, "max_thumbnails", 0, 100_000)
    if len(keys) != result.n:
        raise ValueError(f"keys must hold one key per row of result ({result.n}); got {len(keys)}")
    if values is not None and len(values) != result.n:
        raise ValueError(
            f"values must hold one image value per row of result ({result.n}) or be None; "
            f"got {len(values)}"
        )
    if rows is not None and len(rows) != result.n:
        raise ValueError(f"rows must hold one row number per row of result ({result.n})")
    failures = [tuple(str(x) for x in f) for f in failures]
    path = Path(path)

    groups = duplicate_groups(result)
    payload, n_thumbs, covered = group_payload(
        groups,
        keys,
        values=values,
        image_root=image_root,
        thumb_px=thumb_px,
        max_thumbnails=max_thumbnails,
        decimals=_decimals(result.threshold),
        row_numbers=rows,
    )
    n_missing, first_missing = payload.pop("m")
    pages = max(1, math.ceil(len(groups) / page_size))
    payload.update(
        page_size=page_size,
        members_shown=MEMBERS_SHOWN,
        has_thumbs=values is not None,
        pages=pages,
    )

    summary = "".join(
        f'<tr id="sum-{rid}"><th>{escape(label)}</th><td>{escape(value)}</td></tr>'
        for rid, label, value in _summary_rows(result, len(failures), len(groups), extra_summary)
    )
    if n_missing:
        logger.warning(
            "report: %d of %d images for thumbnails could not be loaded (first: %s); "
            "check image_root",
            n_missing,
            n_missing + n_thumbs,
            first_missing,
        )
    missing_note = (
        f" {n_missing} of the {n_missing + n_thumbs} images meant for thumbnails could not be "
        f"loaded (first: {first_missing}): is the image root right?"
        if n_missing
        else ""
    )
    if values is None:
        thumb_note = "No image values were given, so there are no thumbnails."
    elif n_thumbs == 0 and n_missing:
        thumb_note = "No thumbnails." + missing_note
    elif covered >= len(groups):
        thumb_note = (
            f"Every group shown has thumbnails ({n_thumbs} images, {thumb_px} px)." + missing_note
        )
    else:
        thumb_note = (
            f"Thumbnails ({thumb_px} px) are embedded for the first {covered} of {len(groups)} "
            f"groups only ({n_thumbs} images; the cap is max_thumbnails={max_thumbnails}), "
            "so the file stays small; later groups show keys and scores." + missing_note
        )
    groups_note = (
        f"{len(groups)} groups: each kept row with the rows removed in its favour, sorted by "
        f"the highest similarity in the group; {page_size} groups per page, the first "
        f"{MEMBERS_SHOWN} duplicates of a group shown until 'show all'. "
        "'duplicate of' names the row a duplicate matched when it is not the kept row "
        "(a chain). " + thumb_note
    )
    verification = result.info.get("verification") if result.info else None
    verification_html = ""
    if verification is not None:
        verification_html = (
            '<section id="verification"><h2>Verification</h2>'
            + verification_section(
                verification,
                keys,
                values=values,
                image_root=image_root,
                rows=rows,
                max_thumbnails=min(max_thumbnails, 4 * PAIRS_LISTED),
                decimals=_decimals(result.threshold),
            )
            + "</section>"
        )
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from .. import __version__

    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}{PAIRS_STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="note">{escape(result.summary())}</p>
<section id="summary"><h2>Summary</h2><table class="kv">{summary}</table></section>
<section id="histogram"><h2>Nearest-neighbour similarity</h2>
{histogram_svg(np.minimum(result.max_similarity, 1.0), result.threshold)}
<p class="note">{escape(_histogram_note(result))}</p></section>
<section id="thresholds"><h2>Threshold table</h2>{_threshold_section(result)}</section>
<section id="groups"><h2>Duplicate groups</h2>
<p class="note" id="groups-note">{escape(groups_note)}</p>
{pager(pages)}
<noscript><p>JavaScript is off: the groups are in the report-data JSON of this file.</p></noscript>
<div id="group-list"></div>
{pager(pages)}
</section>
{verification_html}
<section id="failures"><h2>Failed to load ({len(failures)})</h2>
{_failures_section(failures)}</section>
<p class="note">dedup-index {escape(__version__)}, generated {generated}.</p>
<script type="application/json" id="report-data">{json_for_script(payload)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path
