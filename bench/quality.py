"""Dedup quality, measured: precision, recall and F1 on a labelled near-duplicate set.

    .venv/bin/python bench/quality.py [--photos astronaut,coffee,...] [--seed 0]
                                      [--thresholds 0.8,0.85,...] [--distances 0,2,...]
                                      [--clip PATH | --no-clip] [--no-cache] [--device cpu]

The set (:mod:`_quality_set`): non-overlapping tiles of the real photos that scikit-image
ships are the distinct images; each tile gets nine near-duplicates (resize, JPEG q25, small
crop, brightness/contrast, blur, 5 degree rotation, grayscale, text watermark, and a
combination); a tile and its variants are one group.  Rows are shuffled (seed 0).

Methods, all on the same set in the same run:

- ``efficientnet-lite0``: the offline ImageNet model (``load_encoder("efficientnet-lite0")``),
  embedded once; ``dedup_embeddings(E, threshold=--low)`` finds every pair at or above
  the lowest threshold, and each threshold's prediction is the pairs with
  ``similarity >= threshold`` (so all thresholds cost one search).  At 0.90 the reference
  policy's keep mask computed from those pairs is checked against a fresh
  ``dedup_embeddings(E, 0.90)`` run.
- ``clip``: the same with a real CLIP checkpoint, when there is one locally: ``--clip PATH``
  (a ``save_pretrained`` directory), or ``openai/clip-vit-base-patch32`` in the Hugging Face
  cache (looked up with ``HF_HUB_OFFLINE=1``; never downloaded).  Skipped with a printed
  line otherwise.
- ``phash``: the perceptual-hash baseline, ``imagehash.phash`` (64 bits), a pair predicted
  when the Hamming distance is ``<= d``, for every ``d`` in ``--distances``.

Printed (markdown): per method a table per threshold of pair-level counts (TP, FP, false
positives between tiles of the same photo, FN), precision, recall, F1, and row-level
outcomes of the reference policy (rows removed, removed correctly, removed wrongly, groups
with no row left, duplicates left); the recall of original-variant pairs per transform;
the highest-scoring false positives; and at the end the F1-maximising threshold of each
method (the exact optimum over every pair score, not only the printed grid).

Embeddings are cached under ``bench/_out/quality/`` keyed by model and image bytes
(``--no-cache`` to recompute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from dedup_index.files import atomic_write_with, write_json_atomic

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _quality_set import (  # noqa: E402
    ORIGINAL,
    SOURCES,
    TRANSFORMS,
    QualitySet,
    best_cut,
    build_set,
    hamming_pairs,
    pair_counts,
    phash_bits,
    reference_keep,
    row_counts,
    scores_of,
    sweep,
    transform_pairs,
    transform_recall,
    true_pair_total,
)

logger = logging.getLogger("quality")

CLIP_ID = "openai/clip-vit-base-patch32"
CACHE = BENCH / "_out" / "quality"
COSINE_CUTS = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.99)
HAMMING_CUTS = (0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24)
#: pHash pairs are gathered up to this distance (the best-F1 search covers them all).
HAMMING_SEARCH = 32
#: PDQ pairs (256 bits) are gathered up to this distance.
PDQ_SEARCH = 128
PDQ_CUTS = (0, 8, 16, 24, 31, 40, 48, 56, 64, 80, 96)
LOW = 0.4
CHECK_THRESHOLD = 0.9


@dataclass
class MethodRun:
    """One method's candidate pairs on the set, with a closeness score (larger = closer).

    ``kind`` is ``"cosine"`` (score = similarity, cut = threshold), ``"hamming"``
    (score = -distance, cut = -d) or ``"verified"`` (the verified pairs, score 1: one
    operating point).  ``cuts`` are the printed grid, in score units.
    """

    name: str
    kind: str
    i: np.ndarray
    j: np.ndarray
    score: np.ndarray
    cuts: tuple[float, ...]
    seconds: float
    notes: list[str]

    def label(self, cut: float) -> str:
        if self.kind == "verified":
            return "verified"
        return f"{cut:.2f}" if self.kind == "cosine" else f"d<={-cut:g}"

    def value(self, score: float) -> str:
        if not np.isfinite(score):
            return "none"
        if self.kind == "verified":
            return "verified"
        return f"{score:.4f}" if self.kind == "cosine" else f"{abs(score):g}"


# --------------------------------------------------------------------------- methods


def _image_key(qs: QualitySet, model: str) -> str:
    h = hashlib.sha256(model.encode())
    for im in qs.images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def embed(
    qs: QualitySet, model: str, make_encoder: Callable[[], object], use_cache: bool
) -> tuple[np.ndarray, float, bool]:
    """``(embeddings, seconds, from_cache)``: encode every image once, or load the cache
    (then ``seconds`` is the encoding time recorded when it was computed, NaN if none)."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)[-60:]
    path = CACHE / f"{slug}_{_image_key(qs, model)}.npy"
    timing = path.with_suffix(".json")
    if use_cache and path.exists():
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else float("nan")
        return np.load(path), seconds, True
    encoder = make_encoder()
    t0 = time.perf_counter()
    emb = encoder.encode(qs.images)
    seconds = time.perf_counter() - t0
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda tmp: np.save(tmp, emb), suffix=".npy")
        write_json_atomic(timing, {"model": model, "n": qs.n, "seconds": seconds})
    return emb, seconds, False


