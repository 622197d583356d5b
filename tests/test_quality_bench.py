"""bench/quality.py: the labelled set builder, the metric arithmetic, and small runs."""

from __future__ import annotations

import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
from _quality_set import (  # noqa: E402
    ORIGINAL,
    TRANSFORMS,
    PairCounts,
    QualitySet,
    best_cut,
    build_set,
    hamming_pairs,
    load_photo,
    pair_counts,
    phash_bits,
    reference_keep,
    row_counts,
    scores_of,
    sweep,
    tile_boxes,
    transform_pairs,
    transform_recall,
    true_pair_total,
)

SMALL = (("astronaut", 2, 2, (0, 3)), ("text", 1, 2, None))


@pytest.fixture(scope="module")
def small_set() -> QualitySet:
    return build_set(SMALL, ["jpeg", "grayscale", "watermark"], seed=3)


# --------------------------------------------------------------------------- the set


def test_tile_boxes_are_disjoint_and_cover_the_image():
    boxes = tile_boxes(101, 53, 3, 4)
    assert len(boxes) == 12
    cover = np.zeros((53, 101), dtype=int)
    for left, top, right, bottom in boxes:
        assert right > left and bottom > top
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()
    with pytest.raises(ValueError, match="rows and cols"):
        tile_boxes(10, 10, 0, 2)


def test_set_labels_one_original_and_one_of_each_transform_per_group(small_set):
    qs = small_set
    assert qs.n == 4 * (1 + 3) and len(qs.tiles) == 4
    assert qs.photos == ["astronaut", "text"]
    assert qs.tiles == ["astronaut[0,0]", "astronaut[1,1]", "text[0,0]", "text[0,1]"]
    for g in range(4):
        rows = np.flatnonzero(qs.group == g)
        assert sorted(qs.transform[rows]) == sorted([ORIGINAL, "jpeg", "grayscale", "watermark"])
        assert len(set(qs.photo[rows])) == 1
        assert qs.photos[qs.photo[rows[0]]] == qs.tiles[g].split("[")[0]
    assert true_pair_total(qs.group) == 4 * 6
    assert all(im.mode == "RGB" for im in qs.images)
    # Shuffled: not in build order (tile by tile, original first).
    assert not np.array_equal(qs.group, np.repeat(np.arange(4), 4))


def test_originals_are_the_photo_tiles_and_variants_differ(small_set):
    qs = small_set
    photo = load_photo("astronaut")  # 512 px: 2x2 tiles of 256 px, not shrunk
    boxes = tile_boxes(512, 512, 2, 2)
    for g, cell in ((0, 0), (1, 3)):
        rows = np.flatnonzero(qs.group == g)
        by_t = {qs.transform[r]: np.asarray(qs.images[r]) for r in rows}
        expected = np.asarray(photo.crop(boxes[cell]))
        assert np.array_equal(by_t[ORIGINAL], expected)
        for t in ("jpeg", "grayscale", "watermark"):
            assert by_t[t].shape == expected.shape
            assert np.abs(by_t[t].astype(int) - expected).mean() > 0.5, t
        gray = by_t["grayscale"]
        assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # Distinct tiles are distinct images.
    o = [np.asarray(qs.images[r]) for r in np.flatnonzero(qs.transform == ORIGINAL)]
    assert all(not np.array_equal(a, b) for a, b in combinations(o, 2) if a.shape == b.shape)


def test_every_transform_runs_and_the_build_is_deterministic():
    one = build_set((("coins", 1, 2, None),), seed=7)
    two = build_set((("coins", 1, 2, None),), seed=7)
    assert one.n == 2 * (1 + len(TRANSFORMS)) and one.transforms == tuple(TRANSFORMS)
    assert np.array_equal(one.group, two.group)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(one.images, two.images, strict=True))
    other = build_set((("coins", 1, 2, None),), seed=8)
    assert not np.array_equal(one.group, other.group)
    assert sorted(one.transform) == sorted(other.transform)
    resized = one.images[int(np.flatnonzero(one.transform == "resize")[0])]
    original = one.images[int(np.flatnonzero(one.transform == ORIGINAL)[0])]
    assert resized.size == (round(original.width / 2), round(original.height / 2))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown transform.*'sepia'"):
        build_set(SMALL, ["jpeg", "sepia"])
    with pytest.raises(ValueError, match="no image 'nope'"):
        load_photo("nope")


# --------------------------------------------------------------------------- metrics

