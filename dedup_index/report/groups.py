"""Duplicate groups for the report: who was removed in favour of whom, as compact JSON.

A group is a kept row (``result.group``'s representative) and the removed rows mapped to
it.  Groups are sorted by their highest similarity (then by the kept row), members within
a group by similarity (then by row).  The page renders one page of groups at a time from
this data, so 100k groups cost one JSON blob, not 100k DOM nodes.

Thumbnails (small JPEG data URIs) are embedded for the first groups only, up to
``max_thumbnails`` images in all: each costs a few kB, so a cap keeps the file small
whatever the collection size; later groups show keys and scores only, and the page says so.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

from ..validation import available_cpus

if TYPE_CHECKING:  # pragma: no cover
    from ..dedup import DedupResult

__all__ = ["Groups", "duplicate_groups", "group_payload", "make_thumbnail"]

logger = logging.getLogger(__name__)

#: Members of a group shown before its "show all" button (and given thumbnails).
MEMBERS_SHOWN = 24


@dataclass(frozen=True)
class Groups:
    """Duplicate groups in display order.

    Attributes:
        rep: kept row of each group, in display order.
        best: highest member similarity of each group.
        start: group ``g``'s members are ``member[start[g]:start[g + 1]]``.
        member, similarity, duplicate_of: removed rows, their ``duplicate_similarity``
            and ``duplicate_of`` (which differs from ``rep`` in reference-policy chains).
    """

    rep: np.ndarray
    best: np.ndarray
    start: np.ndarray
    member: np.ndarray
    similarity: np.ndarray
    duplicate_of: np.ndarray

    def __len__(self) -> int:
        return int(self.rep.size)

    def members(self, g: int) -> slice:
        return slice(int(self.start[g]), int(self.start[g + 1]))


def duplicate_groups(result: DedupResult) -> Groups:
    """The removed rows of ``result`` grouped by representative, sorted for display."""
    removed = result.removed
    rep_of = np.asarray(result.group, dtype=np.int64)[removed]
    sim = np.asarray(result.duplicate_similarity, dtype=np.float64)[removed]
    key = np.where(np.isnan(sim), -np.inf, sim)
    # members: by group, then similarity descending, then row
    order = np.lexsort((removed, -key, rep_of))
    member, rep_of, sim, key = removed[order], rep_of[order], sim[order], key[order]
    if member.size == 0:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return Groups(empty_i, empty_f, np.zeros(1, np.int64), empty_i, empty_f, empty_i)
    heads = np.flatnonzero(np.r_[True, rep_of[1:] != rep_of[:-1]])
    reps = rep_of[heads]
    best = key[heads]  # first member of each group has its highest similarity
    sizes = np.diff(np.r_[heads, member.size])
    # groups: highest similarity first, then lowest kept row
    g_order = np.lexsort((reps, -best))
    new_sizes = sizes[g_order]
    start = np.r_[0, np.cumsum(new_sizes)].astype(np.int64)
    pick = np.repeat(heads[g_order] - start[:-1], new_sizes) + np.arange(member.size)
    dup = np.asarray(result.duplicate_of, dtype=np.int64)[member[pick]]
    return Groups(
        rep=reps[g_order],
        best=np.where(np.isfinite(best[g_order]), best[g_order], np.nan),
        start=start,
        member=member[pick],
        similarity=sim[pick],
        duplicate_of=dup,
    )


def thumbnail(
    value: Any, *, image_root=None, px: int = 96, quality: int = 70
) -> tuple[str | None, str | None]:
    """``(base64 JPEG of at most px x px, None)``, or ``(None, why)`` when the image won't
    load."""
    from ..io import try_load_image

    img, failure = try_load_image(value, image_root=image_root)
    if img is None:
        return None, str(failure)
    img.thumbnail((px, px))
    buf = BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii"), None


def make_thumbnail(value: Any, *, image_root=None, px: int = 96, quality: int = 70) -> str | None:
    """A JPEG of at most ``px`` x ``px``, base64-encoded; None when the image won't load."""
    data, why = thumbnail(value, image_root=image_root, px=px, quality=quality)
    if data is None:
        logger.debug("no thumbnail for %r: %s", value, why)
    return data


def _thumbnail_rows(groups: Groups, max_thumbnails: int) -> tuple[list[int], int]:
    """Rows to thumbnail (kept row + first shown members, whole groups in display order,
    at most ``max_thumbnails`` in all) and how many groups are fully covered."""
    rows: list[int] = []
    covered = 0
    for g in range(len(groups)):
        sl = groups.members(g)
        want = [int(groups.rep[g])] + [int(m) for m in groups.member[sl][:MEMBERS_SHOWN]]
        if len(rows) + len(want) > max_thumbnails:
            if covered == 0:  # a first group larger than the cap: take what fits
                rows.extend(want[:max_thumbnails])
            break
        rows.extend(want)
        covered += 1
    return rows, covered


def group_payload(
    groups: Groups,
    keys: Sequence[str],
    *,
    values: Sequence | None,
    image_root=None,
    thumb_px: int = 96,
    max_thumbnails: int = 1000,
    decimals: int = 4,
    row_numbers: Sequence[int] | None = None,
) -> tuple[dict, int, int]:
    """The JSON-able data the page's script renders, plus (thumbnails, groups with them).

    Layout (short names keep 100k groups compact): ``k`` keys and ``r`` row numbers of
    every row that appears, indexed by a local id; ``g`` one entry per group,
    ``[kept, best, [members], [similarities], [duplicate_of or -1 when it is the kept
    row]]`` in local ids; ``t`` local id -> base64 JPEG; ``m`` ``[thumbnails that could not
    be made, the first reason]``.  ``row_numbers`` maps a result row to the number shown
    (the input row, the one the kept/removed/pairs files use); default the result row.
    Similarities are shown at most 1.0 (a canonical score can exceed it by ~1e-8).
    """
    involved = np.unique(np.r_[groups.rep, groups.member, groups.duplicate_of])
    local = {int(row): k for k, row in enumerate(involved)}
    scale = 10**decimals

    def rnd(x: float):
        return None if not np.isfinite(x) else round(min(float(x), 1.0) * scale) / scale

    entries = []
    for g in range(len(groups)):
        sl = groups.members(g)
        rep = int(groups.rep[g])
        dup = groups.duplicate_of[sl]
        entries.append(
            [
                local[rep],
                rnd(groups.best[g]),
                [local[int(m)] for m in groups.member[sl]],
                [rnd(s) for s in groups.similarity[sl]],
                [-1 if int(d) == rep else local[int(d)] for d in dup],
            ]
        )
    thumbs: dict[str, str] = {}
    covered = 0
    missing: list = [0, None]
    if values is not None and max_thumbnails > 0 and len(groups):
        rows, covered = _thumbnail_rows(groups, max_thumbnails)
        workers = min(8, available_cpus())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            made = pool.map(
                lambda row: thumbnail(values[row], image_root=image_root, px=thumb_px), rows
            )
            for row, (data, reason) in zip(rows, made, strict=True):
                if data is not None:
                    thumbs[str(local[row])] = data
                else:
                    missing[0] += 1
                    missing[1] = missing[1] or reason
    payload = {
        "k": [str(keys[int(row)]) for row in involved],
        "r": [int(row if row_numbers is None else row_numbers[int(row)]) for row in involved],
        "g": entries,
        "t": thumbs,
        "d": decimals,
        "m": missing,
    }
    return payload, len(thumbs), covered
