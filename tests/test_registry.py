"""The backend registry: every name runs through ``dedup_embeddings``, unknown names are
refused with the allowed ones, exact backends agree with ``dense`` bit for bit, and the
persistent index's ``flat`` (FAISS) cross search equals the numpy tiles'."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest

from dedup_index import dedup_embeddings
from dedup_index.search import (
    APPROXIMATE_BACKENDS,
    BACKENDS,
    DISTRIBUTED_BACKENDS,
    EXACT_BACKENDS,
    SearchResult,
    as_unit_float32,
    backends,
    check_backend,
    get_backend,
    search,
)
from dedup_index.search.cross import cross_search
from dedup_index.search.flat import flat_cross_search
from dedup_index.testing import compare_results, mixed_adversarial

THRESHOLD = 0.9
#: Options that make the approximate backends exhaustive (so exact) on small inputs.
EXHAUSTIVE = {
    "partitioned": {"n_clusters": 3, "n_probe": 3, "margin": 2.0},
    "ivf": {"nlist": 1},
    "hnsw": {"ef_search": 512},
}
#: ``ray`` starts a cluster: it is held to ``blocked`` in tests/test_distributed.py.
LOCAL = [name for name in BACKENDS if name not in DISTRIBUTED_BACKENDS]


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return mixed_adversarial(11, 120, 16, THRESHOLD)


def test_the_names_and_their_facts():
    assert BACKENDS[0] == "auto" and len(set(BACKENDS)) == len(BACKENDS)
    assert {"auto", "dense", "blocked", "flat", "partitioned", "ivf", "hnsw", "ray"} == set(
        BACKENDS
    )
    # Every name but auto is exact, approximate or distributed, and only one of them.
    assert sorted((*EXACT_BACKENDS, *APPROXIMATE_BACKENDS, *DISTRIBUTED_BACKENDS)) == sorted(
        set(BACKENDS) - {"auto"}
    )
    for name in BACKENDS:
        entry = get_backend(name)
        assert entry.name == name and entry.description and "\n" not in entry.description
    assert get_backend("auto").exact is None
    ray = get_backend("ray")
    assert ray.exact is True and ray.distributed and ray.replaces == ("auto", "blocked")
    assert set(ray.options) == {
        "address",
        "work_dir",
        "tile_rows",
        "threads_per_task",
        "max_retries",
        "precision",
        "gpus_per_task",
        "engine",
    }


@pytest.mark.parametrize("bad", ["gpu", "Blocked", "", None, 3])
def test_unknown_names_are_refused_with_the_allowed_ones(rows, bad):
    for call in (
        lambda: check_backend(bad),
        lambda: search(as_unit_float32(rows), THRESHOLD, backend=bad),
        lambda: dedup_embeddings(rows, THRESHOLD, backend=bad),
    ):
        with pytest.raises(ValueError, match="backend must be one of") as err:
            call()
        message = str(err.value)
        assert repr(bad) in message and "unknown backend" in message
        assert all(repr(name) in message for name in BACKENDS)


def test_unknown_options_are_refused_naming_the_backends_own():
    E = as_unit_float32(np.eye(3))
    with pytest.raises(TypeError, match=r"'blocked' does not take .*'nprobe'.*tile, engine"):
        search(E, THRESHOLD, backend="blocked", options={"nprobe": 4})
    with pytest.raises(TypeError, match="'dense' does not take"):
        search(E, THRESHOLD, backend="dense", options={"tile": 4})


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize("score", ["nearest", "pairs"])
def test_every_registered_name_runs_through_dedup_embeddings(rows, name, score):
    oracle = dedup_embeddings(rows, THRESHOLD, backend="dense", score=score)
    got = dedup_embeddings(
        rows, THRESHOLD, backend=name, score=score, backend_options=EXHAUSTIVE.get(name)
    )
    assert got.backend == ("blocked" if name == "auto" else name)
    assert got.n == len(rows)
    # Exhaustive settings make every backend exact here: the oracle's result bit for bit.
    assert not compare_results(oracle, got)


@pytest.mark.parametrize("name", EXACT_BACKENDS)
def test_exact_backends_agree_with_dense_bit_for_bit(name):
    for seed, n, d, t in [(1, 90, 8, 0.9), (2, 60, 33, 0.99), (3, 40, 3, 1.0), (4, 1, 4, 0.5)]:
        E = as_unit_float32(mixed_adversarial(seed, n, d, t))
        dense = search(E, t, backend="dense")
        got = search(E, t, backend=name, threads=1)
        assert isinstance(got, SearchResult) and got.exact and got.backend == name
        assert got.pairs.equals(dense.pairs)
        assert np.array_equal(got.nearest, dense.nearest)
        if got.earlier is not None:
            assert np.array_equal(got.earlier, dense.earlier)


def test_progress_adds_up_to_the_rows(rows):
    E = as_unit_float32(rows)
    for name in LOCAL:
        for nearest in (True, False):
            done: list[int] = []
            search(
                E,
                THRESHOLD,
                backend=name,
                nearest=nearest,
                options=EXHAUSTIVE.get(name),
                progress=done.append,
            )
            assert sum(done) == len(E), (name, nearest)


def test_the_index_flat_cross_search_equals_the_numpy_tiles():
    rng = np.random.default_rng(5)
    for seed in range(12):
        t = [0.5, 0.9, 0.99, 1.0][seed % 4]
        E = as_unit_float32(mixed_adversarial(seed, 150, [4, 16, 33][seed % 3], t))
        m = int(rng.integers(0, len(E)))
        live = rng.random(m) > 0.2 if seed % 2 else None
        ref = cross_search(E[m:], E[:m], t, base_live=live, rows=8, cols=16)
        # k=2 and small tiles: lists cut short, completed by range searches.
        for options in ({}, {"k": 2, "db_block": 7, "query_block": 5}):
            got = flat_cross_search(E[m:], E[:m], t, base_live=live, **options)
            for field in ("q", "b", "s", "query_best", "base_best"):
                assert np.array_equal(getattr(ref, field), getattr(got, field)), (seed, field)


def test_the_worked_example_holds():
    assert doctest.testmod(backends).failed == 0


def test_the_registry_imports_nothing_heavy():
    probe = (
        "import sys; from dedup_index.search import backends; backends.get_backend('ray'); "
        "print(sorted(m for m in ('torch', 'faiss', 'ray', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