def embedding_method(
    qs: QualitySet,
    name: str,
    make_encoder: Callable[[], object],
    *,
    low: float,
    cuts: Sequence[float],
    use_cache: bool,
) -> MethodRun:
    """Embed, search once at ``low``, and check the per-threshold replay against a real run."""
    from dedup_index import dedup_embeddings

    emb, seconds, cached = embed(qs, name, make_encoder, use_cache)
    t0 = time.perf_counter()
    res = dedup_embeddings(emb, threshold=low)
    search_s = time.perf_counter() - t0
    i, j, s = np.asarray(res.pairs.i), np.asarray(res.pairs.j), np.asarray(res.pairs.s)
    # The replay of a threshold from the low-threshold pairs must equal a real run there.
    check = dedup_embeddings(emb, threshold=CHECK_THRESHOLD)
    hit = s >= CHECK_THRESHOLD
    if not np.array_equal(reference_keep(qs.n, i[hit], j[hit], s[hit]), check.keep):
        raise RuntimeError(f"{name}: replayed keep mask at {CHECK_THRESHOLD} != dedup_embeddings")
    how = f"in {seconds:.1f} s ({qs.n / seconds:.1f} images/s)"
    if cached:
        how = f"loaded from {CACHE.relative_to(BENCH.parent)} (computed {how})"
    notes = [
        f"embeddings: {qs.n} x {emb.shape[1]} {how}",
        f"dedup_embeddings(threshold={low}) backend {res.backend}: {len(i)} pairs in "
        f"{search_s:.2f} s; keep mask replayed at {CHECK_THRESHOLD} == a direct run",
    ]
    return MethodRun(name, "cosine", i, j, s, tuple(cuts), seconds, notes)


def phash_method(qs: QualitySet, distances: Sequence[int]) -> MethodRun:
    """pHash of every image, then every pair within the largest distance."""
    t0 = time.perf_counter()
    bits = phash_bits(qs.images)
    seconds = time.perf_counter() - t0
    search = max(HAMMING_SEARCH, *distances)
    i, j, d = hamming_pairs(bits, search)
    notes = [
        f"imagehash {metadata.version('ImageHash')} phash (64 bits): {qs.n} images in "
        f"{seconds:.1f} s; {len(i)} pairs within distance {search}"
    ]
    cuts = tuple(-float(x) for x in sorted(distances))
    return MethodRun("phash", "hamming", i, j, -d.astype(np.float64), cuts, seconds, notes)


def pdq_method(qs: QualitySet, distances: Sequence[int]) -> MethodRun | None:
    """PDQ (``pdqhash``, 256 bits) of every image, then every pair within the largest
    distance; None when ``pdqhash`` is not installed (it builds from source)."""
    try:
        import pdqhash
    except ImportError:
        return None
    t0 = time.perf_counter()
    bits = np.stack(
        [
            np.packbits(pdqhash.compute(np.asarray(im.convert("RGB")))[0].astype(bool))
            for im in qs.images
        ]
    )
    seconds = time.perf_counter() - t0
    search = max(PDQ_SEARCH, *distances)
    i, j, d = hamming_pairs(bits, search)
    notes = [
        f"pdqhash {metadata.version('pdqhash')} PDQ (256 bits): {qs.n} images in "
        f"{seconds:.1f} s; {len(i)} pairs within distance {search}"
    ]
    cuts = tuple(-float(x) for x in sorted(distances))
    return MethodRun("pdq", "hamming", i, j, -d.astype(np.float64), cuts, seconds, notes)


