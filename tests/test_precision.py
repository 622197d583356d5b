"""Low-precision candidate arithmetic: the proven bound holds, and decisions never change.

``dedup_index.search.precision`` derives, per precision, a bound ``B`` on how far a tile
value may sit from the canonical score.  Here: adversarial unit vectors never leave
``[c - B, c + B]`` (every kernel this machine has), and every exact path (``blocked``'s
worker tiles, its single tile and its torch tiles, the index's cross search, the Ray
tile, ``partitioned``'s exact tiles) returns the same pairs, ``duplicate_of``,
``max_similarity`` and best-earlier scores, bit for bit, in every precision, on sets with
pairs planted at ``threshold +- 1e-7``, at the edge of each precision's candidate band,
and rows whose nearest neighbours crowd within the bound of each other.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_index import dedup_embeddings
from dedup_index.distributed.tiles import compute_tile
from dedup_index.search import as_unit_float32
from dedup_index.search import precision as prec
from dedup_index.search.blocked import blocked_search
from dedup_index.search.cross import cross_search
from dedup_index.search.dense import dense_search_all
from dedup_index.testing import mixed_adversarial

HAS_TORCH = importlib.util.find_spec("torch") is not None
LOW = ("bf16", "fp16")
THRESHOLD = 0.9


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch, tmp_path):
    """The timing cache goes to a temporary file, never the user's home."""
    monkeypatch.setenv("DEDUP_INDEX_PRECISION_CACHE", str(tmp_path / "precision.json"))


def _kernels(name: str) -> list[prec.Arithmetic]:
    """Every way this machine can compute ``name``: the emulated numpy kernel always,
    oneDNN's bf16 kernel when torch has it."""
    out = [prec.Arithmetic(name, "numpy", "cpu", 0)]
    native = prec._kernel_for(name, 0, "cpu", None)
    if native.kernel != "numpy":
        out.append(native)
    return out


# ------------------------------------------------------------------ adversarial vectors


def _unit64(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _adversarial(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Unit float32 rows built to make rounding errors large and aligned."""
    kinds = []
    spike = 1e-3 * rng.standard_normal((n, d))
    spike[np.arange(n), rng.integers(0, d, n)] = 1.0
    kinds.append(spike)  # one large coordinate
    half = np.ones((n, d))
    half[:, d // 2 :] = -1.0
    kinds.append(half + 0.05 * rng.standard_normal((n, d)))  # cancelling halves
    kinds.append(rng.standard_normal((n, d)))
    sparse = rng.standard_normal((n, d)) * (rng.random((n, d)) < 0.05)
    sparse[:, -1] += 0.1
    kinds.append(sparse)  # mostly zeros
    tiny = rng.standard_normal((n, d)) * 1e-7
    tiny[:, 0] = 1.0
    kinds.append(tiny)  # coordinates in fp16's subnormal range
    rows = as_unit_float32(np.concatenate(kinds))
    # Put every float32 just below a bf16 rounding midpoint (all errors round towards
    # zero, aligned with the coordinate: the worst case of x^.x^ - x.x).
    bits = rows.view(np.uint32).copy()
    bits[: 2 * n] = (bits[: 2 * n] & np.uint32(0xFFFF0000)) | np.uint32(0x7FFF)
    skew = bits.view(np.float32)
    return np.concatenate([rows, skew])


def _cancelling_partners(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows ``y`` with ``x . y`` near 0 but ``sum |x_i y_i|`` near 1."""
    y = np.abs(x) * np.where(rng.random(x.shape) < 0.5, 1.0, -1.0)
    return as_unit_float32(y.astype(np.float64))


@pytest.mark.parametrize("name", LOW)
@pytest.mark.parametrize("d", [7, 64, 512])
def test_low_precision_scores_stay_within_the_bound(name, d):
    rng = np.random.default_rng(d)
    rows = _adversarial(rng, 40, d)
    partners = np.concatenate([rows, _cancelling_partners(rows, rng)])
    norm = float(np.linalg.norm(rows.astype(np.float64), axis=1).max())
    assert norm < 1.01
    for kernel in _kernels(name):
        arith = dataclasses.replace(kernel, dim=d)
        a_rows, arith_a = arith.prepare(rows)
        p_rows, _ = arith.prepare(partners)
        with arith.session():
            s = arith.product(a_rows, p_rows, np.empty((len(rows), len(partners)), np.float32))
        # The exact products (float64: error ~D * 2**-53, nothing next to the bound); not
        # canonical_scores, which caps at 1.0 and these rows are not quite unit.
        c = rows.astype(np.float64) @ partners.astype(np.float64).T
        worst = float(np.abs(s.astype(np.float64) - c).max())
        u_o = arith.output_unit
        bound = prec.error_bound(name, d, norm=max(norm, 1.0), output_unit=u_o)
        assert worst <= bound, (kernel.kernel, worst, bound)
        # The measured-error bound too (rows and partners measured together).
        _, measured = arith_a.prepare(partners)
        tight = prec.error_bound(
            name, d, norm=max(norm, 1.0), row_error=measured.row_error, output_unit=u_o
        )
        assert worst <= tight, (kernel.kernel, worst, tight)
        if name == "bf16" and d == 512:
            assert worst > 0.3 * bound  # the vectors do push towards the bound


def test_rounding_is_round_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 2**-8 + 2**-20, 1 + 3 * 2**-8, -1 - 2**-9], np.float32)
    got = prec.round_to("bf16", x)
    assert got.tolist() == [1.0, 1.0, 1 + 2**-7, 1 + 2**-6, -1.0]
    if HAS_TORCH:
        import torch

        y = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
        ref = torch.from_numpy(y).bfloat16().float().numpy()
        assert np.array_equal(prec.round_to("bf16", y), ref)