# Rows 0-5; groups {0,1,2}, {3,4}, {5}: 3 + 1 = 4 true pairs.  Photos: rows 0-3 photo 0.
GROUP = np.array([0, 0, 0, 1, 1, 2])
PHOTO = np.array([0, 0, 0, 0, 1, 1])
PI = np.array([0, 0, 3, 2, 1])
PJ = np.array([1, 2, 4, 5, 3])
PS = np.array([0.95, 0.90, 0.80, 0.85, 0.70])
# (0,1) (0,2) (3,4) are true; (2,5) is false across photos, (1,3) false within photo 0.


def test_pair_counts_on_a_hand_made_case():
    c = pair_counts(PI, PJ, GROUP, PHOTO)
    assert (c.tp, c.fp, c.fn, c.fp_same_photo) == (3, 2, 1, 1)
    assert c.predicted == 5
    assert c.precision == pytest.approx(3 / 5)
    assert c.recall == pytest.approx(3 / 4)
    assert c.f1 == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    empty = pair_counts(PI[:0], PJ[:0], GROUP)
    assert (empty.tp, empty.fp, empty.fn) == (0, 0, 4)
    assert (empty.precision, empty.recall, empty.f1) == (1.0, 0.0, 0.0)
    assert PairCounts(0, 0, 0).f1 == 1.0


def test_sweep_and_the_exact_best_cut():
    counts = sweep(PI, PJ, PS, GROUP, [0.95, 0.9, 0.85, 0.8, 0.7], PHOTO)
    assert [(c.tp, c.fp, c.fn) for c in counts] == [
        (1, 0, 3),
        (2, 0, 2),
        (2, 1, 2),
        (3, 1, 1),
        (3, 2, 1),
    ]
    assert [round(c.f1, 4) for c in counts] == [0.4, 0.6667, 0.5714, 0.75, 0.6667]
    best = best_cut(PI, PJ, PS, GROUP, PHOTO)
    assert best.cut == 0.8 and best.below == 0.7
    assert (best.counts.tp, best.counts.fp, best.counts.fn) == (3, 1, 1)
    assert best.counts.fp_same_photo == 0  # the FP at 0.8 is (2, 5): different photos
    none = best_cut(PI[:0], PJ[:0], PS[:0], GROUP)
    assert none.counts.fn == 4 and none.cut == np.inf


def test_best_cut_equals_brute_force_with_ties():
    rng = np.random.default_rng(0)
    n = 40
    group = rng.integers(0, 8, n)
    i, j = np.triu_indices(n, 1)
    score = np.round(rng.random(i.size) + 0.3 * (group[i] == group[j]), 2)  # many ties
    keep = score > 0.5
    i, j, score = i[keep], j[keep], score[keep]
    best = best_cut(i, j, score, group)
    cuts = np.unique(score)
    f1 = [c.f1 for c in sweep(i, j, score, group, cuts)]
    assert best.counts.f1 == pytest.approx(max(f1))
    assert best.cut == cuts[::-1][int(np.argmax(f1[::-1]))]  # the highest cut among ties
    assert best.below == cuts[np.searchsorted(cuts, best.cut) - 1]


def test_scores_of_looks_up_pairs_in_either_order():
    got = scores_of(PI, PJ, PS, np.array([1, 5, 0, 4]), np.array([0, 2, 5, 3]), 6)
    assert got.tolist() == [0.95, 0.85, -np.inf, 0.8]
    assert scores_of(PI[:0], PJ[:0], PS[:0], np.array([0]), np.array([1]), 6).tolist() == [-np.inf]


def test_transform_pairs_and_recall_on_a_hand_made_set():
    img = Image.new("RGB", (4, 4))
    qs = QualitySet(
        images=[img] * 6,
        group=np.array([1, 0, 1, 0, 0, 1]),
        photo=np.zeros(6, dtype=np.int64),
        transform=np.array(["jpeg", ORIGINAL, ORIGINAL, "blur", "jpeg", "blur"], dtype=object),
        tiles=["a", "b"],
        photos=["p"],
        transforms=("jpeg", "blur"),
    )
    pairs = transform_pairs(qs)
    assert [list(x) for x in pairs["jpeg"]] == [[2, 1], [0, 4]]  # (original, variant)
    assert [list(x) for x in pairs["blur"]] == [[1, 2], [3, 5]]
    i, j, s = np.array([0, 1, 2]), np.array([2, 4, 5]), np.array([0.9, 0.7, 0.95])
    rec = transform_recall(qs, i, j, s, [0.6, 0.8, 0.99])
    assert rec == {"jpeg": [1.0, 0.5, 0.0], "blur": [0.5, 0.5, 0.0]}
    assert qs.describe(3) == "a blur"