def verified_method(
    qs: QualitySet, candidates: MethodRun, threshold: float, num_workers: int | None
) -> MethodRun:
    """The candidate pairs of an embedding run at ``threshold``, through the library's
    verification stage (:func:`dedup_index.verify.verify_pairs`): hash, then SIFT + RANSAC."""
    from dedup_index.search import PairSet
    from dedup_index.verify import verify_pairs

    hit = candidates.score >= threshold
    i, j, s = candidates.i[hit], candidates.j[hit], candidates.score[hit]
    order = np.lexsort((j, i))
    pairs = PairSet(i[order], j[order], s[order])
    t0 = time.perf_counter()
    v = verify_pairs(pairs, qs.images, num_workers=num_workers)
    seconds = time.perf_counter() - t0
    c, sec = v.counts, v.seconds
    same = qs.group[v.candidates.i] == qs.group[v.candidates.j]
    by_hash = v.how == "hash"
    cand_counts = pair_counts(pairs.i, pairs.j, qs.group)
    notes = [
        f"candidates: {candidates.name} pairs at cosine >= {threshold} ({len(pairs)} pairs, "
        f"holding {cand_counts.tp} of {cand_counts.tp + cand_counts.fn} true pairs: "
        f"candidate recall {cand_counts.recall:.3f})",
        f"verification ({num_workers if num_workers is not None else 'auto'} workers): "
        + v.summary(),
        f"settled by the hash: {c['by_hash']} of {len(pairs)} candidate pairs "
        f"({c['by_hash'] / max(len(pairs), 1):.1%}), {int((by_hash & ~same).sum())} of them "
        "wrong",
        f"cost (wall, 2 shared cores, under others' load): hash {sec['hash']:.1f} s "
        f"({1000 * sec['hash'] / max(c['images_hashed'], 1):.1f} ms/image), features "
        f"{sec['features']:.1f} s ({1000 * sec['features'] / max(c['images_featured'], 1):.1f}"
        f" ms/image), matching {sec['match']:.1f} s "
        f"({1000 * sec['match'] / max(c['geometry_pairs'], 1):.1f} ms per candidate pair); "
        f"{1000 * seconds / qs.n:.1f} ms per image of the set in all",
    ]
    vp = v.pairs
    return MethodRun(
        f"{candidates.name} + verify geometric",
        "verified",
        np.asarray(vp.i),
        np.asarray(vp.j),
        np.ones(len(vp)),
        (1.0,),
        seconds,
        notes,
    )


def find_clip(path: str | None, cache_dir: str | None = None) -> tuple[str | None, str]:
    """``(checkpoint path or None, how it was found or why not)``; never downloads.

    ``path`` (``--clip``) wins; otherwise :data:`CLIP_ID` is looked up in the Hugging Face
    cache (``cache_dir``, default the user's) with ``local_files_only``.
    """
    if path:
        if not Path(path).is_dir():
            raise SystemExit(f"--clip {path!r} is not a directory (a save_pretrained checkpoint)")
        return path, f"--clip {path}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        found = snapshot_download(CLIP_ID, local_files_only=True, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - any failure means: not available locally
        return None, (
            f"{CLIP_ID} is not in the local Hugging Face cache ({type(exc).__name__}) and no "
            "--clip PATH was given"
        )
    return found, f"{CLIP_ID} from the Hugging Face cache ({found})"


# --------------------------------------------------------------------------- report


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return "\n".join(out)


def _pct(x: float) -> str:
    return f"{x:.3f}"


