"""Keep policies: each held to a slow, literal implementation of its definition."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup_index.policy import (
    POLICIES,
    Decisions,
    component_decisions,
    decide,
    greedy_decisions,
    reference_decisions,
)
from dedup_index.search.pairs import PairSet

# ----------------------------------------------------------------- slow definitions


def partners(n: int, pairs: dict[tuple[int, int], float]) -> list[dict[int, float]]:
    """Per row, its partners and the pair scores (both directions)."""
    out: list[dict[int, float]] = [{} for _ in range(n)]
    for (i, j), s in pairs.items():
        out[i][j] = s
        out[j][i] = s
    return out


def slow_reference(n: int, pairs: dict[tuple[int, int], float]):
    near = partners(n, pairs)
    keep, dup, sim, group = [True] * n, [-1] * n, [math.nan] * n, list(range(n))
    for j in range(n):
        earlier = sorted(i for i in near[j] if i < j)
        if earlier:
            keep[j], dup[j], sim[j] = False, earlier[0], near[j][earlier[0]]
            group[j] = group[dup[j]]
    return keep, dup, sim, group


def slow_greedy(n: int, pairs: dict[tuple[int, int], float]):
    near = partners(n, pairs)
    keep, dup, sim, group = [True] * n, [-1] * n, [math.nan] * n, list(range(n))
    for j in range(n):
        kept_earlier = sorted(i for i in near[j] if i < j and keep[i])
        if kept_earlier:
            i = kept_earlier[0]
            keep[j], dup[j], sim[j], group[j] = False, i, near[j][i], i
    return keep, dup, sim, group


def slow_component(n: int, pairs: dict[tuple[int, int], float]):
    near = partners(n, pairs)
    root = [-1] * n
    for start in range(n):  # ascending: the first row reached of a component is its lowest
        if root[start] >= 0:
            continue
        stack = [start]
        root[start] = start
        while stack:
            x = stack.pop()
            for y in near[x]:
                if root[y] < 0:
                    root[y] = start
                    stack.append(y)
    keep = [root[j] == j for j in range(n)]
    dup = [-1 if keep[j] else root[j] for j in range(n)]
    sim = [math.nan] * n
    for j in range(n):
        if keep[j]:
            continue
        if root[j] in near[j]:
            sim[j] = near[j][root[j]]
        elif any(i < j for i in near[j]):
            sim[j] = max(s for i, s in near[j].items() if i < j)
        else:
            sim[j] = max(near[j].values())
    return keep, dup, sim, root


SLOW = {"reference": slow_reference, "greedy": slow_greedy, "component": slow_component}


# ------------------------------------------------------------------------- helpers


def pair_set(pairs: dict[tuple[int, int], float]) -> PairSet:
    """A sorted, unique PairSet, as the search stage produces."""
    keys = sorted(pairs)
    return PairSet(
        np.array([k[0] for k in keys], dtype=np.int64),
        np.array([k[1] for k in keys], dtype=np.int64),
        np.array([pairs[k] for k in keys], dtype=np.float64),
    )


class ShuffledSpill:
    """Stands in for a spilled pair file: chunks in random order, some pairs repeated."""

    def __init__(self, pairs: dict[tuple[int, int], float], seed: int, chunk: int = 3):
        rng = random.Random(seed)
        rows = list(pairs.items())
        rows += [rng.choice(rows) for _ in range(len(rows) // 2)] if rows else []
        rng.shuffle(rows)
        self.rows = rows
        self.chunk = chunk
        self.passes = 0

    def iter_chunks(self, rows: int = 1 << 20):
        self.passes += 1
        size = max(1, min(rows, self.chunk))
        for a in range(0, len(self.rows), size):
            part = self.rows[a : a + size]
            yield PairSet(
                np.array([k[0] for k, _ in part], dtype=np.int64),
                np.array([k[1] for k, _ in part], dtype=np.int64),
                np.array([s for _, s in part], dtype=np.float64),
            )


def assert_decisions(d: Decisions, expected, n: int) -> None:
    keep, dup, sim, group = expected
    assert d.keep.dtype == bool and d.keep.shape == (n,)
    assert d.duplicate_of.dtype == np.int64 and d.group.dtype == np.int64
    assert d.duplicate_similarity.dtype == np.float64
    assert d.keep.tolist() == keep
    assert d.duplicate_of.tolist() == dup
    assert np.array_equal(d.duplicate_similarity, np.array(sim, dtype=np.float64), equal_nan=True)
    assert d.group.tolist() == group


def assert_identical(a: Decisions, b: Decisions) -> None:
    assert np.array_equal(a.keep, b.keep)
    assert np.array_equal(a.duplicate_of, b.duplicate_of)
    assert np.array_equal(a.duplicate_similarity, b.duplicate_similarity, equal_nan=True)
    assert np.array_equal(a.group, b.group)


@st.composite
def pair_graphs(draw, max_n: int = 30):
    n = draw(st.integers(0, max_n))
    all_pairs = [(i, j) for j in range(n) for i in range(j)]
    chosen = draw(st.lists(st.sampled_from(all_pairs), unique=True)) if all_pairs else []
    scores = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)
    return n, {p: draw(scores) for p in chosen}


# --------------------------------------------------------------------------- tests

CHAIN = {(0, 1): 0.95, (1, 2): 0.93}  # A~B~C, A not similar to C


@pytest.mark.parametrize(
    "policy, keep, dup, sim, group",
    [
        ("reference", [True, False, False], [-1, 0, 1], [math.nan, 0.95, 0.93], [0, 0, 0]),
        ("greedy", [True, False, True], [-1, 0, -1], [math.nan, 0.95, math.nan], [0, 0, 2]),
        ("component", [True, False, False], [-1, 0, 0], [math.nan, 0.95, 0.93], [0, 0, 0]),
    ],
)
def test_chain(policy, keep, dup, sim, group):
    assert_decisions(decide(3, pair_set(CHAIN), policy), (keep, dup, sim, group), 3)


def test_hand_made_graph_against_each_definition():
    # Two chains joined late, a star, a pair only reachable through a later row, a loner.
    pairs = {
        (0, 2): 0.91, (1, 2): 0.97, (2, 3): 0.92, (3, 4): 0.99,  # 0,1 join only via 2
        (5, 6): 0.90, (5, 7): 0.96, (6, 7): 0.94,  # triangle
        (8, 10): 0.93, (9, 10): 0.98,  # 8 and 9 meet only through 10
        (4, 11): 0.95,  # a chain tail
    }  # fmt: skip
    n = 13  # row 12 pairs with nothing
    for policy in POLICIES:
        assert_decisions(decide(n, pair_set(pairs), policy), SLOW[policy](n, pairs), n)
    ref = reference_decisions(n, pair_set(pairs))
    assert ref.keep.tolist()[:5] == [True, True, False, False, False]
    assert ref.group[11] == 0  # 11 -> 4 -> 3 -> 2 -> 0
    greedy = greedy_decisions(n, pair_set(pairs))
    assert greedy.keep.tolist()[:5] == [True, True, False, True, False]  # 3's partner 2 gone
    assert greedy.group.tolist()[:5] == [0, 1, 0, 3, 3]
    comp = component_decisions(n, pair_set(pairs))
    assert comp.keep.nonzero()[0].tolist() == [0, 5, 8, 12]
    assert comp.duplicate_similarity[1] == 0.97  # rule 3: row 1 pairs only with later row 2
    assert comp.duplicate_similarity[9] == 0.98  # rule 3 again: (8, 9) is no pair


@settings(max_examples=150, deadline=None)
@given(pair_graphs(), st.sampled_from(POLICIES))
def test_random_graphs_match_the_definitions(graph, policy):
    n, pairs = graph
    assert_decisions(decide(n, pair_set(pairs), policy), SLOW[policy](n, pairs), n)


@settings(max_examples=100, deadline=None)
@given(pair_graphs(), st.integers(0, 2**32 - 1), st.integers(1, 7))
def test_streamed_shuffled_repeated_chunks_give_identical_decisions(graph, seed, chunk):
    n, pairs = graph
    for policy in POLICIES:
        in_memory = decide(n, pair_set(pairs), policy)
        spilled = ShuffledSpill(pairs, seed, chunk)
        assert_identical(in_memory, decide(n, spilled, policy))
        if policy != "greedy":
            assert spilled.passes == 1  # streamed once, never materialised


def test_groups_are_kept_rows_and_consistent():
    rng = np.random.default_rng(5)
    n = 3000
    i = rng.integers(0, n - 1, size=6000)
    j = i + rng.integers(1, 40, size=i.size)
    ok = j < n
    scores = rng.random(int(ok.sum()))
    pairs = {(int(a), int(b)): float(s) for a, b, s in zip(i[ok], j[ok], scores, strict=True)}
    for policy in POLICIES:
        d = decide(n, pair_set(pairs), policy)
        assert d.keep[d.group].all()  # every group id is a kept row
        assert np.array_equal(d.group[d.keep], np.flatnonzero(d.keep))
        removed = ~d.keep
        assert (d.duplicate_of[removed] < np.flatnonzero(removed)).all()
        assert (d.duplicate_of[d.keep] == -1).all()
        assert np.isfinite(d.duplicate_similarity[removed]).all()
        assert np.isnan(d.duplicate_similarity[d.keep]).all()
        # large enough to exercise the vectorised paths against the definitions
        assert_decisions(d, SLOW[policy](n, pairs), n)


def test_greedy_keeps_no_two_paired_rows_and_covers_every_removed_row():
    rng = np.random.default_rng(9)
    n = 400
    keys = {(int(a), int(b)) for a, b in rng.integers(0, n, size=(1500, 2)) if a < b}
    pairs = {k: 0.9 for k in keys}
    d = greedy_decisions(n, pair_set(pairs))
    for i, j in keys:
        assert not (d.keep[i] and d.keep[j])
    for j in np.flatnonzero(~d.keep):
        assert d.keep[d.duplicate_of[j]] and (int(d.duplicate_of[j]), int(j)) in keys


def test_long_path_is_one_component():
    n = 20000
    idx = np.arange(n - 1)
    order = np.random.default_rng(1).permutation(n - 1)  # edges in scrambled order
    pairs = PairSet(idx[order], idx[order] + 1, np.full(n - 1, 0.9))
    d = component_decisions(n, pairs)
    assert d.keep.sum() == 1 and (d.group == 0).all()
    assert (reference_decisions(n, pairs).group == 0).all()
    assert greedy_decisions(n, pairs).keep.sum() == n // 2  # every other row of the path


@pytest.mark.parametrize("n", [0, 1, 5])
def test_no_pairs(n):
    for policy in POLICIES:
        d = decide(n, PairSet.empty(), policy)
        assert d.keep.all() and d.keep.shape == (n,)
        assert (d.duplicate_of == -1).all() and np.isnan(d.duplicate_similarity).all()
        assert d.group.tolist() == list(range(n))


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match=r"policy must be one of 'reference', 'greedy', "
                       r"'component'; got 'best'"):  # fmt: skip
        decide(3, PairSet.empty(), "best")


@pytest.mark.parametrize("policy", POLICIES)
def test_bad_pairs_and_inputs_are_refused(policy):
    with pytest.raises(ValueError, match=r"0 <= i < j < n = 3; got \(i, j\) = \(2, 1\)"):
        decide(3, PairSet(np.array([2]), np.array([1]), np.array([0.9])), policy)
    with pytest.raises(ValueError, match=r"n = 2; got \(i, j\) = \(0, 2\)"):
        decide(2, PairSet(np.array([0]), np.array([2]), np.array([0.9])), policy)
    with pytest.raises(ValueError, match="n \\(the number of rows\\)"):
        decide(-1, PairSet.empty(), policy)
    with pytest.raises(TypeError, match="iter_chunks"):
        decide(3, [(0, 1, 0.9)], policy)


class Chunks:
    """A pair source yielding the given chunks as they are."""

    def __init__(self, *chunks: list[tuple[int, int, float]]):
        self.chunks = chunks

    def iter_chunks(self, rows: int = 1 << 20):
        for part in self.chunks:
            yield PairSet(
                np.array([p[0] for p in part], dtype=np.int64),
                np.array([p[1] for p in part], dtype=np.int64),
                np.array([p[2] for p in part], dtype=np.float64),
            )


@pytest.mark.parametrize("policy", POLICIES)
def test_a_repeated_pair_with_different_scores_uses_the_highest_in_any_order(policy):
    one, two = [(0, 1, 0.91), (1, 2, 0.5)], [(0, 1, 0.93)]
    for source in (Chunks(one, two), Chunks(two, one), Chunks(one + two)):
        d = decide(3, source, policy)
        assert d.duplicate_of[1] == 0 and d.duplicate_similarity[1] == 0.93
