"""``measure_recall``: exact pairs of a row sample, compared with what a search found."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from dedup_index.search import PairSet, as_unit_float32
from dedup_index.search.dense import dense_search
from dedup_index.search.recall import (
    RecallReport,
    exact_pairs_of_rows,
    measure_recall,
    measure_recall_of,
    sample_rows,
)


@pytest.fixture(autouse=True)
def _restore_faiss_threads():
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def with_duplicates(seed: int = 0, n: int = 300, d: int = 16) -> np.ndarray:
    """``n`` random unit rows plus exact and near copies of 60 of them."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    picks = rng.choice(n, 60, replace=False)
    copies = base[picks[:30]]
    near = base[picks[30:]] + 0.05 * rng.standard_normal((30, d))
    E = np.vstack([base, copies, near, copies[:10]])
    return as_unit_float32(E[rng.permutation(len(E))])


def drop(pairs: PairSet, mask: np.ndarray) -> PairSet:
    keep = ~mask
    return PairSet(pairs.i[keep], pairs.j[keep], pairs.s[keep])


THRESHOLD = 0.95


def test_recall_is_one_for_the_exact_pairs():
    unit = with_duplicates()
    exact, _ = dense_search(unit, THRESHOLD, nearest=False)
    for sample in (50, 1000):
        report = measure_recall(unit, THRESHOLD, exact, sample=sample)
        assert report.recall == 1.0 and report.precision == 1.0
        assert report.n_missed == 0 and report.n_found == report.n_exact > 0


def test_all_rows_sampled_gives_every_oracle_pair():
    unit = with_duplicates(seed=1)
    exact, _ = dense_search(unit, THRESHOLD, nearest=False)
    got = exact_pairs_of_rows(unit, THRESHOLD, np.arange(unit.shape[0]))
    assert got.equals(exact)
    report = measure_recall(unit, THRESHOLD, exact, sample=unit.shape[0])
    assert report.sampled_rows == unit.shape[0]
    assert report.n_exact == len(exact)


def test_recall_drops_by_the_pairs_removed():
    unit = with_duplicates(seed=2)
    n = unit.shape[0]
    exact, _ = dense_search(unit, THRESHOLD, nearest=False)
    removed = np.zeros(len(exact), dtype=bool)
    removed[::3] = True
    found = drop(exact, removed)
    # All rows sampled: exactly the removed share is missing.
    report = measure_recall(unit, THRESHOLD, found, sample=n)
    assert report.n_missed == int(removed.sum())
    assert report.recall == (len(exact) - removed.sum()) / len(exact)
    assert report.precision == 1.0 and report.n_found == len(found)
    # A sample: only pairs that touch a sampled row count, on both sides.
    rows = sample_rows(n, 40, seed=5)
    touched = np.isin(exact.i, rows) | np.isin(exact.j, rows)
    report = measure_recall(unit, THRESHOLD, found, sample=40, seed=5)
    assert report.sampled_rows == 40
    assert report.n_exact == int(touched.sum())
    assert report.n_missed == int((touched & removed).sum())
    assert report.n_found == int((touched & ~removed).sum())
    assert report.recall == pytest.approx((touched & ~removed).sum() / touched.sum(), abs=0)


def test_precision_counts_pairs_that_are_not_duplicates():
    unit = with_duplicates(seed=3)
    exact, _ = dense_search(unit, THRESHOLD, nearest=False)
    # Add two pairs far below the threshold (row 0 with the rows least like it).
    far = np.argsort(unit @ unit[0])[:2]
    i = np.concatenate([exact.i, np.zeros(2, np.int64)])
    j = np.concatenate([exact.j, far.astype(np.int64)])
    found = PairSet(i, j, np.zeros(i.size))
    report = measure_recall(unit, THRESHOLD, found, sample=unit.shape[0])
    assert report.recall == 1.0
    assert report.n_found == len(exact) + 2
    assert report.precision == len(exact) / (len(exact) + 2)


def test_float16_rounded_copy():
    unit16 = with_duplicates(seed=4).astype(np.float16)
    exact16, _ = dense_search(unit16, THRESHOLD, nearest=False)
    report = measure_recall(unit16, THRESHOLD, exact16, sample=unit16.shape[0])
    assert report.n_exact == len(exact16) > 0
    assert report.recall == 1.0 and report.precision == 1.0


class Rows:
    """An array-like with only ``shape`` and ``__getitem__`` (like an embedding store)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape = data.shape

    def __getitem__(self, key):
        return self.data[key].copy()


def test_array_like_input_and_empty_cases():
    unit = with_duplicates(seed=5)
    exact, _ = dense_search(unit, THRESHOLD, nearest=False)
    found = drop(exact, np.arange(len(exact)) % 4 == 0)
    a = measure_recall(unit, THRESHOLD, found, sample=100, seed=2)
    b = measure_recall(Rows(unit), THRESHOLD, found, sample=100, seed=2)
    assert (a.recall, a.n_exact, a.n_found, a.n_missed) == (
        b.recall,
        b.n_exact,
        b.n_found,
        b.n_missed,
    )
    empty = measure_recall(np.zeros((0, 4), np.float32), 0.9, PairSet.empty())
    assert (empty.recall, empty.precision, empty.n_exact, empty.sampled_rows) == (1.0, 1.0, 0, 0)


def test_measure_recall_of_backends():
    rng = np.random.default_rng(6)
    unit = with_duplicates(seed=6)
    E = unit.astype(np.float64) * rng.uniform(0.5, 2.0, (unit.shape[0], 1))
    ivf = measure_recall_of(E, THRESHOLD, "ivf", sample=100, nlist=4, nprobe=4, threads=1)
    assert isinstance(ivf, RecallReport) and ivf.recall == 1.0 and ivf.n_exact > 0
    hnsw = measure_recall_of(E, THRESHOLD, "hnsw", sample=100, ef_search=400, threads=1)
    assert hnsw.recall == 1.0 and hnsw.n_exact == ivf.n_exact
    flat = measure_recall_of(E, THRESHOLD, "flat", sample=100)
    assert flat.recall == 1.0 and flat.n_exact == ivf.n_exact
    line = str(flat)
    assert "\n" not in line and line.startswith("recall 1.0000")
    with pytest.raises(ValueError, match="unknown backend"):
        measure_recall_of(E, THRESHOLD, "nope")