def method_report(qs: QualitySet, run: MethodRun, transform_cuts: Sequence[float]) -> str:
    """The markdown tables of one method."""
    lines = [f"### {run.name}", ""]
    lines += [f"- {note}" for note in run.notes]
    best = best_cut(run.i, run.j, run.score, qs.group, qs.photo)
    true_scores = np.concatenate(
        [scores_of(run.i, run.j, run.score, a, b, qs.n) for a, b in _all_true_pairs(qs)]
    )
    distinct = qs.group[run.i] != qs.group[run.j]
    top_distinct = run.score[distinct].max() if distinct.any() else -np.inf
    missed = int(np.isneginf(true_scores).sum())
    found = true_scores[np.isfinite(true_scores)]
    closest = run.value(top_distinct) if np.isfinite(top_distinct) else "none within the search"
    farthest = run.value(found.min()) if found.size else "-"
    if missed:
        farthest = f"beyond the search for {missed} of {true_scores.size} true pairs"
    lines += [f"- closest distinct pair: {closest}; farthest true pair: {farthest}", ""]
    header = [
        {"cosine": "threshold", "verified": "decision"}.get(run.kind, "distance"),
        "pairs",
        "TP",
        "FP",
        "FP same photo",
        "FN",
        "precision",
        "recall",
        "F1",
        "precision other photos",
        "F1 other photos",
        "removed ok",
        "removed wrongly",
        "groups lost",
        "dups left",
    ]
    rows = []
    cuts = list(run.cuts)
    counts = sweep(run.i, run.j, run.score, qs.group, cuts, qs.photo)
    grid = [(run.label(cut), cut, c) for cut, c in zip(cuts, counts, strict=True)]
    grid.append((f"**best {_best_label(run, best)}**", best.cut, best.counts))
    for label, cut, c in grid:
        hit = run.score >= cut
        r = row_counts(reference_keep(qs.n, run.i[hit], run.j[hit], run.score[hit]), qs.group)
        rows.append(
            [
                label,
                str(c.predicted),
                str(c.tp),
                str(c.fp),
                str(c.fp_same_photo),
                str(c.fn),
                _pct(c.precision),
                _pct(c.recall),
                _pct(c.f1),
                _pct(c.precision_cross),
                _pct(c.f1_cross),
                str(r.removed_ok),
                str(r.removed_wrong),
                str(r.groups_lost),
                str(r.dups_left),
            ]
        )
    lines += [md_table(header, rows), ""]

    # Per transform: recall of original-variant pairs, and the median score.
    tcuts = [*transform_cuts, best.cut]
    recall = transform_recall(qs, run.i, run.j, run.score, tcuts)
    pairs = transform_pairs(qs)
    header = ["transform", "median " + ("sim" if run.kind == "cosine" else "distance")]
    header += [run.label(c) for c in transform_cuts] + [f"best {_best_label(run, best)}"]
    rows = []
    for t, values in recall.items():
        s = scores_of(run.i, run.j, run.score, *pairs[t], qs.n)
        rows.append([t, run.value(float(np.median(s)))] + [_pct(v) for v in values])
    lines += ["Recall of original-variant pairs, per transform:", "", md_table(header, rows), ""]

    # The closest false positives at the best cut.
    fp = np.flatnonzero(distinct & (run.score >= best.cut))
    fp = fp[np.argsort(-run.score[fp], kind="stable")][:8]
    if fp.size:
        rows = [
            [
                run.value(run.score[k]),
                qs.describe(run.i[k]),
                qs.describe(run.j[k]),
                "yes" if qs.photo[run.i[k]] == qs.photo[run.j[k]] else "no",
            ]
            for k in fp
        ]
        what = "threshold" if run.kind == "cosine" else "distance"
        lines += [
            f"Closest false positives at the best {what}:",
            "",
            md_table(["score", "row a", "row b", "same photo"], rows),
            "",
        ]
    return "\n".join(lines)


def _best_label(run: MethodRun, best) -> str:
    if run.kind == "verified":
        return "verified"
    if run.kind == "cosine":
        lo = best.below if np.isfinite(best.below) else 0.0
        return f"{best.cut:.4f}" if best.cut - lo < 5e-5 else f"{(best.cut + lo) / 2:.4f}"
    return f"d<={-best.cut:g}"


def _all_true_pairs(qs: QualitySet):
    """Every within-group pair ``(a, b)``, one group at a time."""
    for g in np.unique(qs.group):
        rows = np.flatnonzero(qs.group == g)
        a, b = np.triu_indices(rows.size, k=1)
        yield rows[a], rows[b]