def test_margins_cover_twice_the_bound():
    for name in ("fp32", *LOW):
        for d in (1, 16, 512, 2048):
            arith = prec.Arithmetic(name, "numpy", "cpu", d)
            b = prec.error_bound(name, d)
            assert arith.margin > b and arith.window > 2 * b
    bf = prec.Arithmetic("bf16", "numpy", "cpu", 512)
    assert 0.0078 < bf.bound < 0.0080
    assert prec.Arithmetic("fp16", "numpy", "cpu", 512).bound < 0.0011


# ------------------------------------------------------------------ decision sets


def _at_cosine(rng, base: np.ndarray, cos: float) -> np.ndarray:
    z = rng.standard_normal(base.shape[0])
    z -= (z @ base) * base
    z /= np.linalg.norm(z)
    return cos * base + np.sqrt(max(0.0, 1 - cos * cos)) * z


def _edge_rows(seed: int, d: int, threshold: float) -> np.ndarray:
    """Pairs at ``threshold +- 1e-7``, at the edges of every precision's candidate band,
    and rows whose neighbours crowd within the bf16 window of each other."""
    rng = np.random.default_rng(seed)
    offsets = [0.0, 1e-7, -1e-7, 3e-8]
    for name in LOW:
        m = prec.Arithmetic(name, "numpy", "cpu", d).margin
        offsets += [-m, -m + 1e-6, -m - 1e-6, -m / 2, -2 * m, m]
    rows = []
    for off in offsets:
        base = _unit64(rng.standard_normal((1, d)))[0]
        rows += [base, _at_cosine(rng, base, threshold + off)]
    window = prec.Arithmetic("bf16", "numpy", "cpu", d).window
    for _ in range(3):  # crowded neighbours: many columns within the window of the max
        base = _unit64(rng.standard_normal((1, d)))[0]
        rows.append(base)
        centre = threshold - 0.05 if rng.random() < 0.5 else threshold + 0.01
        for off in rng.uniform(-window, window, 12):
            rows.append(_at_cosine(rng, base, min(1.0, centre + off)))
        rows.append(rows[-1])  # an exact tie among them
    out = np.array(rows)
    return out[rng.permutation(len(out))]


def _rows(seed: int, d: int) -> np.ndarray:
    parts = [mixed_adversarial(seed, 150, d, THRESHOLD), _edge_rows(seed, d, THRESHOLD)]
    return as_unit_float32(np.concatenate(parts))


def _same(a, b) -> None:
    pairs_a, near_a, early_a = a
    pairs_b, near_b, early_b = b
    assert pairs_a.equals(pairs_b)
    assert np.array_equal(near_a, near_b)
    assert np.array_equal(early_a, early_b)