def test_row_counts_of_the_reference_policy():
    group = np.array([0, 1, 0, 0, 1, 2])
    i, j = np.array([0, 2, 1, 3]), np.array([2, 3, 4, 5])
    keep = reference_keep(6, i, j, np.ones(4))
    assert keep.tolist() == [True, True, False, False, False, False]
    r = row_counts(keep, group)
    assert (r.removed, r.removed_ok, r.removed_wrong, r.groups_lost, r.dups_left) == (
        4,
        3,
        1,
        1,
        0,
    )
    r = row_counts(np.ones(6, bool), group)
    assert (r.removed, r.groups_lost, r.dups_left) == (0, 0, 3)


def test_reference_keep_matches_dedup_embeddings():
    from dedup_index import dedup_embeddings
    from dedup_index.testing import mixed_adversarial

    emb = mixed_adversarial(0, 300, 16, 0.9)
    low = dedup_embeddings(emb, threshold=0.5)
    for t in (0.6, 0.8, 0.9, 0.95):
        hit = low.pairs.s >= t
        keep = reference_keep(len(emb), low.pairs.i[hit], low.pairs.j[hit], low.pairs.s[hit])
        assert np.array_equal(keep, dedup_embeddings(emb, threshold=t).keep)


def test_hamming_pairs_match_imagehash(small_set):
    import imagehash

    images = small_set.images[:10]
    bits = phash_bits(images)
    assert bits.shape == (10, 8) and bits.dtype == np.uint8
    hashes = [imagehash.phash(im) for im in images]
    i, j, d = hamming_pairs(bits, 64)
    assert len(i) == 45 and (i < j).all()
    for a, b, dist in zip(i, j, d, strict=True):
        assert dist == hashes[a] - hashes[b]
    i2, j2, d2 = hamming_pairs(bits, 10)
    assert np.array_equal(d2, d[d <= 10]) and np.array_equal(i2, i[d <= 10])


# --------------------------------------------------------------------------- runs


def test_phash_only_run_prints_the_tables(capsys):
    args = "--photos text,page --transforms jpeg,grayscale,crop --no-efficientnet --no-clip"
    runs = quality.main([*args.split(), "--distances", "0,4,8"])
    out = capsys.readouterr().out
    assert [r.name for r in runs] == ["phash"]
    assert "CLIP: skipped (--no-clip)." in out
    assert "## Quality set" in out and "16 images: 4 tiles of 2 photos" in out
    assert "| d<=4 |" in out and "**best d<=" in out
    assert "## Best threshold per method" in out
    # pHash works on luminance: a grayscale copy hashes identically.
    qs = build_set(
        tuple(s for s in quality.SOURCES if s[0] in ("text", "page")),
        ["jpeg", "grayscale", "crop"],
    )
    run = runs[0]
    assert transform_recall(qs, run.i, run.j, run.score, [0.0])["grayscale"] == [1.0]


def test_clip_is_skipped_with_a_line_when_absent(tmp_path):
    path, why = quality.find_clip(None, cache_dir=str(tmp_path))
    assert path is None and "openai/clip-vit-base-patch32 is not in the local" in why


def test_a_local_clip_checkpoint_runs_through_dedup(tiny_clip, capsys):
    args = "--photos coins --transforms jpeg,resize --no-efficientnet --no-cache --low 0.5"
    runs = quality.main([*args.split(), "--clip", tiny_clip, "--thresholds", "0.9,0.99,0.999"])
    out = capsys.readouterr().out
    assert [r.name for r in runs] == ["clip", "phash"]
    assert f"CLIP: --clip {tiny_clip}." in out
    assert "keep mask replayed at 0.9 == a direct run" in out
    clip = runs[0]
    assert clip.kind == "cosine" and (clip.score >= 0.5).all() and (clip.i < clip.j).all()
    assert len(clip.i) <= 6 * 5 // 2


def test_efficientnet_run_finds_the_resized_and_jpeg_copies(capsys):
    args = "--photos astronaut --transforms jpeg,resize --no-clip --no-cache"
    runs = quality.main(args.split())
    out = capsys.readouterr().out
    names = ["efficientnet-lite0", "efficientnet-lite0 + verify geometric", "phash"]
    assert [r.name for r in runs] == names
    assert "keep mask replayed at 0.9 == a direct run" in out
    qs = build_set(tuple(s for s in quality.SOURCES if s[0] == "astronaut"), ["jpeg", "resize"])
    verified = runs[1]  # every copy verified, no other tile of the photo (issue 14)
    assert pair_counts(verified.i, verified.j, qs.group).f1 == 1.0
    eff = runs[0]
    assert eff.score.min() >= quality.LOW and eff.score.max() <= 1.0 + 1e-9
    # Measured on the full set: every resized and JPEG q50 copy is at cosine >= 0.70.
    recall = transform_recall(qs, eff.i, eff.j, eff.score, [0.7])
    assert recall == {"jpeg": [1.0], "resize": [1.0]}