def summary(qs: QualitySet, runs: Sequence[MethodRun], *, cross_photo_only: bool = False) -> str:
    """One row per method at its F1-maximising cut.  With ``cross_photo_only`` pairs of
    distinct tiles of one photo are ignored when choosing and scoring the cut."""
    header = [
        "method",
        "best threshold",
        "pairs",
        "precision",
        "recall",
        "F1",
        "FP (same photo)",
        "removed wrongly",
        "groups lost",
        "dups left",
        "seconds to embed/hash",
    ]
    rows = []
    for run in runs:
        best = best_cut(
            run.i, run.j, run.score, qs.group, qs.photo, cross_photo_only=cross_photo_only
        )
        hit = run.score >= best.cut
        c = pair_counts(run.i[hit], run.j[hit], qs.group, qs.photo)
        r = row_counts(reference_keep(qs.n, run.i[hit], run.j[hit], run.score[hit]), qs.group)
        rng = ""
        if run.kind == "cosine":
            rng = f" (any in ({best.below:.4f}, {best.cut:.4f}])"
        precision, f1 = (c.precision_cross, c.f1_cross) if cross_photo_only else (c.precision, c.f1)
        rows.append(
            [
                run.name,
                _best_label(run, best) + rng,
                str(c.predicted),
                _pct(precision),
                _pct(c.recall),
                _pct(f1),
                f"{c.fp} ({c.fp_same_photo})",
                str(r.removed_wrong),
                str(r.groups_lost),
                str(r.dups_left),
                f"{run.seconds:.1f}",
            ]
        )
    return md_table(header, rows)


def _grid(source) -> str:
    name, rows, cols, keep = source
    cells = "all" if keep is None else "cells " + "+".join(str(k) for k in keep)
    return f"{name} ({rows}x{cols}, {cells})"


def set_report(qs: QualitySet, seed: int, catalog=None) -> str:
    catalog = TRANSFORMS if catalog is None else catalog
    n_true = true_pair_total(qs.group)
    n_all = qs.n * (qs.n - 1) // 2
    first = f"{qs.n} images: {len(qs.tiles)} tiles of {len(qs.photos)} photos x "
    lines = [
        "## Quality set",
        "",
        first + f"(original + {len(qs.transforms)} transforms); rows shuffled with seed {seed}.",
        f"{n_true} true pairs (within groups), {n_all - n_true} distinct pairs, of which "
        f"{pair_counts(*np.triu_indices(qs.n, 1), qs.group, qs.photo).fp_same_photo} between "
        "tiles of the same photo.",
        "",
        "Photos and grids: "
        + ", ".join(_grid(src) for src in SOURCES if src[0] in qs.photos)
        + ".",
        "",
        md_table(["transform", "what"], [[t, catalog[t][0]] for t in qs.transforms]),
    ]
    gray = [g for g in range(len(qs.tiles)) if _is_gray(qs, g)]
    if gray and "grayscale" in qs.transforms:
        lines += [
            "",
            f"{len(gray)} of {len(qs.tiles)} tiles come from grayscale photos: their "
            "`grayscale` variant is pixel-identical to the original (an exact copy).",
        ]
    return "\n".join(lines)


def _is_gray(qs: QualitySet, g: int) -> bool:
    row = int(np.flatnonzero((qs.group == g) & (qs.transform == ORIGINAL))[0])
    arr = np.asarray(qs.images[row])
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def machine_line() -> str:
    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    return (
        f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {v('torch')}, numpy {v('numpy')}, Pillow {v('pillow')}, "
        f"scikit-image {v('scikit-image')}, imagehash {v('ImageHash')}"
    )


