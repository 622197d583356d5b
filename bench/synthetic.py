"""Synthetic CLIP-like embeddings for the benchmarks.

Real CLIP image embeddings of a photo collection are far from isotropic: they share a
strong common direction, so two unrelated images typically have cosine similarity around
0.5-0.8, images of the same kind of scene sit higher, and true near-duplicates (re-encodes,
resizes, crops, exact copies) sit above 0.93.  :func:`clustered_unit_vectors` builds that
shape from

    x_i = a_i * m + b * c_k(i) + g_k(i) * z_i

with ``m`` a shared mean direction, ``c_k`` one random centre per cluster (cluster sizes
are Zipf-like), ``z_i`` isotropic noise of norm ~1, ``a_i`` drawn per row (it spreads the
unrelated-pair similarity) and ``g_k`` per cluster (tightness).  About ``dup_fraction``
of the rows are then replaced by planted near-copies of other rows at cosine 0.93-0.999
(a fifth of them exact copies), in groups of 1-3 copies per source, and the rows are
shuffled.

Measured with ``python bench/synthetic.py`` (n = 20000, d = 512, seed = 0; cosine of
400k random pairs of distinct rows, and of 93k random pairs of non-copy rows that share a
cluster):

    random-pair cosine   p1 0.461  p5 0.500  p25 0.558  p50 0.599  p75 0.640  p95 0.697  p99 0.800
    same-cluster cosine  p1 0.664  p5 0.702  p25 0.758  p50 0.790  p75 0.817  p95 0.847  p99 0.862
    pairs >= 0.9: 1352 (1351 involve a planted copy); planted copies: 1000;
    rows removed at 0.9: 997 (5.0%)

so unrelated pairs are mostly 0.5-0.7 (the p99 of 0.8 comes from the large Zipf clusters),
same-cluster pairs 0.66-0.87, and the pairs at or above 0.9 are all but one planted.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered_unit_vectors(
    n: int,
    d: int = 512,
    seed: int = 0,
    *,
    rows_per_cluster: int = 200,
    dup_fraction: float = 0.05,
    exact_fraction: float = 0.2,
    dup_cos: tuple[float, float] = (0.93, 0.999),
    mean_weight: tuple[float, float] = (0.8, 1.3),
    centre_weight: float = 0.55,
    noise_weight: tuple[float, float] = (0.55, 0.75),
) -> np.ndarray:
    """``(n, d)`` float32 unit rows shaped like CLIP embeddings, with planted near-duplicates.

    Args:
        n: rows.
        d: dimension (512 is CLIP ViT-B/32).
        seed: everything is a function of ``seed``.
        rows_per_cluster: average cluster size before the planted copies.
        dup_fraction: fraction of rows that are planted copies of another row.
        exact_fraction: fraction of the planted copies that are bit-exact copies.
        dup_cos: range of the cosine of a (non-exact) planted copy to its source.
        mean_weight: range of ``a_i``, the weight of the shared direction.
        centre_weight: ``b``, the weight of the cluster centre.
        noise_weight: range of ``g_k``, the per-cluster noise weight.
    """
    rows, _, _ = _generate(
        n,
        d,
        seed,
        rows_per_cluster=rows_per_cluster,
        dup_fraction=dup_fraction,
        exact_fraction=exact_fraction,
        dup_cos=dup_cos,
        mean_weight=mean_weight,
        centre_weight=centre_weight,
        noise_weight=noise_weight,
    )
    return rows


def _generate(
    n: int,
    d: int,
    seed: int,
    *,
    rows_per_cluster: int,
    dup_fraction: float,
    exact_fraction: float,
    dup_cos: tuple[float, float],
    mean_weight: tuple[float, float],
    centre_weight: float,
    noise_weight: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, each row's cluster label, and a mask of the planted copies."""
    rng = np.random.default_rng(seed)
    n_dup = int(round(dup_fraction * n)) if n > 1 else 0
    n_base = n - n_dup

    mean = _unit(rng.standard_normal(d))
    n_clusters = max(1, n_base // rows_per_cluster)
    centres = _unit(rng.standard_normal((n_clusters, d)))
    sizes = 1.0 / np.arange(1, n_clusters + 1) ** 0.7  # Zipf-like cluster sizes
    label = rng.choice(n_clusters, size=n_base, p=sizes / sizes.sum())
    a = rng.uniform(*mean_weight, size=n_base)
    g = rng.uniform(*noise_weight, size=n_clusters)[label]
    z = rng.standard_normal((n_base, d)) / np.sqrt(d)
    base = _unit(a[:, None] * mean + centre_weight * centres[label] + g[:, None] * z)

    # Planted copies: sources drawn from the base rows, 1-3 copies each, until n_dup.
    sources: list[int] = []
    while len(sources) < n_dup:
        src = int(rng.integers(n_base))
        sources.extend([src] * int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1])))
    src_idx = np.asarray(sources[:n_dup], dtype=np.int64)
    u = base[src_idx]
    w = rng.standard_normal((n_dup, d))
    w -= np.einsum("ij,ij->i", w, u)[:, None] * u  # orthogonal to the source
    w = _unit(w)
    cos = rng.uniform(*dup_cos, size=n_dup)
    copies = cos[:, None] * u + np.sqrt(1.0 - cos**2)[:, None] * w

    out = np.concatenate([base, _unit(copies)]).astype(np.float32)
    exact = rng.random(n_dup) < exact_fraction
    out[n_base:][exact] = out[src_idx[exact]]  # bit-exact copies of the float32 source
    labels = np.concatenate([label, label[src_idx]])
    is_copy = np.arange(n) >= n_base
    perm = rng.permutation(n)
    out, labels, is_copy = out[perm], labels[perm], is_copy[perm]
    # Renormalise in float64 and round once, as dedup_index.search.as_unit_float32 does.
    norms = np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True)
    rows = np.ascontiguousarray((out.astype(np.float64) / norms).astype(np.float32))
    return rows, labels, is_copy


