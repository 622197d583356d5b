"""The verification stage (dedup_index.verify): copies confirmed, look-alikes rejected.

Real photos (scikit-image): every edit type of the copy-detection set is a pair that
verification confirms; two other tiles of one photo are a pair it rejects; bad images give a
reason and never an exception; the outcome does not depend on the number of workers.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from conftest import MemoryStorage, photo
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from dedup_index.search import PairSet
from dedup_index.verify import (
    GeometricOptions,
    extract_features,
    hash_distance,
    match_features,
    perceptual_hashes,
    verify_pairs,
)

pytest.importorskip("cv2")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _caption(img: Image.Image) -> Image.Image:
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, round(h * 0.8), w, h), fill="black")
    draw.text((5, round(h * 0.85)), "WHEN THE CODE WORKS", fill="white")
    return out


def _screenshot(img: Image.Image) -> Image.Image:
    small = img.resize((round(img.width * 0.8), round(img.height * 0.8)), Image.LANCZOS)
    canvas = Image.new("RGB", (small.width + 40, small.height + 70), (236, 236, 236))
    ImageDraw.Draw(canvas).rectangle((0, 0, canvas.width, 28), fill=(52, 58, 64))
    canvas.paste(small, (20, 36))
    return canvas


def _colour(img: Image.Image) -> Image.Image:
    r, g, b = img.split()
    r = r.point(lambda v: min(255, round(v * 1.25) + 15))
    b = b.point(lambda v: min(255, round(v * 0.75) + 15))
    return Image.merge("RGB", (r, g, b))


EDITS = {
    "hflip": ImageOps.mirror,
    "crop30": lambda im: im.crop(
        (
            round(im.width * 0.2),
            round(im.height * 0.1),
            round(im.width * 0.9),
            round(im.height * 0.8),
        )
    ),
    "rotate12": lambda im: im.rotate(12, Image.BICUBIC, expand=True, fillcolor="white"),
    "rotate90": lambda im: im.transpose(Image.ROTATE_90),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(3)),
    "jpeg10": lambda im: _jpeg(im, 10),
    "colour": _colour,
    "caption": _caption,
    "screenshot": _screenshot,
    "aspect": lambda im: im.resize((round(im.width * 1.4), round(im.height * 0.8))),
}


@pytest.fixture(scope="module")
def tiles() -> list[Image.Image]:
    """Two non-overlapping quarters of the astronaut photo (256 px)."""
    img = photo("astronaut", max_side=512)
    h, w = img.height // 2, img.width // 2
    return [img.crop((0, 0, w, h)), img.crop((w, h, 2 * w, 2 * h))]


def _all_pairs(n: int) -> PairSet:
    i, j = np.triu_indices(n, 1)
    return PairSet(i.astype(np.int64), j.astype(np.int64), np.full(i.size, 0.5))


def test_every_edit_is_a_verified_copy(tiles):
    original = tiles[0]
    values = [original] + [edit(original) for edit in EDITS.values()]
    n = len(values)
    pairs = PairSet(np.zeros(n - 1, np.int64), np.arange(1, n), np.full(n - 1, 0.7))
    v = verify_pairs(pairs, values, num_workers=0)
    frame = v.to_frame()
    frame["edit"] = list(EDITS)
    assert v.verified.all(), frame[~frame.verified].to_string()
    assert set(v.how) <= {"hash", "geometry"}
    # the evidence is there: a hash distance for every pair, inliers where geometry ran
    assert (v.hash_distance >= 0).all()
    assert (v.inliers[v.how == "geometry"] >= GeometricOptions().min_inliers).all()
    assert v.mirrored[list(EDITS).index("hflip")]


def test_other_tiles_of_one_photo_are_rejected(tiles):
    v = verify_pairs(_all_pairs(2), tiles, num_workers=0)
    assert not v.verified.any()
    assert v.how[0] == "rejected"
    assert len(v.pairs) == 0


def test_tiles_of_four_photos_are_all_rejected():
    """The hard negatives of the issue: the four quarters of each of four photos, every
    one of the 120 pairs a candidate, none verified (same concept, different pixels)."""
    quarters = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = photo(name, max_side=512)
        h, w = img.height // 2, img.width // 2
        quarters += [
            img.crop((x * w, y * h, (x + 1) * w, (y + 1) * h)) for y in (0, 1) for x in (0, 1)
        ]
    v = verify_pairs(_all_pairs(len(quarters)), quarters, num_workers=2)
    frame = v.to_frame()
    assert len(v) == 120 and not v.verified.any(), frame[frame.verified].to_string()
    assert set(v.how) == {"rejected"}


def test_small_images_are_upscaled_and_large_ones_downscaled(tiles):
    """A 48 px thumbnail of a crop, a 2000 px enlargement and a 60 px mirrored thumbnail
    of one tile: features come from images of the same working size, and all three pairs
    verify by geometry (the hash is turned off)."""
    opts = GeometricOptions()
    tile = tiles[0]
    values = [
        EDITS["crop30"](tile).resize((48, 48), Image.LANCZOS),
        tile.resize((2000, 2000), Image.BICUBIC),
        ImageOps.mirror(tile.resize((60, 60), Image.LANCZOS)),
    ]
    for im in values:
        assert extract_features(im, opts).width == opts.side  # square: the longer side
    v = verify_pairs(_all_pairs(3), values, num_workers=0, hash_max_distance=-1)
    assert v.verified.all() and set(v.how) == {"geometry"}, v.to_frame().to_string()
    assert v.mirrored[1] and v.mirrored[2] and not v.mirrored[0]


def test_the_hash_settles_exact_copies_without_features(tiles):
    values = [tiles[0], tiles[0].copy(), _jpeg(tiles[0], 90)]
    v = verify_pairs(_all_pairs(3), values, num_workers=0)
    assert v.verified.all() and (v.how == "hash").all()
    assert v.counts["images_featured"] == 0


def test_mirror_hash_and_mirror_descriptors(tiles):
    a, b = tiles[0], ImageOps.mirror(tiles[0])
    d, mirrored = hash_distance(perceptual_hashes(a), perceptual_hashes(b))
    assert mirrored and d <= 8
    opts = GeometricOptions()
    match = match_features(extract_features(a, opts), extract_features(b, opts), opts)
    assert match.mirrored and match.verified(opts)


def test_bad_images_give_a_reason_never_an_exception(tiles, tmp_path):
    values = [
        tiles[0],
        b"not an image at all",
        Image.new("RGB", (8, 8), "red"),  # too small for features
        Image.new("RGB", (200, 200), (90, 90, 90)),  # flat: no keypoints
        str(tmp_path / "missing.jpg"),
    ]
    v = verify_pairs(_all_pairs(len(values)), values, num_workers=0, hash_max_distance=-1)
    assert not v.verified[v.candidates.i == 0].any()
    keys = zip(v.candidates.i.tolist(), v.candidates.j.tolist(), strict=True)
    how = dict(zip(keys, v.how, strict=True))
    assert how[(0, 1)].startswith("load_error")
    assert how[(0, 2)] == "too_small"
    assert how[(0, 3)] == "no_features"
    assert how[(0, 4)].startswith("load_error")
    assert set(v.failures) == {1, 2, 3, 4}


def test_results_do_not_depend_on_workers(tiles):
    values = [tiles[0], tiles[1]] + [
        EDITS[e](tiles[k]) for k in (0, 1) for e in ("hflip", "crop30", "blur")
    ]
    pairs = _all_pairs(len(values))
    one = verify_pairs(pairs, values, num_workers=0).to_frame()
    two = verify_pairs(pairs, values, num_workers=2).to_frame()
    pd.testing.assert_frame_equal(one, two)
    group = np.array([0, 1, 0, 0, 0, 1, 1, 1])
    same = group[pairs.i] == group[pairs.j]
    verified = one.verified.to_numpy()
    assert not (verified & ~same).any(), one[verified & ~same].to_string()
    with_original = same & np.isin(pairs.i, [0, 1])  # blur vs crop30 may stay unverified
    assert verified[with_original].all(), one[with_original & ~verified].to_string()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="hash_max_distance"):
        verify_pairs(PairSet.empty(), [], hash_max_distance=999)
    with pytest.raises(ValueError, match="num_workers"):
        verify_pairs(PairSet.empty(), [], num_workers=-1)
    with pytest.raises(ValueError, match="min_inliers"):
        GeometricOptions(min_inliers=2)
    with pytest.raises(ValueError, match="rows outside"):
        verify_pairs(PairSet(np.array([0]), np.array([5]), np.array([0.9])), [1, 2])


def test_operator_decides_on_verified_pairs(encoder, tiles):
    from dedup_index.operator.filter import ImageDeduplicateFilter

    a, b = tiles
    rows = [a, EDITS["hflip"](a), b, EDITS["crop30"](a), b"garbage", EDITS["caption"](b)]
    frame = pd.DataFrame({"image": rows, "id": range(len(rows))})

    # threshold 0: every pair is a candidate; only verification tells copies apart
    plain, verified = MemoryStorage(frame), MemoryStorage(frame)
    ImageDeduplicateFilter(threshold=0.0, encoder=encoder).run(plain)
    filt = ImageDeduplicateFilter(threshold=0.0, encoder=encoder, verify="geometric")
    filt.run(verified)
    assert plain.written[-1]["id"].tolist() == [0]
    assert verified.written[-1]["id"].tolist() == [0, 2]
    rejects = filt.last_report.rejects.set_index("row")
    assert rejects.loc[1, "duplicate_of_row"] == 0 and rejects.loc[3, "duplicate_of_row"] == 0
    assert rejects.loc[5, "duplicate_of_row"] == 2
    assert rejects.loc[4, "reject_reason"] == "load_error"
    evidence = filt.last_report.result.info["verification"]
    assert evidence.counts["candidates"] == 10 and evidence.counts["verified"] == 4


def test_verify_none_is_todays_behaviour(encoder, tiles):
    from dedup_index.operator.filter import ImageDeduplicateFilter

    rows = [tiles[0], EDITS["hflip"](tiles[0]), tiles[1], EDITS["blur"](tiles[1])]
    frame = pd.DataFrame({"image": rows})

    runs = []
    for extra in ({}, {"verify": "none"}):
        storage = MemoryStorage(frame)
        filt = ImageDeduplicateFilter(threshold=0.97, encoder=encoder, **extra)
        filt.run(storage)
        runs.append((storage.written[-1], filt.last_report))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    assert runs[0][1].result.pairs.equals(runs[1][1].result.pairs)
    assert "verification" not in runs[1][1].result.info
    assert runs[1][1].threshold == 0.97


def test_operator_refuses_unknown_verify(encoder):
    from dedup_index.operator.filter import ImageDeduplicateFilter

    with pytest.raises(ValueError, match="verify must be one of"):
        ImageDeduplicateFilter(encoder=encoder, verify="sift")


def test_candidate_threshold_is_the_models_unless_given(encoder):
    from dedup_index.encode.models import MODELS
    from dedup_index.operator.filter import ImageDeduplicateFilter
    from dedup_index.verify import candidate_threshold

    recorded = MODELS["efficientnet-lite0"].candidate_threshold
    assert recorded == 0.4 < MODELS["efficientnet-lite0"].threshold
    assert candidate_threshold("efficientnet-lite0", 0.75)[0] == recorded
    assert candidate_threshold("/models/efficientnet-lite0/", 0.75)[0] == recorded  # a folder
    assert candidate_threshold("some/other-model", 0.9)[0] == 0.9
    assert candidate_threshold("openai/clip-vit-base-patch32", 0.9)[0] == 0.9  # not measured
    given = ImageDeduplicateFilter(threshold=0.8, encoder=encoder, verify="geometric")
    assert given.threshold == 0.8 and given.threshold_source == "given"


def test_cli_run_verify_writes_the_evidence(tiny_clip, tiles, tmp_path, capsys):
    from dedup_index.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    tiles[0].save(folder / "a.png")
    ImageOps.mirror(tiles[0]).save(folder / "a_mirror.png")
    tiles[1].save(folder / "b.png")
    pairs = tmp_path / "pairs.parquet"
    argv = ["run", str(folder), "--model", tiny_clip, "--threshold", "0", "--workers", "0"]
    report = tmp_path / "report.html"
    code = main(
        [*argv, "--verify", "geometric", "--pairs", str(pairs), "--no-progress"]
        + ["--report", str(report)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 rows in, 2 kept, 1 removed" in out
    html = report.read_text(encoding="utf-8")  # what verification removed, with evidence
    assert "Candidates verification did not confirm (2)" in html
    assert "Verified pairs (1)" in html and html.count("data:image/jpeg;base64,") >= 6
    verified = pd.read_parquet(pairs)
    assert verified[["key_i", "key_j"]].values.tolist() == [["a.png", "a_mirror.png"]]
    assert {"similarity", "hash_distance", "inliers", "how", "mirrored"} <= set(verified)
    candidates = pd.read_parquet(tmp_path / "pairs.candidates.parquet")
    assert len(candidates) == 3 and candidates["verified"].sum() == 1
    with pytest.raises(SystemExit) as exc:  # argparse's choices: exit 2
        main([*argv, "--verify", "sift"])
    assert exc.value.code == 2


def test_hashes_and_features_are_cached_with_the_embeddings(encoder, tiles, tmp_path):
    from dedup_index.operator.filter import ImageDeduplicateFilter

    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for name, im in {"a": tiles[0], "a_crop": EDITS["crop30"](tiles[0]), "b": tiles[1]}.items():
        im.save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    frame = pd.DataFrame({"image": paths})

    cache = tmp_path / "cache"
    runs = []
    for _ in range(2):
        filt = ImageDeduplicateFilter(
            threshold=0.0, encoder=encoder, verify="geometric", cache_dir=cache, num_workers=0
        )
        storage = MemoryStorage(frame)
        filt.run(storage)
        runs.append((storage.written[-1]["image"].tolist(), filt.last_report))
    assert runs[0][0] == runs[1][0] == [paths[0], paths[2]]
    assert runs[1][1].cached == 3 and runs[1][1].embedded == 0
    assert len(list((cache / "verify").rglob("*.sift.npz"))) == 3
    first, second = (r.result.info["verification"].to_frame() for _, r in runs)
    pd.testing.assert_frame_equal(first, second)


@pytest.mark.slow
def test_ray_path_verifies_like_one_machine(tiny_clip, encoder, tiles, tmp_path):
    """``ImageDeduplicateFilter(ray=True, verify="geometric")`` and ``dedup-index run --ray
    ADDRESS --verify geometric`` (a child process joining the cluster) keep, remove and
    give the evidence one machine does.  Slow: a local Ray cluster and its actors."""
    import subprocess
    import sys
    from pathlib import Path

    ray = pytest.importorskip("ray")
    from dedup_index.operator.filter import ImageDeduplicateFilter

    folder = tmp_path / "photos"
    folder.mkdir()
    a, b = tiles
    images = {
        "a.png": a,
        "b.png": b,
        "a_hflip.png": EDITS["hflip"](a),
        "b_caption.png": EDITS["caption"](b),
        "a_crop.png": EDITS["crop30"](a),
    }
    for name, im in images.items():
        im.save(folder / name)
    values = [*images, "missing.png"]

    options = {"threshold": 0.0, "image_root": folder, "verify": "geometric", "num_workers": 0}
    table = pd.DataFrame({"image": values, "n": range(len(values))})
    local, on_ray = MemoryStorage(table), MemoryStorage(table)
    one = ImageDeduplicateFilter(tiny_clip, encoder=encoder, **options)
    one.run(local)
    assert local.written[-1]["image"].tolist() == ["a.png", "b.png"]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        filt = ImageDeduplicateFilter(tiny_clip, batch_size=4, ray=True, **options)
        filt.run(on_ray)
        assert filt.last_report.result.backend == "ray"
        assert on_ray.written[-1]["image"].tolist() == local.written[-1]["image"].tolist()
        got, want = filt.last_report.rejects, one.last_report.rejects
        for column in ("n", "reject_reason", "duplicate_of_row"):
            assert got[column].tolist() == want[column].tolist()
        evidence = [
            r.result.info["verification"].to_frame() for r in (one.last_report, filt.last_report)
        ]
        columns = ["i", "j", "hash_distance", "inliers", "matches", "verified", "how"]
        pd.testing.assert_frame_equal(evidence[0][columns], evidence[1][columns])

        listing = tmp_path / "list.txt"
        listing.write_text("\n".join(values) + "\n")
        address = ray.get_runtime_context().gcs_address
        script = str(Path(sys.executable).with_name("dedup-index"))
        cmd = [script, "run", str(listing), "--image-root", str(folder), "--model", tiny_clip]
        cmd += ["--threshold", "0", "--ray", address, "--no-progress", "--verify", "geometric"]
        cmd += ["--out", str(tmp_path / "kept.jsonl"), "--pairs", str(tmp_path / "p.parquet")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        kept = pd.read_json(tmp_path / "kept.jsonl", lines=True)
        assert kept["image"].tolist() == local.written[-1]["image"].tolist()
        pairs = pd.read_parquet(tmp_path / "p.parquet")
        assert sorted(map(tuple, pairs[["key_i", "key_j"]].values.tolist())) == [
            ("a.png", "a_crop.png"),
            ("a.png", "a_hflip.png"),
            ("a_hflip.png", "a_crop.png"),
            ("b.png", "b_caption.png"),
        ]
    finally:
        if started:
            ray.shutdown()