SEEDS = st.integers(0, 2**16)
SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(seed=SEEDS, d=st.sampled_from([16, 48]))
def test_blocked_is_bit_identical_in_every_precision(seed, d):
    E = _rows(seed, d)
    oracle = dense_search_all(E, THRESHOLD, nearest=True)
    ref = blocked_search(E, THRESHOLD, precision="fp32", tile=(64, 192), threads=2)
    _same(ref, oracle)
    if HAS_TORCH:
        _same(blocked_search(E, THRESHOLD, precision="fp32", engine="torch", tile=(32, 40)), ref)
    for name in LOW:
        _same(blocked_search(E, THRESHOLD, precision=name, tile=(64, 192), threads=2), ref)
        _same(blocked_search(E, THRESHOLD, precision=name, threads=1), ref)  # one tile
        if HAS_TORCH:  # the GPU tile loop, on the CPU: three tilings
            for tile in (96, (64, 192), (32, 40)):
                got = blocked_search(E, THRESHOLD, precision=name, engine="torch", tile=tile)
                _same(got, ref)


@SETTINGS
@given(seed=SEEDS)
def test_cross_search_and_ray_tiles_are_bit_identical(seed):
    E = _rows(seed, 32)
    m = E.shape[0] // 3
    live = np.random.default_rng(seed).random(m) < 0.9
    refs = {}
    for name in ("fp32", *LOW):
        cross = cross_search(
            E[m:], E[:m], THRESHOLD, rows=64, cols=96, base_live=live, precision=name
        )
        tile = compute_tile(E[:m], E[m:], THRESHOLD, start_a=0, start_c=m, precision=name)
        diag = compute_tile(E[:m], None, THRESHOLD, start_a=0, start_c=0, precision=name)
        got = (cross, tile, diag)
        if name == "fp32":
            refs = got
            continue
        for f in ("q", "b", "s", "query_best", "base_best"):
            assert np.array_equal(getattr(cross, f), getattr(refs[0], f)), (name, f)
        for k in (1, 2):
            _same(got[k], refs[k])


@SETTINGS
@given(seed=SEEDS)
def test_dedup_decisions_are_bit_identical_across_precisions(seed):
    E = _rows(seed, 24)
    exhaustive = {"n_clusters": 3, "n_probe": 3, "margin": 2.0}
    for backend, options in (("blocked", {"tile": (64, 128)}), ("partitioned", exhaustive)):
        results = [
            dedup_embeddings(
                E, THRESHOLD, backend=backend, precision=p, backend_options=options, policy=pol
            )
            for p in ("fp32", *LOW)
            for pol in ("reference",)
        ]
        ref = results[0]
        for got in results[1:]:
            assert got.pairs.equals(ref.pairs)
            for f in ("keep", "duplicate_of", "duplicate_similarity", "max_similarity"):
                assert np.array_equal(getattr(got, f), getattr(ref, f), equal_nan=True), f
            assert np.array_equal(got.max_earlier_similarity, ref.max_earlier_similarity)
        assert [r.info["precision"]["precision"] for r in results] == ["fp32", *LOW]


# ------------------------------------------------------------------ choosing


def test_precision_is_checked_and_applies_to_tile_backends_only():
    E = np.eye(4)
    with pytest.raises(ValueError, match="precision must be one of"):
        dedup_embeddings(E, 0.9, precision="fp8")
    with pytest.raises(ValueError, match="searches in float32"):
        dedup_embeddings(E, 0.9, backend="flat", precision="bf16")
    assert dedup_embeddings(E, 0.9, backend="flat", precision="fp32").n_removed == 0


def test_auto_picks_the_fastest_measured_kernel(monkeypatch):
    monkeypatch.setattr(prec, "_onednn_bf16", lambda: True)
    calls = []

    def fake(device):
        calls.append(device)
        return {"fp32": 200.0, "bf16": 500.0}

    monkeypatch.setattr(prec, "_time_kernels", fake)
    prec._RATES.clear()
    name, why, rates = prec.resolve_precision(work=1e13)
    assert name == "bf16" and "bf16 500" in why and rates["fp32"] == 200.0
    prec._RATES.clear()  # a new process: read from the disk cache, not timed again
    assert prec.resolve_precision(work=1e13)[0] == "bf16"
    assert calls == ["cpu"]
    monkeypatch.setattr(prec, "_time_kernels", lambda device: {"fp32": 200.0, "bf16": 210.0})
    assert prec.measure_rates(refresh=True)["bf16"] == 210.0
    assert prec.resolve_precision(work=1e13)[0] == "fp32"  # not 10% faster: float32
    assert prec.resolve_precision(work=1e6)[0] == "fp32"  # small: not even timed
    monkeypatch.setattr(prec, "_onednn_bf16", lambda: False)
    name, why, _ = prec.resolve_precision(work=1e13)
    assert name == "fp32" and "no torch oneDNN bf16" in why
    prec._RATES.clear()