def clustered_unit_vector_chunks(
    n: int, d: int = 512, seed: int = 0, *, chunk: int = 65_536, **params
):
    """The same model as :func:`clustered_unit_vectors`, generated ``chunk`` rows at a
    time with memory ``O(chunk * d + clusters * d)``: yields float32 unit row blocks that
    add up to ``n`` rows.  For the 1M and 10M stores (the whole-array generator peaks at
    ~17.5 GiB at 1M).  Not the same rows as :func:`clustered_unit_vectors` for the same
    seed: the mean direction, the cluster centres and their Zipf sizes are shared by all
    chunks, but each chunk draws its own rows, plants its copies among its own rows
    (sources never cross a chunk) and is shuffled on its own.  Every chunk is a function
    of ``(seed, chunk index)`` alone."""
    opts = {**DEFAULTS, **params}
    rng = np.random.default_rng(seed)
    n_dup_total = int(round(opts["dup_fraction"] * n)) if n > 1 else 0
    n_clusters = max(1, (n - n_dup_total) // opts["rows_per_cluster"])
    mean = _unit(rng.standard_normal(d))
    centres = _unit(rng.standard_normal((n_clusters, d))).astype(np.float32)
    sizes = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
    p = sizes / sizes.sum()
    g_cluster = rng.uniform(*opts["noise_weight"], size=n_clusters)
    for k, a0 in enumerate(range(0, n, chunk)):
        m = min(chunk, n - a0)
        r = np.random.default_rng([seed, k + 1])
        n_dup = int(round(opts["dup_fraction"] * m)) if m > 1 else 0
        n_base = m - n_dup
        label = r.choice(n_clusters, size=n_base, p=p)
        a = r.uniform(*opts["mean_weight"], size=n_base)
        z = r.standard_normal((n_base, d)) / np.sqrt(d)
        base = a[:, None] * mean + opts["centre_weight"] * centres[label].astype(np.float64)
        base += g_cluster[label][:, None] * z
        base = _unit(base)
        del z
        src = r.integers(n_base, size=n_dup) if n_base else np.zeros(0, np.int64)
        u = base[src]
        w = r.standard_normal((n_dup, d))
        w -= np.einsum("ij,ij->i", w, u)[:, None] * u
        w = _unit(w) if n_dup else w
        cos = r.uniform(*opts["dup_cos"], size=n_dup)
        copies = cos[:, None] * u + np.sqrt(1.0 - cos**2)[:, None] * w
        out = np.concatenate([base, _unit(copies) if n_dup else copies]).astype(np.float32)
        exact = r.random(n_dup) < opts["exact_fraction"]
        out[n_base:][exact] = out[src[exact]]
        out = out[r.permutation(m)]
        norms = np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True)
        yield np.ascontiguousarray((out.astype(np.float64) / norms).astype(np.float32))


DEFAULTS = dict(
    rows_per_cluster=200,
    dup_fraction=0.05,
    exact_fraction=0.2,
    dup_cos=(0.93, 0.999),
    mean_weight=(0.8, 1.3),
    centre_weight=0.55,
    noise_weight=(0.55, 0.75),
)


def describe(n: int = 20_000, d: int = 512, seed: int = 0, threshold: float = 0.9) -> None:
    """Print the similarity distribution quoted in the module docstring."""
    import dedup_index

    E, label, is_copy = _generate(n, d, seed, **DEFAULTS)
    rng = np.random.default_rng(seed + 1)
    qs = [1, 5, 25, 50, 75, 95, 99]

    def show(name: str, s: np.ndarray) -> None:
        body = "  ".join(f"p{q} {v:.3f}" for q, v in zip(qs, np.percentile(s, qs), strict=True))
        print(f"{name:20s} {body}   ({s.size} pairs)")

    def cos(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", E[i].astype(np.float64), E[j].astype(np.float64))

    i = rng.integers(n, size=400_000)
    j = rng.integers(n, size=400_000)
    ok = i != j
    show("random-pair cosine", cos(i[ok], j[ok]))
    ii, jj = rng.integers(n, size=(2, 4_000_000))
    same = (ii != jj) & (label[ii] == label[jj]) & ~is_copy[ii] & ~is_copy[jj]
    show("same-cluster cosine", cos(ii[same][:200_000], jj[same][:200_000]))
    res = dedup_index.dedup_embeddings(E, threshold, backend="flat", score="pairs")
    planted = int((is_copy[res.pairs.i] | is_copy[res.pairs.j]).sum())
    print(
        f"pairs >= {threshold}: {len(res.pairs)} ({planted} involve a planted copy); "
        f"planted copies: {int(is_copy.sum())}; rows removed at {threshold}: "
        f"{res.n_removed} ({res.n_removed / n:.1%})"
    )


if __name__ == "__main__":
    describe()
