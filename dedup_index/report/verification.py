"""The report's verification section: what verification confirmed and what it removed.

With ``verify="geometric"`` the embedding search gives candidate pairs and only the verified
ones count (:mod:`dedup_index.verify`).  A user who sees fewer duplicates than before needs
to see why, so the report lists the candidates verification did **not** confirm (rejected by
geometry, or not verifiable: an image that would not load again, too small, featureless),
the most alike by embedding first, and the verified pairs, the least alike first; each with
thumbnails of both images, the embedding similarity, the hash distance, the RANSAC inliers
and matches, and the reason in words.  Each list is capped (:data:`PAIRS_LISTED`) with a
count of the rest; the full evidence is in ``pairs.candidates.parquet``
(``dedup-index run --verify geometric --pairs pairs.parquet``).

Static HTML: every key and reason is escaped here; thumbnails are ``data:`` URIs made once
per image (:func:`~dedup_index.report.groups.thumbnail`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from html import escape
from typing import Any

import numpy as np

from ..validation import available_cpus
from .groups import thumbnail

__all__ = ["PAIRS_LISTED", "verification_section"]

#: Pairs listed in each of the two tables (rejected, verified); the rest are counted.
PAIRS_LISTED = 100
#: Longest side of the thumbnails of this section, in pixels (two per pair).
PAIR_THUMB_PX = 64

STYLE = """
table.pairs td{vertical-align:top;font-size:12px}table.pairs td.num{text-align:right}
table.pairs img{display:block;max-width:64px;max-height:64px}
table.pairs .nothumb{width:64px;height:40px;background:#eee;color:#888;font-size:10px}
table.pairs td.key{max-width:180px;overflow-wrap:anywhere}
"""


def _thumbs(rows: list[int], values: Sequence | None, image_root: Any, cap: int) -> dict | None:
    """``row -> base64 JPEG`` for the first ``cap`` distinct rows (one load each); None
    without image values."""
    if values is None:
        return None
    if cap <= 0:
        return {}
    wanted = list(dict.fromkeys(rows))[:cap]
    workers = min(8, available_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        made = pool.map(
            lambda r: thumbnail(values[r], image_root=image_root, px=PAIR_THUMB_PX)[0], wanted
        )
        return {r: data for r, data in zip(wanted, made, strict=True) if data is not None}


def _cell(row: int, keys: Sequence[str], numbers: Sequence[int] | None, thumbs) -> str:
    data = None if thumbs is None else thumbs.get(row)
    if data is not None:
        img = f'<img src="data:image/jpeg;base64,{data}" alt="">'
    else:
        img = "" if thumbs is None else '<div class="nothumb">no thumbnail</div>'

    shown = row if numbers is None else int(numbers[row])
    return f'<td class="key">{img}{escape(str(keys[row]))}<br>row {shown}</td>'


def _pair_table(
    picked: np.ndarray,
    verification: Any,
    reasons: list[str],
    keys: Sequence[str],
    numbers: Sequence[int] | None,
    thumbs: dict | None,
    decimals: int,
) -> str:
    c = verification.candidates
    head = (
        "<thead><tr><th>image i</th><th>image j</th><th>embedding similarity</th>"
        "<th>hash distance</th><th>inliers</th><th>matches</th><th>how</th><th>reason</th>"
        "</tr></thead>"
    )
    body = []
    for k in picked.tolist():
        i, j = int(c.i[k]), int(c.j[k])
        d, n, m = (
            int(verification.hash_distance[k]),
            int(verification.inliers[k]),
            int(verification.matches[k]),
        )
        how = str(verification.how[k]).split(":", 1)[0]
        body.append(
            "<tr>"
            + _cell(i, keys, numbers, thumbs)
            + _cell(j, keys, numbers, thumbs)
            + f'<td class="num sim">{min(float(c.s[k]), 1.0):.{decimals}f}</td>'
            + f'<td class="num">{d if d >= 0 else "—"}</td>'
            + f'<td class="num">{n if n >= 0 else "—"}</td>'
            + f'<td class="num">{m if m >= 0 else "—"}</td>'
            + f"<td>{escape(how)}</td><td>{escape(reasons[k])}</td></tr>"
        )
    return f'<table class="pairs">{head}<tbody>{"".join(body)}</tbody></table>'


def verification_section(
    verification: Any,
    keys: Sequence[str],
    *,
    values: Sequence | None = None,
    image_root: str | os.PathLike | None = None,
    rows: Sequence[int] | None = None,
    listed: int = PAIRS_LISTED,
    max_thumbnails: int = 4 * PAIRS_LISTED,
    decimals: int = 4,
) -> str:
    """The HTML of the verification section for a :class:`~dedup_index.verify.Verification`
    over the rows ``keys`` name (``rows``: the input row shown for each; ``values``: the
    image values for thumbnails, at most ``max_thumbnails`` images)."""
    c = verification.candidates
    verified = np.asarray(verification.verified, bool)
    sim = np.asarray(c.s, np.float64)
    order = np.lexsort((np.asarray(c.j), np.asarray(c.i), -sim))  # most alike first
    not_ok = order[~verified[order]]
    ok = order[verified[order]][::-1]  # least alike first
    shown = [not_ok[:listed], ok[:listed]]
    thumb_rows = [int(r) for k in np.concatenate(shown).tolist() for r in (c.i[k], c.j[k])]
    thumbs = _thumbs(thumb_rows, values, image_root, max_thumbnails)
    reasons = verification.reasons()
    counts = verification.counts
    rejected, unverifiable = counts.get("rejected", 0), counts.get("unverifiable", 0)
    parts = [
        f'<p class="note">{escape(verification.summary())}. Only verified pairs count: '
        "the policy ran on them alone. Embedding similarity is the cosine of the two "
        "embeddings; hash distance the bits of 256 that differ between the perceptual "
        "hashes (mirror-aware); inliers the local-feature matches (of the matches after the "
        "ratio test) consistent with one RANSAC affine model.</p>"
    ]
    for title, picked, total, note in (
        (
            "Candidates verification did not confirm",
            shown[0],
            not_ok.size,
            f"{rejected} rejected by geometry, {unverifiable} not verifiable (an image "
            "that would not load again, too small, or without features); the most alike "
            "by embedding first: these pairs were removed from the decisions.",
        ),
        (
            "Verified pairs",
            shown[1],
            ok.size,
            "the least alike by embedding first.",
        ),
    ):
        rest = total - picked.size
        more = f" The first {picked.size} are listed; {rest} more are not." if rest else ""
        parts.append(f"<h3>{escape(title)} ({total})</h3>")
        parts.append(f'<p class="note">{escape(note + more)}</p>')
        if picked.size:
            parts.append(_pair_table(picked, verification, reasons, keys, rows, thumbs, decimals))
    return "".join(parts)