# --------------------------------------------------------------------------- main


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> list[MethodRun]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default="", help="comma-separated subset of the photos")
    ap.add_argument("--transforms", default="", help="comma-separated subset of the transforms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", type=_floats, default=COSINE_CUTS)
    ap.add_argument("--distances", type=_floats, default=HAMMING_CUTS)
    ap.add_argument("--low", type=float, default=LOW, help="threshold of the one pair search")
    ap.add_argument("--clip", default=None, help="a local CLIP checkpoint directory")
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--no-efficientnet", action="store_true")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--set",
        choices=("standard", "hard"),
        default="standard",
        help="standard: the near-duplicate set (_quality_set.py); hard: copy detection with "
        "harder edits (_hard_set.py)",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the verified method")
    ap.add_argument(
        "--candidates",
        type=float,
        default=None,
        help="candidate threshold of the verified method (default: the model's recorded one)",
    )
    ap.add_argument("--workers", type=int, default=None, help="verification workers")
    ap.add_argument(
        "--pdq", action="store_true", help="add the PDQ baseline (needs pdqhash, built from source)"
    )
    args = ap.parse_args(argv)
    if not 0.0 <= args.low <= min(args.thresholds):
        ap.error(f"--low must be in [0, min(--thresholds)={min(args.thresholds)}], got {args.low}")
    if min(args.distances) < 0 or max(args.distances) > 64:
        ap.error(f"--distances must be in [0, 64] (bits of a 64-bit pHash), got {args.distances}")

    sources = SOURCES
    if args.photos:
        wanted = [p.strip() for p in args.photos.split(",") if p.strip()]
        known = {s[0] for s in SOURCES}
        bad = [p for p in wanted if p not in known]
        if bad:
            ap.error(f"unknown photo(s) {bad}; choose from {sorted(known)}")
        sources = tuple(s for s in SOURCES if s[0] in wanted)
    transforms = [t.strip() for t in args.transforms.split(",") if t.strip()] or None

    t0 = time.perf_counter()
    catalog = TRANSFORMS
    if args.set == "hard":
        from _hard_set import HARD_TRANSFORMS

        catalog = HARD_TRANSFORMS
    qs = build_set(sources, transforms, seed=args.seed, catalog=catalog)
    build_s = time.perf_counter() - t0
    print("# Dedup quality: near-duplicate detection on a labelled set of real photos\n")
    print(f"Set: `--set {args.set}`.\n")
    print(set_report(qs, args.seed, catalog))
    print(f"\nBuilt in {build_s:.1f} s.\n")

    runs: list[MethodRun] = []
    cache = not args.no_cache
    tcuts_cos = [0.70, 0.80, 0.85, 0.90, 0.95]
    if not args.no_efficientnet:
        from dedup_index.encode import load_encoder

        runs.append(
            embedding_method(
                qs,
                "efficientnet-lite0",
                lambda: load_encoder(
                    "efficientnet-lite0", device=args.device, batch_size=args.batch_size
                ),
                low=args.low,
                cuts=args.thresholds,
                use_cache=cache,
            )
        )
    clip_line = "CLIP: skipped (--no-clip)."
    if not args.no_clip:
        path, how = find_clip(args.clip)
        if path is None:
            clip_line = f"CLIP: skipped: {how}."
        else:
            from dedup_index.encode import load_encoder

            clip_line = f"CLIP: {how}."
            runs.append(
                embedding_method(
                    qs,
                    "clip",
                    lambda: load_encoder(path, device=args.device, batch_size=args.batch_size),
                    low=args.low,
                    cuts=args.thresholds,
                    use_cache=cache,
                )
            )
    if not args.no_efficientnet and not args.no_verify:
        from dedup_index.verify import candidate_threshold

        cand = args.candidates
        if cand is None:
            cand = candidate_threshold("efficientnet-lite0", args.low)[0]
        if cand < args.low:
            ap.error(f"--candidates {cand} is below --low {args.low}: pairs were not gathered")
        runs.append(verified_method(qs, runs[0], cand, args.workers))
    runs.append(phash_method(qs, [int(d) for d in args.distances]))
    if args.pdq:
        pdq = pdq_method(qs, PDQ_CUTS)
        if pdq is None:
            ap.error("--pdq needs pdqhash: pip install pdqhash (it compiles from source)")
        runs.append(pdq)

    print("## Results\n")
    print(f"Machine: {machine_line()}.\n")
    print(clip_line + "\n")
    print(
        "Pair-level counts over all unordered pairs; `FP same photo`: false positives between "
        "tiles of one photo (the hard case). Row-level columns apply the reference policy "
        "(row j removed iff an earlier row pairs with it) in the shuffled order: `removed ok` "
        "= removed rows with an earlier row of their own group (ideal "
        f"{qs.n - len(qs.tiles)}), `removed wrongly` = the first row of a group removed, "
        "`groups lost` = distinct images with no row left, `dups left` = extra rows kept.\n"
    )
    for run in runs:
        tcuts = tcuts_cos if run.kind == "cosine" else [-4.0, -8.0, -10.0, -12.0, -16.0]
        if run.name == "pdq":
            tcuts = [-16.0, -24.0, -31.0, -48.0, -64.0]
        elif run.kind == "verified":
            tcuts = [1.0]
        tcuts = [c for c in tcuts if c >= min(run.cuts)]
        print(method_report(qs, run, tcuts))
    print("## Best threshold per method (maximum F1 over every pair score)\n")
    print(summary(qs, runs))
    print(
        "\nThe same, not counting pairs of distinct tiles of one photo (neither right nor "
        "wrong: distinct images taken from different photos only); row-level columns still "
        "count everything:\n"
    )
    print(summary(qs, runs, cross_photo_only=True))
    return runs


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
