"""A verifying index (issue 14): ``DedupIndex.add_images(verify="geometric")``.

Real edited photos (scikit-image tiles and the edits of tests/test_verify.py) on disk, the
tiny real CLIP at threshold 0 (every pair is a candidate, so verification alone tells the
copies apart), the exact blocked search and real SIFT.  Adding in two batches, with a
reopen between, gives what the operator's one-shot ``verify="geometric"`` gives on the
concatenation; an indexed image that is gone leaves its pairs not verified, with a reason.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from conftest import MemoryStorage, photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_verify import EDITS

from dedup_index.index import DedupIndex, IndexError_

pytest.importorskip("cv2")

OPTS = {"num_workers": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two tiles of the astronaut and one of the coffee photo, edited copies of each."""
    root = tmp_path_factory.mktemp("photos")
    img = photo("astronaut", max_side=512)
    h, w = img.height // 2, img.width // 2
    a, b = img.crop((0, 0, w, h)), img.crop((w, h, 2 * w, 2 * h))
    c = photo("coffee", max_side=256)
    images = {
        "a.png": a,
        "b.png": b,
        "a_hflip.png": EDITS["hflip"](a),
        "c.png": c,
        "a_crop.png": EDITS["crop30"](a),
        "b_caption.png": EDITS["caption"](b),
        "c_rotate.png": EDITS["rotate12"](c),
        "b_jpeg.png": EDITS["jpeg10"](b),
    }
    for name, im in images.items():
        im.save(root / name)
    return root


NAMES = [
    "a.png",
    "b.png",
    "a_hflip.png",
    "c.png",
    "a_crop.png",
    "b_caption.png",
    "c_rotate.png",
    "b_jpeg.png",
]


def _one_shot(encoder, folder, names, **options):
    from dedup_index.operator.filter import ImageDeduplicateFilter

    filt = ImageDeduplicateFilter(
        threshold=0.0,
        encoder=encoder,
        verify="geometric",
        image_root=folder,
        num_workers=0,
        **options,
    )
    filt.run(MemoryStorage(pd.DataFrame({"image": names})))
    return filt.last_report


def test_two_batches_equal_the_operators_one_shot(encoder, folder, tmp_path):
    report = _one_shot(encoder, folder, NAMES)
    one_shot = report.result
    removed_once = {NAMES[r] for r in report.rejects["row"]}
    assert removed_once == {
        "a_hflip.png",
        "a_crop.png",
        "b_caption.png",
        "c_rotate.png",
        "b_jpeg.png",
    }

    path = tmp_path / "index"
    index = DedupIndex.create(path, encoder.dim, 0.0, verify="geometric")
    first = index.add_images(NAMES[:4], encoder=encoder, image_root=folder, verify_options=OPTS)
    index.close()
    with DedupIndex.open(path, mode="a") as index:
        assert index.verify_mode == "geometric"
        second = index.add_images(
            NAMES[4:], encoder=encoder, image_root=folder, verify_options=OPTS
        )
        removed = {
            k for r in (first, second) for k, kept in zip(r.keys, r.kept, strict=True) if not kept
        }
        assert removed == removed_once
        # the same verified pairs, the same decisions row by row
        assert index.pairs().equals(one_shot.pairs)
        state = index.decisions()
        assert np.array_equal(state["keep"], one_shot.keep)
        assert np.array_equal(state["duplicate_of"], one_shot.duplicate_of)
        assert np.array_equal(state["nearest"], one_shot.max_similarity)
        # the second add's evidence: every candidate involving its rows, verified or not
        v = second.verification
        assert len(v) == 4 * 4 + 6  # new x old, and among the new rows
        assert set(v.how) <= {"hash", "geometry", "rejected"}
        evidence = one_shot.info["verification"].to_frame().set_index(["i", "j"])
        mine = v.to_frame().set_index(["i", "j"])
        pd.testing.assert_frame_equal(mine, evidence.loc[mine.index])
        assert second.verification_keys[int(v.candidates.i[0])] in NAMES
        assert index.stats()["verify"] == "geometric"
        assert list((path / "verify").rglob("*.hash.npz"))  # cached in the index folder


def test_an_indexed_image_gone_leaves_its_pairs_not_verified(encoder, folder, tmp_path, caplog):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    with DedupIndex.create(tmp_path / "index", encoder.dim, 0.0, verify="geometric") as index:
        index.add_images(
            ["a.png", "b.png"],
            encoder=encoder,
            image_root=photos,
            verify_options={**OPTS, "cache_dir": None},
        )
        (photos / "a.png").unlink()
        with caplog.at_level(logging.WARNING, logger="dedup_index.index.core"):
            result = index.add_images(
                ["a_crop.png", "b_jpeg.png"],
                encoder=encoder,
                image_root=photos,
                verify_options={**OPTS, "cache_dir": None},
            )
    assert result.kept.tolist() == [True, False]  # a is gone: a_crop stays; b_jpeg goes
    assert result.duplicate_of == [None, "b.png"]
    v = result.verification.to_frame()
    gone = v[(v.i == 0)]
    assert (~gone.verified).all() and gone.how.str.startswith("load_error").all()
    assert "a.png" in caplog.text and "not verified" in caplog.text


def test_content_keys_cannot_be_verified_against_and_say_so(encoder, folder, tmp_path):
    data = (folder / "a.png").read_bytes()
    with DedupIndex.create(tmp_path / "index", encoder.dim, 0.0, verify="geometric") as index:
        index.add_images([data], encoder=encoder, verify_options=OPTS)  # keyed sha256:...
        result = index.add_images(
            [str(folder / "a_hflip.png")], encoder=encoder, verify_options=OPTS
        )
    assert result.kept.tolist() == [True]
    assert result.verification.how[0].startswith("not_reloadable")


