"""The public equivalence harness: every exact backend == dense oracle == the spec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dedup_index.testing as harness
from dedup_index import dedup_embeddings
from dedup_index.policy import POLICIES
from dedup_index.search import BACKENDS, canonical_scores
from dedup_index.testing import (
    EquivalenceReport,
    assert_equivalent,
    brute_force_reference,
    check_equivalence,
    compare_results,
    default_backends,
    dense_clusters,
    exact_duplicates,
    long_chain,
    mixed_adversarial,
    planted_near_threshold,
    zero_and_nonfinite_rows,
)

THRESHOLDS = [0.0, 0.5, 0.75, 0.8, 0.875, 0.9, 0.95, 0.99, 0.999, 1.0]
EXACT = default_backends()  # today flat and blocked; new exact backends join by themselves
# One thread per backend: tiny inputs spend most of their time waking thread pools, which
# on a busy machine costs 10-50x.  Thread counts are process-wide, so they are put back.
ONE_THREAD = {name: {"threads": 1} for name in EXACT}


@pytest.fixture(scope="module", autouse=True)
def _restore_thread_counts():
    try:
        import torch  # before faiss (see DESIGN.md)
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    import faiss

    before = faiss.omp_get_max_threads(), torch.get_num_threads() if torch else None
    yield
    faiss.omp_set_num_threads(before[0])
    if torch is not None:
        torch.set_num_threads(before[1])


def test_every_exact_backend_is_checked():
    assert "flat" in EXACT
    assert set(EXACT) <= set(BACKENDS) - {"auto", "dense"}
    assert "flat" in default_backends()


@st.composite
def generated_sets(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    threshold = draw(st.sampled_from(THRESHOLDS))
    d = draw(st.sampled_from([2, 3, 8, 33]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    kind = draw(st.sampled_from(["mixed", "copies", "chain", "clusters", "planted", "random"]))
    n = draw(st.integers(0, 80))
    rng = np.random.default_rng(seed)
    if kind == "mixed":
        E = mixed_adversarial(seed, n, d, threshold, dtype=dtype)
    elif kind == "copies":
        E = exact_duplicates(rng, n // 4, draw(st.integers(1, 6)), d, scaled=True, dtype=dtype)
    elif kind == "chain":
        step = draw(st.sampled_from([0.9, 0.95, 0.99, 0.999]))
        threshold = draw(st.sampled_from([step - 1e-3, step - 1e-6, step]))
        length = min(n, int(np.pi / np.arccos(step)) + 1)
        E = long_chain(rng, length, d, step, dtype=dtype)
    elif kind == "clusters":
        spread = np.sqrt(1 / threshold - 1) if threshold > 0 else 2.0
        E = dense_clusters(rng, draw(st.integers(0, 6)), draw(st.integers(1, 10)), d, spread)
    elif kind == "planted":
        E = planted_near_threshold(rng, n, d, threshold, dtype=dtype)
    else:
        E = rng.standard_normal((n, d)).astype(dtype)
    return E, threshold


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated_sets())
def test_backends_equal_the_oracle_on_adversarial_sets(case):
    E, threshold = case
    report = assert_equivalent(E, threshold, backends=EXACT, backend_options=ONE_THREAD)
    assert len(report.checks) == len(POLICIES) * 2 * len(EXACT) + 2  # + 2 brute-force rows


@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.0, 0.9, 1.0])
def test_tiny_inputs(n, threshold):
    E = np.random.default_rng(n).standard_normal((n, 5))
    report = assert_equivalent(E, threshold, backends=EXACT, backend_options=ONE_THREAD)
    assert report.ok and report.n == n
    if n == 2:
        copies = np.repeat(E[:1], 2, axis=0)
        assert_equivalent(copies, threshold, backends=EXACT, backend_options=ONE_THREAD)


def test_chain_under_each_policy_through_the_engine():
    E = long_chain(3, 3, 16, 0.95)
    assert canonical_scores(E, [0], [2])[0] < 0.94
    removed = {"reference": [1, 2], "greedy": [1], "component": [1, 2]}
    group = {"reference": [0, 0, 0], "greedy": [0, 0, 2], "component": [0, 0, 0]}
    for policy in POLICIES:
        r = dedup_embeddings(E, 0.94, backend="dense", policy=policy)
        assert r.removed.tolist() == removed[policy]
        assert r.group.tolist() == group[policy]
    assert_equivalent(E, 0.94, backends=EXACT, backend_options=ONE_THREAD)


def test_generators_do_what_they_say():
    chain = long_chain(0, 10, 8, 0.95, dtype=np.float64)
    ii, jj = np.triu_indices(10, k=1)
    s = canonical_scores(chain.astype(np.float32), ii, jj)
    assert (s[jj - ii == 1] >= 0.949).all() and (s[jj - ii > 1] < 0.9).all()
    with pytest.raises(ValueError, match="at most 10 rows"):
        long_chain(0, 11, 8, 0.95)
    # Planted on the float boundary: a threshold that is a float32 number is hit exactly.
    r = dedup_embeddings(planted_near_threshold(1, 40, 8, 0.75), 0.75, backend="dense")
    assert (r.pairs.s == 0.75).any() and (r.pairs.s >= 0.75).all()
    copies = exact_duplicates(2, 3, 4, 8, scaled=True)
    assert copies.shape == (12, 8) and copies.dtype == np.float32
    assert dedup_embeddings(copies, 0.999).n_removed == 9
    mixed = mixed_adversarial(4, 101, 8, 0.9, dtype=np.float64)
    assert mixed.shape == (101, 8) and mixed.dtype == np.float64
    assert dedup_embeddings(mixed, 0.9).n_removed > 10
    assert dense_clusters(5, 3, 4, 6, 0.3).shape == (12, 6)


def test_zero_and_nonfinite_rows_are_refused_with_their_rows_named():
    bad = zero_and_nonfinite_rows(0, 20, 6, n_zero=2, n_nan=1, n_inf=2)
    assert bad.zero_rows.size == 2 and bad.nonfinite_rows.size == 3
    named = ", ".join(str(r) for r in bad.nonfinite_rows)
    with pytest.raises(ValueError, match=rf"non-finite .* 3 row\(s\): {named}$"):
        dedup_embeddings(bad.embeddings, 0.9)
    with pytest.raises(ValueError, match=named):
        check_equivalence(bad.embeddings, 0.9)  # the oracle's refusal propagates
    zero = zero_and_nonfinite_rows(1, 20, 6, n_zero=3, n_nan=0, n_inf=0)
    named = ", ".join(str(r) for r in zero.zero_rows)
    with pytest.raises(ValueError, match=rf"3 zero-norm row\(s\).*: {named}$"):
        dedup_embeddings(zero.embeddings, 0.9, backend="flat")
    with pytest.raises(ValueError, match="only n = 2 rows"):
        zero_and_nonfinite_rows(0, 2, 4)


def test_brute_force_is_the_spec_and_the_oracle_matches_it():
    E = mixed_adversarial(7, 120, 8, 0.9)
    for score in ("nearest", "pairs"):
        literal = brute_force_reference(E, 0.9, score=score)
        oracle = dedup_embeddings(E, 0.9, backend="dense", score=score)
        assert compare_results(literal, oracle) == []
        assert literal.backend == "brute-force" and literal.policy == "reference"
    assert brute_force_reference(np.zeros((0, 3)), 0.5).n == 0
    assert brute_force_reference(np.ones((1, 3)), 0.5).max_similarity.tolist() == [0.0]
    report = check_equivalence(E, 0.9, backends=[], brute_force_max_rows=100)
    assert report.ok and report.checks == []  # above the brute-force limit: nothing to compare


def test_a_broken_result_is_reported_readably():
    E = mixed_adversarial(11, 60, 8, 0.9)
    good = dedup_embeddings(E, 0.9, backend="flat")
    oracle = dedup_embeddings(E, 0.9, backend="dense")
    assert compare_results(oracle, good) == []
    row = int(good.removed[0])
    keep = good.keep.copy()
    keep[row] = True
    near = good.max_similarity.copy()
    near[3] = np.nextafter(near[3], 2.0)  # one ulp off
    pairs = dataclasses.replace(good.pairs, s=good.pairs.s.copy())
    pairs.s[0] = np.nextafter(pairs.s[0], 0.0)
    broken = dataclasses.replace(good, keep=keep, max_similarity=near, pairs=pairs)
    found = compare_results(oracle, broken)
    assert [m.field for m in found] == ["keep", "pairs", "max_similarity"]
    text = "\n".join(str(m) for m in found)
    assert f"1 row(s) kept that the oracle removes: [{row}]" in text
    assert "flat vs dense (policy=reference, score=nearest)" in text
    assert f"first rows [3]: expected [{float(oracle.max_similarity[3])!r}]" in text
    assert "1 score(s) differ" in text and repr(float(oracle.pairs.s[0])) in text

    fewer = dataclasses.replace(good, pairs=dataclasses.replace(good.pairs, i=good.pairs.i[1:],
                                j=good.pairs.j[1:], s=good.pairs.s[1:]))  # fmt: skip
    (missing,) = compare_results(oracle, fewer)
    assert missing.field == "pairs" and "1 missing: (" in missing.detail

    report = EquivalenceReport(n=60, d=8, threshold=0.9, mismatches=found)
    assert not report.ok
    with pytest.raises(AssertionError, match="FAIL") as err:
        report.raise_if_failed()
    assert "kept that the oracle removes" in str(err.value)


def test_a_broken_backend_fails_the_whole_check(monkeypatch):
    def corrupted(embeddings, threshold, backend="auto", **kw):
        result = dedup_embeddings(embeddings, threshold, backend=backend, **kw)
        if backend == "flat" and kw.get("policy") == "greedy":
            group = result.group.copy()
            group[result.removed] = result.removed  # each removed row its own group: wrong
            return dataclasses.replace(result, group=group)
        return result

    E = mixed_adversarial(12, 60, 8, 0.9)
    E[1] = E[0]  # at least one removed row
    monkeypatch.setattr(harness, "dedup_embeddings", corrupted)
    report = check_equivalence(E, 0.9, backends=["flat"])
    failed = {(c.backend, c.policy, c.score) for c in report.checks if not c.ok}
    assert failed == {("flat", "greedy", "nearest"), ("flat", "greedy", "pairs")}
    assert {m.field for m in report.mismatches} == {"group"}
    text = str(report)
    assert text.splitlines()[0].endswith("FAIL (2 of 8 checks)")
    assert any(line.split() == ["flat", "dense", "greedy", "pairs", "FAIL"] for line in
               text.splitlines())  # fmt: skip
    assert "group: " in text and "first rows [1, " in text and "expected [0, " in text
    with pytest.raises(AssertionError, match="flat vs dense \\(policy=greedy"):
        report.raise_if_failed()


def test_backend_options_are_passed_and_a_raising_backend_is_a_failure():
    E = mixed_adversarial(13, 40, 8, 0.9)
    assert check_equivalence(E, 0.9, backends=["flat"], backend_options={"flat": {"threads": 1}}).ok
    report = check_equivalence(
        E, 0.9, backends=["flat"], policies=["reference"], scores=["pairs"],
        backend_options={"flat": {"no_such_option": 1}},
    )  # fmt: skip
    assert not report.ok
    (m,) = report.mismatches
    assert m.field == "error" and "raised TypeError" in m.detail and "no_such_option" in m.detail
    with pytest.raises(ValueError, match="policy must be one of"):
        check_equivalence(E, 0.9, policies=["best"])
