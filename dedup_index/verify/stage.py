"""The verification stage: candidate pairs in, verified pairs (and the evidence) out.

:func:`verify_pairs` takes the candidate pairs of an embedding search (a
:class:`~dedup_index.search.pairs.PairSet`, or a spilled pair file) and the image values
of the rows, and confirms each pair in two steps:

1. **Hash**: every image in a candidate pair is decoded once and given a 256-bit DCT hash
   (and its mirror image's, :mod:`.hashing`).  A pair within ``hash_max_distance`` bits is
   verified there: an exact or near-exact copy, no local features needed.
2. **Geometry**: only images in a pair the hash did not confirm are decoded again for SIFT
   features (:mod:`.geometry`); each such pair is matched (ratio test, RANSAC affine,
   mirror-aware) and verified when it has ``min_inliers`` inliers.

Decoding, hashing and feature extraction run in worker processes (``num_workers``);
matching runs in this process.  The results do not depend on the number of workers.

An image that cannot be loaded again (moved, corrupt) or is too small for features leaves
its pairs unverified, with the reason in ``Verification.how``: never an exception.

:func:`verify_result` applies the stage to a :class:`~dedup_index.dedup.DedupResult`: the
policy is re-run on the verified pairs only, so the reference ``i < j`` semantics hold on
verified pairs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..encode.models import candidate_threshold
from ..io import DEFAULT_MAX_PIXELS, try_load_image
from ..search.pairs import PairSet, concat_pairsets
from ..validation import available_cpus, check_choice, check_non_negative_int
from .geometry import (
    Features,
    GeometricOptions,
    extract_features,
    match_features,
    prepare_opencv,
)
from .hashing import HASH_BITS, hash_distance, perceptual_hashes

logger = logging.getLogger(__name__)

#: Verification methods by name; the first is the default (no verification).
VERIFY_METHODS = ("none", "geometric")

#: Default Hamming distance (of 256 bits) at or below which the hash alone verifies a pair.
HASH_MAX_DISTANCE = 16

#: Below this many images to read, ``num_workers=None`` reads them in this process.
_MIN_IMAGES_FOR_WORKERS = 16


def check_verify(verify: Any) -> str:
    """``verify`` if it names a verification method; else ``ValueError``."""
    return check_choice(verify, VERIFY_METHODS, "verify")


@dataclass
class Verification:
    """Every candidate pair with its evidence, and the verified ones.

    Per candidate (arrays in the order of ``candidates``, sorted by ``(i, j)``):
    ``hash_distance`` (bits of :data:`~.hashing.HASH_BITS`, -1 when an image could not
    be hashed), ``inliers`` (RANSAC inliers, -1 when geometry did not run: the hash
    settled the pair or an image failed), ``matches`` (ratio-test matches),
    ``agreement`` (the photometric check, NaN when not run), ``mirrored``
    (the mirror image matched), ``verified``, and ``how``: ``"hash"``, ``"geometry"``
    (verified), ``"rejected"`` (geometry ran, too few inliers), or an image's failure
    reason (``"load_error: ..."``, ``"too_small"``, ``"no_features"``).
    """

    candidates: PairSet
    hash_distance: np.ndarray
    inliers: np.ndarray
    matches: np.ndarray
    agreement: np.ndarray
    mirrored: np.ndarray
    verified: np.ndarray
    how: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    #: The parameters the pairs were judged by (for :meth:`reasons`).
    options: GeometricOptions = field(default_factory=GeometricOptions)
    hash_max_distance: int = HASH_MAX_DISTANCE

    @property
    def pairs(self) -> PairSet:
        """The verified pairs (with their embedding similarity), sorted by ``(i, j)``."""
        v = self.verified
        c = self.candidates
        return PairSet(c.i[v], c.j[v], c.s[v])

    def __len__(self) -> int:
        return len(self.candidates)

    def to_frame(self):  # -> pandas.DataFrame
        """One row per candidate: ``i, j, similarity, hash_distance, inliers, matches,
        agreement, mirrored, verified, how``."""
        frame = self.candidates.to_frame()
        frame["hash_distance"] = self.hash_distance
        frame["inliers"] = self.inliers
        frame["matches"] = self.matches
        frame["agreement"] = self.agreement
        frame["mirrored"] = self.mirrored
        frame["verified"] = self.verified
        frame["how"] = self.how
        return frame

    def reasons(self) -> list[str]:
        """Per candidate, in words, why it was verified or not (for the report)."""
        opts, out = self.options, []
        for k in range(len(self)):
            how, d, n = str(self.how[k]), int(self.hash_distance[k]), int(self.inliers[k])
            agree, flip = float(self.agreement[k]), " (mirrored)" if self.mirrored[k] else ""
            if how == "hash":
                why = f"hash: {d} of {HASH_BITS} bits differ (<= {self.hash_max_distance}){flip}"
            elif how in ("geometry", "rejected"):
                why = f"{n} RANSAC inliers of {int(self.matches[k])} matches"
                if n < opts.min_inliers:
                    why += f" (< {opts.min_inliers} needed)"
                elif how == "rejected":
                    why += (
                        f", but the pictures disagree under the model: agreement "
                        f"{agree:.2f} < {opts.min_agreement:g}"
                    )
                elif np.isfinite(agree):
                    why += f", agreement {agree:.2f}"
                why += flip
            else:
                why = f"not verifiable: {how}"
            out.append(why)
        return out

    def summary(self) -> str:
        c = self.counts
        return (
            f"{len(self)} candidate pairs: {int(self.verified.sum())} verified "
            f"({c.get('by_hash', 0)} by the hash, {c.get('by_geometry', 0)} by geometry), "
            f"{c.get('rejected', 0)} rejected, {c.get('unverifiable', 0)} unverifiable; "
            f"{c.get('images_hashed', 0)} images hashed, {c.get('images_featured', 0)} "
            f"given features ({sum(self.seconds.values()):.2f} s)"
        )


# ------------------------------------------------------------------ work done in workers


def _hash_task(value: Any, image_root: Any, max_pixels: int | None):
    image, failure = try_load_image(value, image_root=image_root, max_pixels=max_pixels)
    if failure is not None:
        return None, f"load_error: {failure}"
    return perceptual_hashes(image), None


def _features_task(value: Any, image_root: Any, max_pixels: int | None, options):
    image, failure = try_load_image(value, image_root=image_root, max_pixels=max_pixels)
    if failure is not None:
        return None, f"load_error: {failure}"
    features = extract_features(image, options)
    if features is None:
        return None, "too_small"
    if len(features) == 0:
        return None, "no_features"
    return features, None


#: Features of the images being matched, for forked matching workers (inherited, not sent).
_FEATURES: dict[int, Features] = {}
_LIMITS: list = []


def _worker_init() -> None:
    """One BLAS thread per worker (matching is one small GEMM a pair; threads fighting
    over two cores made it 6x slower).  OpenCV is single-threaded already (see
    :func:`.geometry._cv2`): calling ``cv2.setNumThreads`` in a forked child whose parent
    had OpenCV's thread pool running hangs it."""
    from threadpoolctl import threadpool_limits

    _LIMITS.append(threadpool_limits(1, user_api="blas"))