def test_verification_modes_never_mix(encoder, folder, tmp_path):
    plain = DedupIndex.create(tmp_path / "plain", encoder.dim, 0.0)
    with plain:
        plain.add_images(["a.png"], encoder=encoder, image_root=folder)
        with pytest.raises(IndexError_, match="verify='none'.*would mix"):
            plain.add_images(["b.png"], encoder=encoder, image_root=folder, verify="geometric")
    with DedupIndex.create(tmp_path / "empty", encoder.dim, 0.5) as empty:  # adopts
        empty.add_images(
            ["a.png"], encoder=encoder, image_root=folder, verify="geometric", verify_options=OPTS
        )
        assert empty.verify_mode == "geometric"
        with pytest.raises(ValueError, match="pass the rows' images"):
            empty.add(np.ones((1, encoder.dim), np.float32), ["x"])
        with pytest.raises(ValueError, match="verify must be one of"):
            empty.add_images(["b.png"], encoder=encoder, image_root=folder, verify="sift")


def test_remove_keeps_the_verified_pairs_of_the_rows_left(encoder, folder, tmp_path):
    with DedupIndex.create(tmp_path / "index", encoder.dim, 0.0, verify="geometric") as index:
        index.add_images(NAMES[:4], encoder=encoder, image_root=folder, verify_options=OPTS)
        before = index.pairs()
        assert len(before) == 1  # a / a_hflip only; every other pair was a rejected candidate
        index.remove(["b.png"])
        assert index.pairs().equals(before)
        index.remove(["a.png"])
        assert len(index.pairs()) == 0 and index.decisions()["keep"][2]


def test_operator_with_an_index_verifies(encoder, folder, tmp_path):
    from dedup_index.operator.filter import ImageDeduplicateFilter

    def run(names):
        storage = MemoryStorage(pd.DataFrame({"image": names}))
        ImageDeduplicateFilter(
            threshold=0.0,
            encoder=encoder,
            verify="geometric",
            image_root=folder,
            num_workers=0,
            index_path=tmp_path / "index",
        ).run(storage)
        return storage.written[-1]["image"].tolist()

    assert run(NAMES[:4]) == ["a.png", "b.png", "c.png"]
    assert run(NAMES[4:]) == []
    with DedupIndex.open(tmp_path / "index") as index:
        assert index.verify_mode == "geometric" and len(index) == 8


def test_cli_index_add_verify(tiny_clip, folder, tmp_path, capsys, monkeypatch):
    import shutil

    from dedup_index.cli import main

    for week, names in {"week1": ["a.png"], "week2": ["a_hflip.png", "b.png"]}.items():
        (tmp_path / week).mkdir()
        for name in names:
            shutil.copy(folder / name, tmp_path / week / name)
    monkeypatch.chdir(tmp_path)  # keys are paths as given, loaded again from here
    assert main(["index", "create", "idx", "--model", tiny_clip, "--threshold", "0"]) == 0
    argv = ["index", "add", "idx", "--workers", "0"]
    assert main([*argv, "week1", "--verify", "geometric"]) == 0  # the empty index takes it
    capsys.readouterr()
    code = main([*argv, "week2", "--out", "added.jsonl"])  # the index's own mode
    text = capsys.readouterr().out
    assert code == 0, text
    assert "verification: 3 candidate pairs: 1 verified" in text
    rows = pd.read_json(tmp_path / "added.jsonl", lines=True)
    assert rows["key"].tolist() == ["week2/a_hflip.png", "week2/b.png"]
    assert rows["kept"].tolist() == [False, True]
    assert rows["duplicate_of"].tolist()[0] == "week1/a.png"
    np.save(tmp_path / "e.npy", np.ones((1, 32), np.float32))
    assert main(["index", "add", "idx", "e.npy"]) == 2
    assert "verification needs images" in capsys.readouterr().err


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    order=st.permutations(NAMES),
    cuts=st.sets(st.integers(1, len(NAMES) - 1), max_size=3),
    reopen=st.booleans(),
    policy=st.sampled_from(["reference", "greedy", "component"]),
)
def test_any_batches_equal_one_shot_on_verified_pairs(
    encoder, folder, tmp_path_factory, order, cuts, reopen, policy
):
    """Any order, any cuts, any policy: the index's decisions and pairs are the one-shot
    operator's on the concatenation (hashes and features cached once for all examples,
    in a folder both use)."""
    cache = folder.parent / f"{folder.name}-verify-cache"
    report = _one_shot(encoder, folder, list(order), policy=policy, cache_dir=cache)
    one = report.result
    path = tmp_path_factory.mktemp("idx") / "index"
    index = DedupIndex.create(path, encoder.dim, 0.0, policy=policy, verify="geometric")
    options = {"num_workers": 0, "cache_dir": cache}
    for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(order)], strict=True):
        index.add_images(order[a:b], encoder=encoder, image_root=folder, verify_options=options)
        if reopen:
            index.close()
            index = DedupIndex.open(path, mode="a")
    with index:
        state, pairs = index.decisions(), index.pairs()
    # the same verified pairs (scores up to the encoder's batch-dependent last bits) ...
    assert np.array_equal(pairs.i, one.pairs.i) and np.array_equal(pairs.j, one.pairs.j)
    np.testing.assert_allclose(pairs.s, one.pairs.s, atol=1e-6)
    # ... and the same decisions
    assert np.array_equal(state["keep"], one.keep)
    assert np.array_equal(state["duplicate_of"], one.duplicate_of)
    assert np.array_equal(state["group"], one.group)
