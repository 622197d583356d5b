"""Equivalence harness: hold every backend to the dense oracle, and the oracle to the spec.

Public so that a new backend (or a user's own build) can be checked the way the project's
tests check theirs::

    from dedup_index.testing import assert_equivalent, mixed_adversarial

    E = mixed_adversarial(seed=0, n=200, d=16, threshold=0.9)
    assert_equivalent(E, 0.9)                   # every backend x policy x score, bit for bit

Three parts:

- adversarial generators (exact copies, long chains, dense clusters, pairs planted within
  ``1e-7`` of the threshold and exactly on it, and a shuffled mix of all of them), plus a set
  with zero and non-finite rows that must be refused;
- :func:`check_equivalence`, which runs ``dedup_embeddings`` with ``backend="dense"`` and
  with each other backend and compares every field of the results: keep mask, pairs
  (scores bit for bit), ``duplicate_of``, ``duplicate_similarity``, ``max_similarity`` and
  ``group``; the result is an :class:`EquivalenceReport` with a pass/fail table;
- :func:`brute_force_reference`, the spec read literally (every pair scored canonically,
  the ``i < j`` scan in Python), against which the oracle itself is checked.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .dedup import SCORES, DedupResult, dedup_embeddings
from .policy import POLICIES
from .search import PairSet, as_unit_float32, canonical_scores
from .validation import check_choice, check_threshold

__all__ = [
    "BadEmbeddings",
    "Check",
    "EquivalenceReport",
    "Mismatch",
    "assert_equivalent",
    "brute_force_reference",
    "check_equivalence",
    "compare_results",
    "default_backends",
    "dense_clusters",
    "exact_duplicates",
    "long_chain",
    "mixed_adversarial",
    "planted_near_threshold",
    "zero_and_nonfinite_rows",
]

#: The oracle every backend is compared with.
ORACLE = "dense"
#: Up to this many rows, the oracle is also compared with :func:`brute_force_reference`.
BRUTE_FORCE_MAX_ROWS = 300
#: Rows and values quoted per differing field in a mismatch description.
SHOWN = 5

RngLike = np.random.Generator | int | None


# --------------------------------------------------------------------------- generators


def _rng(rng: RngLike) -> np.random.Generator:
    return np.random.default_rng(rng)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # measure-zero, but a zero row would be refused downstream
    return x / norms


def _orthogonal_unit(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A random unit vector orthogonal to unit ``base`` (needs ``D >= 2``)."""
    while True:
        u = rng.standard_normal(base.shape[0])
        u -= (u @ base) * base
        norm = np.linalg.norm(u)
        if norm > 1e-6:
            return u / norm