def _match_task(pair: tuple[int, int], options: GeometricOptions):
    return match_features(_FEATURES[pair[0]], _FEATURES[pair[1]], options)


def _workers(num_workers: int | None, items: int) -> int:
    if num_workers is not None:
        return num_workers
    if items < _MIN_IMAGES_FOR_WORKERS:
        return 0
    return min(max(available_cpus() - 1, 1), 4)


def _context(fork_only: bool = False):
    """fork where there is one (as the embedding DataLoader does): no re-import of the
    caller's ``__main__``, workers start at once, and they inherit :data:`_FEATURES`;
    spawn elsewhere (None when ``fork_only``)."""
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None if fork_only else multiprocessing.get_context("spawn")


def _run(
    task: Callable,
    values: list,
    args: tuple,
    num_workers: int | None,
    *,
    fork_only: bool = False,
) -> list:
    """``task(value, *args)`` for each value, in order: here or in worker processes."""
    if not values:
        return []
    workers = _workers(num_workers, len(values))
    context = _context(fork_only) if workers else None
    if context is None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # the same arithmetic as in a worker
            return [task(v, *args) for v in values]
    chunk = max(1, min(64, len(values) // (4 * workers)))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        return list(pool.map(task, values, *[[a] * len(values) for a in args], chunksize=chunk))


def _cached(task, rows, values, args, num_workers, cache, fps, kind) -> list:
    """:func:`_run` over ``values[rows]``, taking what ``cache`` holds and storing the rest."""
    rows = [int(r) for r in rows]
    if cache is None:
        return _run(task, [values[r] for r in rows], args, num_workers)
    get = cache.get_hash if kind == "hash" else cache.get_features
    out: dict[int, tuple] = {}
    for r in rows:
        hit = get(fps.get(r))
        if hit is not None:
            out[r] = (hit, None) if kind == "hash" else hit
    missing = [r for r in rows if r not in out]
    computed = _run(task, [values[r] for r in missing], args, num_workers)
    for r, result in zip(missing, computed, strict=True):
        out[r] = result
        if kind == "hash":
            if result[1] is None:
                cache.put_hash(fps.get(r), result[0])
        else:
            cache.put_features(fps.get(r), *result)
    return [out[r] for r in rows]


# ------------------------------------------------------------------ the stage


def verify_pairs(
    pairs: Any,
    values: Sequence[Any],
    *,
    image_root: str | os.PathLike | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    hash_max_distance: int = HASH_MAX_DISTANCE,
    options: GeometricOptions | None = None,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    unavailable: Mapping[int, str] | None = None,
) -> Verification:
    """Verify candidate pairs by a perceptual hash, then local features and geometry.

    Args:
        pairs: candidate pairs ``i < j`` over rows ``0..len(values)-1``: a
            :class:`~dedup_index.search.pairs.PairSet` or anything with ``iter_chunks``.
        values: each row's image value (a path, bytes, a PIL image, ... anything
            :func:`~dedup_index.io.try_load_image` takes).
        image_root, max_pixels: as for loading images elsewhere.
        hash_max_distance: a pair whose hashes differ in at most this many of 256 bits is
            verified without features (-1: never; the hash is still recorded).
        options: feature and matching parameters (:class:`~.geometry.GeometricOptions`).
        num_workers: processes that decode, hash and extract features: ``None`` picks
            ``min(CPUs - 1, 4)`` (in this process for a handful of images), ``0`` runs
            here.  Results do not depend on it.
        cache_dir: keep each image's hash and features under ``<cache_dir>/verify/``
            (:class:`~.cache.FeatureCache`, keyed like the embedding cache), so a rerun
            decodes and extracts nothing it has seen.
        unavailable: rows whose image is not at hand (``{row: reason}``, e.g. an index
            row keyed by a content hash): not loaded; their pairs stay unverified with
            that reason, like an image that fails to load.
    """
    if isinstance(hash_max_distance, bool) or not isinstance(hash_max_distance, int):
        raise ValueError(f"hash_max_distance must be an integer, got {hash_max_distance!r}")
    if not -1 <= hash_max_distance <= HASH_BITS:
        raise ValueError(f"hash_max_distance must be in [-1, {HASH_BITS}], got {hash_max_distance}")
    if num_workers is not None:
        check_non_negative_int(num_workers, "num_workers")
    options = GeometricOptions() if options is None else options
    if isinstance(pairs, PairSet):
        cand = pairs
    else:
        cand = concat_pairsets(pairs.iter_chunks())
    m = len(cand)
    ci, cj = np.asarray(cand.i, np.int64), np.asarray(cand.j, np.int64)
    if m and (ci.min() < 0 or cj.max() >= len(values)):
        raise ValueError(f"pairs refer to rows outside the {len(values)} values given")
    dist = np.full(m, -1, np.int64)
    inliers = np.full(m, -1, np.int64)
    matches = np.full(m, -1, np.int64)
    agree = np.full(m, np.nan)
    mirrored = np.zeros(m, bool)
    verified = np.zeros(m, bool)
    how = np.full(m, "", dtype=object)
    failures: dict[int, str] = {}
    seconds: dict[str, float] = {}

    # 1. the hash of every image in a candidate pair
    t0 = time.perf_counter()
    rows = np.unique(np.concatenate([ci, cj])) if m else np.zeros(0, np.int64)
    for r, reason in (unavailable or {}).items():
        failures[int(r)] = str(reason)
    rows = rows[~np.isin(rows, np.fromiter(failures, np.int64, len(failures)))]
    root = None if image_root is None else os.fspath(image_root)
    cache = None
    fps: dict[int, str | None] = {}
    if cache_dir is not None:
        from ..encode.cache import fingerprint
        from .cache import FeatureCache

        cache = FeatureCache(cache_dir, options)
        fps = {r: fingerprint(values[r], root, max_pixels=max_pixels) for r in rows.tolist()}
    got = _cached(_hash_task, rows, values, (root, max_pixels), num_workers, cache, fps, "hash")
    hashes: dict[int, Any] = {}
    for r, (h, reason) in zip(rows.tolist(), got, strict=True):
        if reason is None:
            hashes[r] = h
        else:
            failures[r] = reason
    for k in range(m):
        a, b = int(ci[k]), int(cj[k])
        if a in hashes and b in hashes:
            d, flip = hash_distance(hashes[a], hashes[b])
            dist[k] = d
            if d <= hash_max_distance:
                verified[k], mirrored[k], how[k] = True, flip, "hash"
        else:
            how[k] = failures.get(a) or failures[b]
    seconds["hash"] = time.perf_counter() - t0

    # 2. features only for images in a pair still open, then geometry pair by pair
    t0 = time.perf_counter()
    open_pairs = np.flatnonzero(how == "")
    if open_pairs.size:
        prepare_opencv()  # one OpenCV thread here, before any worker is forked
    need = (
        np.unique(np.concatenate([ci[open_pairs], cj[open_pairs]]))
        if open_pairs.size
        else (np.zeros(0, np.int64))
    )
    got = _cached(
        _features_task,
        need,
        values,
        (root, max_pixels, options),
        num_workers,
        cache,
        fps,
        "features",
    )
    features: dict[int, Features] = {}
    for r, (f, reason) in zip(need.tolist(), got, strict=True):
        if reason is None:
            features[r] = f
        else:
            failures[r] = reason
    seconds["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ready = [k for k in open_pairs.tolist() if int(ci[k]) in features and int(cj[k]) in features]
    for k in open_pairs.tolist():
        a, b = int(ci[k]), int(cj[k])
        if a not in features or b not in features:
            how[k] = failures.get(a) or failures[b]
    _FEATURES.clear()
    _FEATURES.update(features)
    try:
        found = _run(
            _match_task,
            [(int(ci[k]), int(cj[k])) for k in ready],
            (options,),
            num_workers,
            fork_only=True,
        )
    finally:
        _FEATURES.clear()
    for k, result in zip(ready, found, strict=True):
        inliers[k], matches[k], mirrored[k] = result.inliers, result.matches, result.mirrored
        agree[k] = result.agreement
        ok = result.verified(options)
        verified[k] = ok
        how[k] = "geometry" if ok else "rejected"
    seconds["match"] = time.perf_counter() - t0
    counts = {
        "candidates": m,
        "verified": int(verified.sum()),
        "by_hash": int((how == "hash").sum()),
        "by_geometry": int((how == "geometry").sum()),
        "rejected": int((how == "rejected").sum()),
        "unverifiable": int(m - verified.sum() - (how == "rejected").sum()),
        "images_hashed": len(hashes),
        "images_featured": len(features),
        "geometry_pairs": int(open_pairs.size),
    }
    out = Verification(
        cand,
        dist,
        inliers,
        matches,
        agree,
        mirrored,
        verified,
        how,
        failures,
        seconds,
        counts,
        options,
        hash_max_distance,
    )
    logger.info("verification: %s", out.summary())
    return out


def verify_result(result: Any, values: Sequence[Any], **options: Any) -> Any:
    """A :class:`~dedup_index.dedup.DedupResult` decided again on verified pairs only.

    ``result.pairs`` are the candidates; ``values`` the image value of each of its rows.
    The returned result has the verified pairs, the policy's decisions on them, and the
    :class:`Verification` as ``info["verification"]``.  ``max_similarity`` stays the
    embedding's nearest-neighbour score with ``score="nearest"``; with ``"pairs"`` it is
    the best verified pair score.  ``max_earlier_similarity`` is dropped (it describes
    embedding-only decisions).  ``options`` go to :func:`verify_pairs`.
    """
    from ..policy import decide
    from ..search import best_pair_score

    verification = verify_pairs(result.pairs, values, **options)
    pairs = verification.pairs
    decisions = decide(result.n, pairs, result.policy)
    max_similarity = result.max_similarity
    if result.score == "pairs":
        best = best_pair_score(result.n, pairs)
        max_similarity = np.where(np.isfinite(best), best, 0.0)
    info = dict(result.info)
    info["verification"] = verification
    return replace(
        result,
        keep=decisions.keep,
        duplicate_of=decisions.duplicate_of,
        duplicate_similarity=decisions.duplicate_similarity,
        group=decisions.group,
        pairs=pairs,
        max_similarity=max_similarity,
        seconds=result.seconds + sum(verification.seconds.values()),
        max_earlier_similarity=None,
        info=info,
    )


__all__ = [
    "HASH_MAX_DISTANCE",
    "VERIFY_METHODS",
    "Verification",
    "candidate_threshold",
    "check_verify",
    "verify_pairs",
    "verify_result",
]