def test_small_auto_searches_record_fp32_and_why():
    E = np.random.default_rng(0).standard_normal((300, 8))
    got = dedup_embeddings(E, 0.9, backend="blocked").info["precision"]
    assert got["precision"] == "fp32" and "small search" in got["why"]


def _cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "auto"])
def test_cuda_tiles_are_bit_identical_to_the_cpu(name):
    E = _rows(3, 64)
    ref = blocked_search(E, THRESHOLD, precision="fp32", tile=(64, 192), threads=2)
    got = blocked_search(E, THRESHOLD, device="cuda", precision=name, tile=128)
    _same(got, ref)
    res = dedup_embeddings(E, THRESHOLD, backend="blocked", device="cuda", precision=name)
    assert res.pairs.equals(ref[0]) and np.array_equal(res.max_similarity, ref[1])
    assert res.info["precision"]["device"].startswith("cuda")


@SETTINGS
@given(seed=SEEDS)
def test_tighten_first_cut_keeps_every_canonical_maximum(seed):
    """The first cut of ``tiles.tighten`` (values known to be within ``B`` of the
    canonical score): any low-precision values within the bound, adversarially placed
    (the true maximum pushed down by ``B``, its rivals pushed up), leave each row's
    canonical maximum among the entries kept."""
    from dedup_index.search.canonical import canonical_scores
    from dedup_index.search.tiles import tighten

    rng = np.random.default_rng(seed)
    d = 48
    arith = prec.Arithmetic("bf16", "onednn", "cpu", d, output_unit=2.0**-8)
    window = np.float32(arith.window)
    bound = arith.bound
    rows_e, partners = [], []
    base = _unit64(rng.standard_normal((40, d)))
    others = []
    for r, b in enumerate(base):  # each row: 30 partners crowding within the window
        for cos in 0.9 + rng.uniform(-window, window, 30):
            others.append(_at_cosine(rng, b, min(1.0, cos)))
            rows_e.append(r)
    E = as_unit_float32(np.concatenate([base, np.array(others)]))
    rows = np.array(rows_e, dtype=np.int64)
    partners = np.arange(40, E.shape[0], dtype=np.int64)
    exact = canonical_scores(E, rows, partners)
    best = np.full(40, -np.inf)
    np.maximum.at(best, rows, exact)
    is_max = exact == best[rows]
    push = np.where(is_max, -bound, bound) * rng.uniform(0.5, 1.0, rows.size)
    values = (exact + push).astype(np.float32)
    got_r, got_p = tighten(E, rows, partners, values, window=window)
    kept = np.full(40, -np.inf)
    np.maximum.at(kept, got_r, canonical_scores(E, got_r, got_p))
    assert np.array_equal(kept, best)
    assert got_r.size < rows.size  # and the cut did cut


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 0.05),
    st.integers(1, 4),
)
def test_pruning_near_best_entries_keeps_exactly_the_survivors(n, seed, slack, pieces):
    """``prune_near`` with any lower bound of the final maxima drops only what
    ``NearBest.survivors`` would drop: the survivors (and so the canonical maxima and the
    bits) are the same, and memory stays bounded (the 1M bf16 run kept every entry and
    grew past 20 GB)."""
    from dedup_index.search.blocked import prune_near
    from dedup_index.search.tiles import NearBest

    rng = np.random.default_rng(seed)
    delta = np.float32(0.01)
    m = 5 * n
    ids = rng.integers(0, n, m)
    other = rng.integers(0, 1000, m)
    vals = rng.uniform(0.8, 1.0, m).astype(np.float32)
    final = np.full(n, -np.inf, np.float32)
    np.maximum.at(final, ids, vals)
    lower = np.where(np.isfinite(final), final - np.float32(slack), final).astype(np.float32)
    cuts = np.sort(rng.integers(0, m + 1, pieces - 1))
    entries = [
        (ids[a:b], other[a:b], vals[a:b])
        for a, b in zip([0, *cuts], [*cuts, m], strict=True)
        if b > a
    ]

    def survivors(kept):
        near = NearBest(n, delta)
        near.best[:] = final
        for i, o, v in kept:
            near.rows.append(i)
            near.cols.append(o)
            near.vals.append(v)
        return near.survivors(values=True)

    want = survivors(entries)
    got = survivors(prune_near(entries, lower, delta))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)
    assert sum(len(e[0]) for e in prune_near(entries, final, delta)) == len(want[0])