def _at_cosine(rng: np.random.Generator, base: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine ``cos`` (clipped to [-1, 1]) from unit ``base``."""
    cos = min(1.0, max(-1.0, cos))
    return cos * base + math.sqrt(max(0.0, 1.0 - cos * cos)) * _orthogonal_unit(rng, base)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


def _check_dim(d: int, minimum: int = 1) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < minimum:
        raise ValueError(f"d (the embedding dimension) must be an integer >= {minimum}; got {d!r}")
    return int(d)


def exact_duplicates(
    rng: RngLike,
    n_groups: int,
    group_size: int,
    d: int,
    *,
    scaled: bool = False,
    dtype: type = np.float32,
) -> np.ndarray:
    """``n_groups`` random unit vectors, each repeated ``group_size`` times, groups adjacent.

    Every copy scores (about) 1 with its group and is removed at any threshold up to 1; with
    ``scaled=True`` each copy is multiplied by a random factor in [1e-3, 1e3], so the copies
    agree only after normalisation, and may differ from each other by a float32 ulp there.
    """
    rng = _rng(rng)
    n_groups, group_size = (
        _check_count(n_groups, "n_groups"),
        _check_count(group_size, "group_size"),
    )
    d = _check_dim(d)
    rows = np.repeat(_unit_rows(rng, n_groups, d), group_size, axis=0)
    if scaled and rows.size:
        rows *= 10.0 ** rng.uniform(-3.0, 3.0, size=(rows.shape[0], 1))
    return rows.astype(dtype)


def long_chain(
    rng: RngLike, length: int, d: int, step_cos: float, *, dtype: type = np.float32
) -> np.ndarray:
    """``length`` unit vectors along a great circle, consecutive ones at cosine ``step_cos``.

    Rows ``a`` and ``b`` are at cosine ``cos(|a - b| * theta)`` with ``theta =
    arccos(step_cos)``, strictly decreasing in ``|a - b|`` because the arc spans at most pi
    (``ValueError`` otherwise: lower ``length`` or raise ``step_cos``).  So at a threshold
    just under ``step_cos`` every consecutive pair is a duplicate (up to float32 rounding,
    about 1e-7) and no other pair is: the chain A~B~C~... on which the policies differ.
    """
    rng = _rng(rng)
    length, d = _check_count(length, "length"), _check_dim(d, 2)
    if not -1.0 <= step_cos <= 1.0:
        raise ValueError(f"step_cos must be in [-1, 1]; got {step_cos!r}")
    theta = math.acos(step_cos)
    if length > 1 and (length - 1) * theta > math.pi + 1e-12:
        longest = int(math.pi / theta) + 1
        raise ValueError(
            f"a chain of {length} steps at cosine {step_cos} wraps past the antipode; "
            f"at most {longest} rows fit at this step_cos"
        )
    a = _unit_rows(rng, 1, d)[0]
    b = _orthogonal_unit(rng, a)
    angles = theta * np.arange(length)
    rows = np.cos(angles)[:, None] * a + np.sin(angles)[:, None] * b
    return rows.reshape(length, d).astype(dtype)


def dense_clusters(
    rng: RngLike,
    n_clusters: int,
    size: int,
    d: int,
    spread: float,
    *,
    dtype: type = np.float32,
) -> np.ndarray:
    """``n_clusters`` clusters of ``size`` rows each: a random unit centre plus noise.

    Each member is ``centre + spread * g / sqrt(d)`` (``g`` standard normal), normalised, so
    two members of a cluster are at cosine about ``1 / (1 + spread**2)``: choose ``spread =
    sqrt(1 / threshold - 1)`` to put many pairs right around the threshold (dense graphs
    with many pairs, overlapping groups and near-ties).  Clusters are adjacent, not shuffled.
    """
    rng = _rng(rng)
    n_clusters, size = _check_count(n_clusters, "n_clusters"), _check_count(size, "size")
    d = _check_dim(d)
    if not spread >= 0.0:
        raise ValueError(f"spread must be >= 0; got {spread!r}")
    centres = np.repeat(_unit_rows(rng, n_clusters, d), size, axis=0)
    rows = centres + spread * rng.standard_normal(centres.shape) / math.sqrt(d)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = np.where(norms > 0, rows / np.where(norms > 0, norms, 1.0), centres)
    return rows.astype(dtype)


def _float32_steps(value: float, steps: int) -> float:
    """``float32(value)`` moved ``steps`` float32 ulps (clipped to [-1, 1])."""
    x = np.float32(value)
    toward = np.float32(np.inf if steps > 0 else -np.inf)
    for _ in range(abs(steps)):
        x = np.nextafter(x, toward)
    return float(min(np.float32(1.0), max(np.float32(-1.0), x)))


def _axis_partner(v: float, k: int, d: int, dtype: type) -> np.ndarray:
    """A unit row whose product with the axis ``e_k`` is exactly the float32 number ``v``.

    The rest of its length goes to the next one or two axes, chosen so that the float32 row
    has norm 1 within ~1e-14 (for ``D >= 3``): normalisation leaves ``v`` untouched and the
    canonical score of ``(e_k, row)`` is ``v`` exactly.  With ``D = 2`` it is exact only for
    float64 output.
    """
    row = np.zeros(d, dtype=np.float64)
    row[k] = v
    rest = max(0.0, 1.0 - v * v)
    if dtype == np.float64 or d == 2:
        if d > 1:
            row[(k + 1) % d] = math.sqrt(rest)
        return row
    w = np.float32(math.sqrt(rest))
    if float(w) * float(w) > rest:
        w = np.nextafter(w, np.float32(0.0))
    row[(k + 1) % d] = float(w)
    row[(k + 2) % d] = float(np.float32(math.sqrt(max(0.0, rest - float(w) * float(w)))))
    return row


def planted_near_threshold(
    rng: RngLike,
    n: int,
    d: int,
    threshold: float,
    eps: float = 1e-7,
    *,
    dtype: type = np.float32,
) -> np.ndarray:
    """``n`` rows in pairs planted right at the threshold, where rounding decides.

    Pairs alternate between two kinds:

    - random direction, partner at cosine ``threshold + delta`` with ``delta`` cycling
      through ``-eps, -eps/2, 0, eps/2, eps``: after float32 rounding, which side a pair
      lands on is decided only by the canonical score;
    - on the float boundary: the axis ``e_k`` and a partner whose canonical score with it is
      exactly the float32 number ``float32(threshold)`` moved by -2..2 ulps.  When the
      threshold is itself a float32 number (0.5, 0.75, 0.875, 1.0, ...) one pair in five
      scores *exactly* the threshold: a tie that ``>=`` must count as a duplicate.

    Axis bases repeat when there are more such pairs than axes (exact copies, also
    adversarial).  An odd ``n`` gets one random row at the end.  Needs ``D >= 2``; the
    boundary pairs are exact for ``D >= 3`` or float64 output.
    """
    rng = _rng(rng)
    n, d = _check_count(n, "n"), _check_dim(d, 2)
    threshold = check_threshold(threshold)
    deltas = (-eps, -eps / 2, 0.0, eps / 2, eps)
    rows: list[np.ndarray] = []
    for p in range(n // 2):
        kind, turn = p % 2, (p // 2) % 5
        if kind == 0:
            base = _unit_rows(rng, 1, d)[0]
            rows += [base, _at_cosine(rng, base, threshold + deltas[turn])]
        else:
            k = (p // 2) % d
            base = np.zeros(d)
            base[k] = 1.0
            v = _float32_steps(threshold, turn - 2)
            rows += [base, _axis_partner(v, k, d, dtype)]
    if n % 2:
        rows.append(_unit_rows(rng, 1, d)[0])
    return np.array(rows, dtype=np.float64).reshape(n, d).astype(dtype)


def mixed_adversarial(
    seed: RngLike, n: int, d: int, threshold: float, *, dtype: type = np.float32
) -> np.ndarray:
    """Exactly ``n`` rows mixing every generator above with random rows, shuffled.

    About a fifth each of exact (and scaled) copies, a long chain at cosine ``(1 +
    threshold) / 2`` per step (so neighbours pair and rows two apart do not), dense clusters
    spread around the threshold and pairs planted at the threshold; the rest random.  The
    shuffle scatters every group, so ``i < j`` order is exercised.  ``D = 1`` gets only the
    parts that exist on a line (copies, clusters, random rows).
    """
    rng = _rng(seed)
    n, d = _check_count(n, "n"), _check_dim(d)
    threshold = check_threshold(threshold)
    part = n // 5
    pieces: list[np.ndarray] = []
    size = int(rng.integers(2, 5))
    pieces.append(exact_duplicates(rng, part // size, size, d, scaled=True, dtype=np.float64))
    if d >= 2:
        step = (1.0 + threshold) / 2.0
        theta = math.acos(step)
        longest = part if theta == 0 else min(part, int(math.pi / theta) + 1)
        pieces.append(long_chain(rng, longest, d, step, dtype=np.float64))
        pieces.append(planted_near_threshold(rng, part, d, threshold, dtype=np.float64))
    spread = math.sqrt(1.0 / threshold - 1.0) if threshold > 0 else 3.0
    csize = int(rng.integers(3, 7))
    pieces.append(dense_clusters(rng, part // csize, csize, d, spread, dtype=np.float64))
    used = sum(p.shape[0] for p in pieces)
    pieces.append(_unit_rows(rng, n - used, d))
    rows = np.concatenate(pieces, axis=0)
    return rows[rng.permutation(n)].astype(dtype)


class BadEmbeddings(NamedTuple):
    """A matrix with rows that have no direction, and where they are."""

    embeddings: np.ndarray
    zero_rows: np.ndarray
    nonfinite_rows: np.ndarray


def zero_and_nonfinite_rows(
    rng: RngLike,
    n: int,
    d: int,
    *,
    n_zero: int = 1,
    n_nan: int = 1,
    n_inf: int = 1,
    dtype: type = np.float32,
) -> BadEmbeddings:
    """``n`` random rows of which some are all zero, some hold a NaN, some an inf.

    ``dedup_embeddings`` must refuse it with a ``ValueError`` naming the rows: the
    non-finite rows (checked first), or the zero rows when there are no non-finite ones.
    The bad rows sit at random positions, returned sorted.
    """
    rng = _rng(rng)
    n, d = _check_count(n, "n"), _check_dim(d)
    counts = [
        _check_count(c, name)
        for c, name in ((n_zero, "n_zero"), (n_nan, "n_nan"), (n_inf, "n_inf"))
    ]
    if sum(counts) > n:
        raise ValueError(f"{sum(counts)} bad rows asked for but only n = {n} rows")
    rows = _unit_rows(rng, n, d)
    where = rng.permutation(n)
    zero = np.sort(where[: counts[0]])
    nan = where[counts[0] : counts[0] + counts[1]]
    inf = where[counts[0] + counts[1] : sum(counts)]
    rows[zero] = 0.0
    rows[nan, rng.integers(0, d, size=nan.size)] = np.nan
    rows[inf, rng.integers(0, d, size=inf.size)] = rng.choice([-np.inf, np.inf], size=inf.size)
    return BadEmbeddings(rows.astype(dtype), zero, np.sort(np.concatenate([nan, inf])))


# ------------------------------------------------------------------------- brute force


def brute_force_reference(
    embeddings: np.ndarray, threshold: float, *, score: str = "nearest"
) -> DedupResult:
    """The spec read literally, for small inputs: a :class:`DedupResult` to compare with.

    Every pair ``i < j`` is scored with :func:`~dedup_index.search.canonical_scores`; then,
    in Python, the ``i < j`` scan: row ``j`` is removed iff some earlier row scores
    ``>= threshold`` with it, ``duplicate_of`` the first such row, and ``group`` the kept row
    reached by following ``duplicate_of``.  ``max_similarity`` is ``max(0, max_{k != j}
    s(j, k))`` (``score="nearest"``) or the best pair score, else 0 (``score="pairs"``).
    O(N^2) time and memory: meant for N up to a few hundred.
    """
    threshold = check_threshold(threshold)
    check_choice(score, SCORES, "score")
    unit = as_unit_float32(embeddings)
    n = unit.shape[0]
    ii, jj = np.triu_indices(n, k=1)
    s = canonical_scores(unit, ii, jj)
    keep = [True] * n
    duplicate_of = [-1] * n
    duplicate_similarity = [math.nan] * n
    pair_i, pair_j, pair_s = [], [], []
    best = [-math.inf] * n
    for a, b, value in zip(ii.tolist(), jj.tolist(), s.tolist(), strict=True):
        best[a] = max(best[a], value)
        best[b] = max(best[b], value)
        if value >= threshold:
            pair_i.append(a)
            pair_j.append(b)
            pair_s.append(value)
            if keep[b]:  # pairs come in (i, j) order: the first hit is the earliest i
                keep[b] = False
                duplicate_of[b] = a
                duplicate_similarity[b] = value
    group = list(range(n))
    for j in range(n):
        if not keep[j]:
            group[j] = group[duplicate_of[j]]
    if score == "nearest":
        max_similarity = [max(0.0, b) for b in best]
    else:
        max_similarity = [b if b >= threshold else 0.0 for b in best]
    return DedupResult(
        keep=np.array(keep, dtype=bool),
        duplicate_of=np.array(duplicate_of, dtype=np.int64),
        duplicate_similarity=np.array(duplicate_similarity, dtype=np.float64),
        group=np.array(group, dtype=np.int64),
        pairs=PairSet(
            np.array(pair_i, dtype=np.int64),
            np.array(pair_j, dtype=np.int64),
            np.array(pair_s, dtype=np.float64),
        ),
        max_similarity=np.array(max_similarity, dtype=np.float64),
        threshold=threshold,
        backend="brute-force",
        policy="reference",
        score=score,
    )


# -------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Mismatch:
    """One field on which a result differs from what it is compared with."""

    backend: str
    oracle: str
    policy: str
    score: str
    field: str
    detail: str

    def __str__(self) -> str:
        return (
            f"{self.backend} vs {self.oracle} (policy={self.policy}, score={self.score}): "
            f"{self.field}: {self.detail}"
        )


@dataclass(frozen=True)
class Check:
    """One comparison run: ``backend`` against ``oracle`` for a policy and a score."""

    backend: str
    oracle: str
    policy: str
    score: str
    ok: bool


def _same_floats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: bit-identical float64, or both NaN."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    return (a.view(np.uint64) == b.view(np.uint64)) | (np.isnan(a) & np.isnan(b))


def _show(values: np.ndarray) -> str:
    """Values for a message; floats with ``repr`` so that any two different ones differ."""
    return "[" + ", ".join(repr(v) for v in np.asarray(values).tolist()) + "]"


def _row_diff(expected: np.ndarray, actual: np.ndarray, same: np.ndarray) -> str | None:
    rows = np.flatnonzero(~same)
    if rows.size == 0:
        return None
    first = rows[:SHOWN]
    return (
        f"{rows.size} row(s) differ; first rows {first.tolist()}: expected "
        f"{_show(expected[first])}, got {_show(actual[first])}"
    )


def _keep_diff(expected: np.ndarray, actual: np.ndarray) -> str | None:
    if np.array_equal(expected, actual):
        return None
    extra = np.flatnonzero(expected & ~actual)
    missed = np.flatnonzero(~expected & actual)
    parts = []
    if extra.size:
        parts.append(f"{extra.size} row(s) removed that the oracle keeps: {extra[:SHOWN].tolist()}")
    if missed.size:
        parts.append(
            f"{missed.size} row(s) kept that the oracle removes: {missed[:SHOWN].tolist()}"
        )
    return "; ".join(parts)


def _pairs_diff(expected: PairSet, actual: PairSet, n: int) -> str | None:
    if (
        len(expected) == len(actual)
        and np.array_equal(expected.i, actual.i)
        and np.array_equal(expected.j, actual.j)
        and _same_floats(expected.s, actual.s).all()
    ):
        return None
    width = max(n, 1)
    key_e = np.asarray(expected.i, np.int64) * width + np.asarray(expected.j, np.int64)
    key_a = np.asarray(actual.i, np.int64) * width + np.asarray(actual.j, np.int64)
    parts = [f"{len(actual)} pair(s) vs the oracle's {len(expected)}"]
    missing = np.setdiff1d(key_e, key_a)
    extra = np.setdiff1d(key_a, key_e)

    def listed(keys: np.ndarray, table: dict[int, float]) -> str:
        return ", ".join(f"({k // width}, {k % width}, {table[int(k)]!r})" for k in keys[:SHOWN])

    score_e = dict(zip(key_e.tolist(), np.asarray(expected.s, np.float64).tolist(), strict=True))
    score_a = dict(zip(key_a.tolist(), np.asarray(actual.s, np.float64).tolist(), strict=True))
    if missing.size:
        parts.append(f"{missing.size} missing: {listed(missing, score_e)}")
    if extra.size:
        parts.append(f"{extra.size} extra: {listed(extra, score_a)}")
    common = np.intersect1d(key_e, key_a)
    if common.size:
        s_e = np.array([score_e[int(k)] for k in common])
        s_a = np.array([score_a[int(k)] for k in common])
        off = np.flatnonzero(~_same_floats(s_e, s_a))
        if off.size:
            shown = ", ".join(
                f"({common[k] // width}, {common[k] % width}): expected {s_e[k]!r}, got {s_a[k]!r}"
                for k in off[:SHOWN]
            )
            parts.append(f"{off.size} score(s) differ: {shown}")
    if len(parts) == 1:
        parts.append("same pairs in a different order (pairs must be sorted by (i, j))")
    return "; ".join(parts)


def compare_results(expected: DedupResult, actual: DedupResult) -> list[Mismatch]:
    """Every field on which ``actual`` differs from ``expected`` (empty when identical).

    Keep mask, ``duplicate_of`` and ``group`` exactly; pairs as the same ``(i, j)`` in the
    same order with bit-identical scores; ``duplicate_similarity`` bit for bit with NaN
    equal to NaN; ``max_similarity`` bit for bit.
    """

    def mismatch(name: str, detail: str) -> Mismatch:
        return Mismatch(actual.backend, expected.backend, actual.policy, actual.score, name, detail)

    if expected.n != actual.n:
        return [mismatch("n", f"{actual.n} row(s) vs the oracle's {expected.n}")]
    found: list[Mismatch] = []
    checks: list[tuple[str, str | None]] = [
        ("keep", _keep_diff(expected.keep, actual.keep)),
        ("pairs", _pairs_diff(expected.pairs, actual.pairs, expected.n)),
        (
            "duplicate_of",
            _row_diff(
                expected.duplicate_of,
                actual.duplicate_of,
                np.asarray(expected.duplicate_of) == np.asarray(actual.duplicate_of),
            ),
        ),
        (
            "duplicate_similarity",
            _row_diff(
                expected.duplicate_similarity,
                actual.duplicate_similarity,
                _same_floats(expected.duplicate_similarity, actual.duplicate_similarity),
            ),
        ),
        (
            "max_similarity",
            _row_diff(
                expected.max_similarity,
                actual.max_similarity,
                _same_floats(expected.max_similarity, actual.max_similarity),
            ),
        ),
        (
            "group",
            _row_diff(
                expected.group,
                actual.group,
                np.asarray(expected.group) == np.asarray(actual.group),
            ),
        ),
    ]
    for name, detail in checks:
        if detail is not None:
            found.append(mismatch(name, detail))
    return found


@dataclass
class EquivalenceReport:
    """What :func:`check_equivalence` compared and every difference it found."""

    n: int
    d: int
    threshold: float
    checks: list[Check] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.mismatches and all(c.ok for c in self.checks)

    def __str__(self) -> str:
        failed = sum(not c.ok for c in self.checks)
        verdict = "PASS" if self.ok else f"FAIL ({failed} of {len(self.checks)} checks)"
        head = (
            f"equivalence at N = {self.n}, D = {self.d}, threshold = {self.threshold!r}: {verdict}"
        )
        rows = [("backend", "vs", "policy", "score", "result")]
        rows += [
            (c.backend, c.oracle, c.policy, c.score, "ok" if c.ok else "FAIL") for c in self.checks
        ]
        widths = [max(len(r[k]) for r in rows) for k in range(5)]
        lines = [head] + [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        if self.mismatches:
            lines.append("mismatches:")
            lines += [f"  - {m}" for m in self.mismatches]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise ``AssertionError`` with the table and every mismatch unless all passed."""
        if not self.ok:
            raise AssertionError(str(self))


def default_backends() -> tuple[str, ...]:
    """The backends compared with the oracle by default, read from the search package now.

    Every name in ``dedup_index.search.BACKENDS`` except ``auto`` and ``dense`` (so a new
    backend is picked up without touching this file); if the search package declares
    ``EXACT_BACKENDS``, only those, since approximate backends are not held to equality.
    """
    from . import search

    names = getattr(search, "EXACT_BACKENDS", None) or search.BACKENDS
    return tuple(b for b in names if b not in ("auto", ORACLE))


_DIRECT_ARGS = frozenset({"normalize", "threads", "device", "pairs_memory_budget", "pairs_path"})


def check_equivalence(
    embeddings: np.ndarray,
    threshold: float,
    *,
    backends: Sequence[str] | None = None,
    policies: Sequence[str] = POLICIES,
    scores: Sequence[str] = SCORES,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    brute_force_max_rows: int = BRUTE_FORCE_MAX_ROWS,
) -> EquivalenceReport:
    """Compare each backend with the dense oracle for every policy and score.

    For each ``(policy, score)``: ``dedup_embeddings(..., backend="dense")`` is the oracle;
    with ``N <= brute_force_max_rows`` and the reference policy, the oracle is itself
    compared with :func:`brute_force_reference`; then each of ``backends`` (default:
    :func:`default_backends`) runs with the same arguments plus ``backend_options[name]``
    (passed only when non-empty) and is compared field by field (:func:`compare_results`).
    A backend that raises is recorded as a failure with its error; an error of the oracle
    (e.g. refused embeddings) propagates.
    """
    threshold = check_threshold(threshold)
    for policy in policies:
        check_choice(policy, POLICIES, "policy")
    for score in scores:
        check_choice(score, SCORES, "score")
    names = default_backends() if backends is None else tuple(backends)
    options = dict(backend_options or {})
    shape = np.shape(embeddings)
    n = int(shape[0]) if len(shape) >= 1 else 0
    d = int(shape[1]) if len(shape) == 2 else 0
    report = EquivalenceReport(n=n, d=d, threshold=threshold)

    def record(backend: str, oracle: str, policy: str, score: str, found: list[Mismatch]) -> None:
        report.checks.append(Check(backend, oracle, policy, score, not found))
        report.mismatches.extend(found)

    for policy in policies:
        for score in scores:
            oracle = dedup_embeddings(
                embeddings, threshold, backend=ORACLE, score=score, policy=policy
            )
            if policy == "reference" and n <= brute_force_max_rows:
                literal = brute_force_reference(embeddings, threshold, score=score)
                record(ORACLE, literal.backend, policy, score, compare_results(literal, oracle))
            for name in names:
                extra = dict(options.get(name) or {})
                # Arguments of dedup_embeddings itself go there; the rest to the backend.
                direct = {k: extra.pop(k) for k in list(extra) if k in _DIRECT_ARGS}
                try:
                    got = dedup_embeddings(
                        embeddings,
                        threshold,
                        backend=name,
                        score=score,
                        policy=policy,
                        backend_options=extra or None,
                        **direct,
                    )
                except Exception as exc:  # a failing backend is a result, not a crash
                    found = [
                        Mismatch(
                            name,
                            ORACLE,
                            policy,
                            score,
                            "error",
                            f"raised {type(exc).__name__}: {exc}",
                        )
                    ]
                else:
                    found = compare_results(oracle, got)
                record(name, ORACLE, policy, score, found)
    return report


def assert_equivalent(embeddings: np.ndarray, threshold: float, **kwargs: Any) -> EquivalenceReport:
    """:func:`check_equivalence`, raising ``AssertionError`` with the report on any failure."""
    report = check_equivalence(embeddings, threshold, **kwargs)
    report.raise_if_failed()
    return report
