"""How many rows each threshold would remove, from one run's pairs and scores (no re-run).

One dedup run at threshold ``t0`` keeps enough to answer "what if the threshold were ``t``?"
without searching again, but how much depends on the backend and the policy, and the table
says which answer is which:

- **reference policy, best-earlier scores known** (``blocked``, ``dense``; ``partitioned``
  as a lower bound): row ``j`` is removed at ``t`` iff ``max_earlier_similarity[j] >= t``,
  so every threshold is answered exactly (:meth:`DedupResult.removed_at`).
- **reference policy, no best-earlier scores** (``flat``, ``ivf``, ``hnsw``): the pairs
  found at ``t0`` give each row's best earlier score whenever it is ``>= t0``, which answers
  every ``t >= t0`` exactly.  Below ``t0`` pairs were never collected: the count at ``t0``
  is only a lower bound (lowering the threshold never removes fewer rows).
- **greedy / component**: the policy is re-applied to the pairs with score ``>= t`` (cheap:
  no search), exact for ``t >= t0``.  Below ``t0`` the component count at ``t0`` is a lower
  bound (more edges never make more components); greedy is not monotone in the threshold,
  so nothing is claimed there.

With an approximate backend pairs may be missing, so counts are lower bounds (reference,
component) or approximate (greedy) even at ``t >= t0``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..policy import decide
from ..search.pairs import PairSet
from ..validation import check_threshold

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..dedup import DedupResult

__all__ = ["DEFAULT_THRESHOLDS", "threshold_table"]

#: 0.80, 0.81, ..., 0.99: the rows of the report's threshold table.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.80 + 0.01 * k, 2) for k in range(20))

EXACT, LOWER_BOUND, APPROXIMATE, UNAVAILABLE = "exact", "lower bound", "approximate", "unavailable"


class _AtLeast:
    """The pairs of ``pairs`` with score ``>= threshold``, streamed chunk by chunk."""

    def __init__(self, pairs, threshold: float) -> None:
        self._pairs = pairs
        self._threshold = threshold

    def iter_chunks(self, rows: int = 1 << 20) -> Iterator[PairSet]:
        for chunk in self._pairs.iter_chunks(rows):
            hit = np.asarray(chunk.s) >= self._threshold
            yield PairSet(chunk.i[hit], chunk.j[hit], chunk.s[hit])


def best_earlier_from_pairs(n: int, pairs) -> np.ndarray:
    """Per row ``j``, the highest score of a pair ``(i, j)`` with ``i < j``; -inf if none.

    Equals ``max_earlier_similarity`` wherever that is ``>= `` the run's threshold (the
    pairs hold every such score when the backend is exact).
    """
    best = np.full(n, -np.inf, dtype=np.float64)
    for chunk in pairs.iter_chunks():
        if len(chunk):
            np.maximum.at(best, np.asarray(chunk.j, dtype=np.int64), chunk.s)
    return best


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    values = np.atleast_1d(np.asarray(thresholds, dtype=object))
    if values.size == 0:
        raise ValueError("thresholds must hold at least one value in [0, 1]; got none")
    return np.array([check_threshold(t, "each threshold") for t in values], dtype=np.float64)


def threshold_table(
    result: DedupResult, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> pd.DataFrame:
    """Rows removed and kept at each of ``thresholds``, computed from ``result`` alone.

    Returns a DataFrame, one row per threshold (ascending), with columns ``threshold``,
    ``removed`` and ``kept`` (nullable ints: ``<NA>`` where unknown), ``removed_pct``,
    ``status`` (``"exact"``, ``"lower bound"`` on removed, ``"approximate"`` or
    ``"unavailable"``), ``note`` (why, in words) and ``is_run_threshold``.  The count is
    for ``result.policy``; see the module docstring for what each backend allows.
    """
    import pandas as pd

    ts = np.unique(_check_thresholds(thresholds))
    n, t0, policy = result.n, float(result.threshold), result.policy
    approx_note = (
        "" if result.exact else f"approximate backend {result.backend!r}: pairs may be missing"
    )
    removed = np.zeros(ts.size, dtype=np.int64)
    known = np.ones(ts.size, dtype=bool)
    status: list[str] = []
    notes: list[str] = []

    if policy == "reference" and result.max_earlier_similarity is not None:
        removed[:] = result.removed_at(ts)
        status = [EXACT if result.exact else LOWER_BOUND] * ts.size
        notes = [approx_note] * ts.size
    elif policy == "reference":
        earlier = np.sort(best_earlier_from_pairs(n, result.pairs))
        at_or_above = earlier.size - np.searchsorted(earlier, np.maximum(ts, t0), side="left")
        removed[:] = at_or_above
        for t in ts:
            if t >= t0:
                status.append(EXACT if result.exact else LOWER_BOUND)
                notes.append(approx_note)
            else:
                status.append(LOWER_BOUND)
                notes.append(
                    f"backend {result.backend!r} keeps no scores below the run's threshold "
                    f"{t0:g}: at least the rows removed at {t0:g}"
                )
    else:
        for k, t in enumerate(ts):
            if t == t0:
                removed[k] = result.n_removed
            elif t > t0:
                removed[k] = int((~decide(n, _AtLeast(result.pairs, t), policy).keep).sum())
            if t >= t0:
                if result.exact:
                    status.append(EXACT)
                else:
                    status.append(LOWER_BOUND if policy == "component" else APPROXIMATE)
                notes.append(approx_note)
            elif policy == "component":
                removed[k] = result.n_removed
                status.append(LOWER_BOUND)
                notes.append(
                    f"pairs below the run's threshold {t0:g} were not collected: at least "
                    f"the rows removed at {t0:g}"
                )
            else:
                known[k] = False
                status.append(UNAVAILABLE)
                notes.append(
                    f"pairs below the run's threshold {t0:g} were not collected, and the "
                    f"{policy} policy's count is not monotone in the threshold"
                )

    removed_col = pd.array(np.where(known, removed, 0), dtype="Int64")
    removed_col[~known] = pd.NA
    kept_col = pd.array(np.where(known, n - removed, 0), dtype="Int64")
    kept_col[~known] = pd.NA
    pct = np.where(known, 100.0 * removed / max(n, 1), np.nan)
    return pd.DataFrame(
        {
            "threshold": ts,
            "removed": removed_col,
            "kept": kept_col,
            "removed_pct": pct,
            "status": status,
            "note": notes,
            "is_run_threshold": ts == t0,
        }
    )
