"""The parallel embedding pipeline: fidelity to the checkpoints' processors, failures reported
exactly as the loader reports them, results independent of batch size and worker count."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import COPY_THRESHOLD, MemoryStorage, jpeg_bytes, photo
from PIL import Image

from dedup_index import ImageDeduplicateFilter, ModelLoadError
from dedup_index.encode import load_encoder
from dedup_index.encode.clip import CLIPEncoder, HFImageEncoder, _as_tensor
from dedup_index.encode.pipeline import (
    EmbeddedBatch,
    _Loader,
    default_num_workers,
    embed_images,
    iter_embedded_batches,
)
from dedup_index.encode.preprocess import Preprocessor
from dedup_index.io import load_image, try_load_image

FIDELITY = 0.999


def _pil_processor(name: str):
    import transformers

    try:
        return getattr(transformers, f"{name}ImageProcessorPil")
    except AttributeError:  # transformers 4.x
        return getattr(transformers, f"{name}ImageProcessor")


# --------------------------------------------------------------------------- test images


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> str:
    img.save(path, fmt, **kw)
    return str(path)


@pytest.fixture(scope="module")
def hard_images(tmp_path_factory) -> dict[str, str]:
    """Files that stress preprocessing: large JPEGs (drafted), extreme aspect ratios, tiny,
    grayscale, alpha, CMYK, EXIF-rotated."""
    folder = tmp_path_factory.mktemp("hard")
    big = photo("coffee", max_side=600).resize((1600, 1067), Image.Resampling.BICUBIC)
    rotated = photo("astronaut", max_side=512).resize((900, 600))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rgba = photo("chelsea", max_side=300).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return {
        "astronaut_512": _save(photo("astronaut", 512), folder / "a.jpg", "JPEG", quality=92),
        "coffee_1600x1067": _save(big, folder / "big.jpg", "JPEG", quality=90),
        "wide_2000x90": _save(
            photo("rocket", 640).resize((2000, 90)), folder / "w.jpg", "JPEG", quality=90
        ),
        "tall_60x1400": _save(
            photo("chelsea", 451).resize((60, 1400)), folder / "t.jpg", "JPEG", quality=90
        ),
        "tiny_5x3_png": _save(photo("coffee").resize((5, 3)), folder / "tiny.png", "PNG"),
        "one_pixel_jpeg": _save(Image.new("RGB", (1, 1), (200, 30, 90)), folder / "1.jpg", "JPEG"),
        "gray_camera_jpeg": _save(
            photo("camera", 512).convert("L"), folder / "g.jpg", "JPEG", quality=90
        ),
        "gray_png": _save(photo("moon", 300).convert("L"), folder / "g.png", "PNG"),
        "rgba_png": _save(rgba, folder / "rgba.png", "PNG"),
        "cmyk_jpeg": _save(
            photo("rocket", 640).convert("CMYK"), folder / "cmyk.jpg", "JPEG", quality=90
        ),
        "exif_rotated_jpeg": _save(rotated, folder / "rot.jpg", "JPEG", quality=90, exif=exif),
    }


# --------------------------------------------------------------------------- fidelity


def _reference(model, processor, images) -> np.ndarray:
    """The upstream way: the checkpoint's processor + get_image_features, normalised."""
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        feats = _as_tensor(model.get_image_features(pixel_values=pixels))
    return torch.nn.functional.normalize(feats.float(), dim=-1).numpy()


@pytest.fixture(scope="module")
def clip224(tmp_path_factory) -> str:
    from dedup_index.encode.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip224"), seed=3, image_size=224)


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> str:
    from transformers import SiglipConfig, SiglipModel

    path = tmp_path_factory.mktemp("siglip")
    config = SiglipConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 96,
            "patch_size": 16,
        },
    )
    torch.manual_seed(1)
    SiglipModel(config).save_pretrained(path)
    _pil_processor("Siglip")(size={"height": 96, "width": 96}).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("checkpoint", ["clip224", "tiny_siglip"])
def test_embeddings_match_the_checkpoint_processor(request, checkpoint, hard_images):
    path = request.getfixturevalue(checkpoint)
    encoder = load_encoder(path, device="cpu", batch_size=4)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path).eval()
    processor_class = _pil_processor("CLIP" if checkpoint == "clip224" else "Siglip")
    processor = processor_class.from_pretrained(path)
    names = list(hard_images)
    files = [hard_images[n] for n in names]
    ours, positions, failures = embed_images(files, encoder, batch_size=4, num_workers=1)
    assert not failures and positions == list(range(len(files)))
    ref = _reference(model, processor, [load_image(f) for f in files])
    cos = (ours * ref).sum(axis=1)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    bad = {n: float(c) for n, c in zip(names, cos, strict=True) if c < FIDELITY}
    assert not bad, f"cosine below {FIDELITY}: {bad}"
    # Without reduced-scale JPEG decoding the preprocessing is the processor's, to fp noise.
    exact = load_encoder(path, device="cpu", batch_size=4, draft_factor=0)
    same, _, _ = embed_images(files, exact, batch_size=4, num_workers=0)
    assert np.abs(same - ref).max() < 1e-5


def test_efficientnet_pipeline_keeps_its_real_features(hard_images):
    """A real model (distinct photos < 0.6 apart) sees drafted JPEGs as the same image."""
    lite = load_encoder("efficientnet-lite0", device="cpu", batch_size=8)
    files = list(hard_images.values())
    ours, positions, _ = embed_images(files, lite, batch_size=8, num_workers=1)
    ref = lite.encode([load_image(f) for f in files])  # full-size decode, main thread
    cos = (ours * ref).sum(axis=1)
    assert positions == list(range(len(files)))
    assert cos.min() >= FIDELITY, dict(zip(hard_images, cos.round(5).tolist(), strict=True))


def test_preprocessor_equals_the_processors_pixels_for_odd_shapes():
    from transformers import CLIPImageProcessor  # noqa: F401 - present in 4.x and 5.x

    shapes = [(512, 512), (2000, 90), (60, 1400), (5, 3), (1, 1), (223, 225)]
    configs = [
        _pil_processor("CLIP")(),
        _pil_processor("CLIP")(
            size={"shortest_edge": 200}, crop_size={"height": 224, "width": 224}
        ),  # crop larger than the resize: zero padding
        _pil_processor("Siglip")(size={"height": 96, "width": 128}),
    ]
    base = photo("astronaut", 512)
    for processor in configs:
        pre = Preprocessor.from_processor(processor)
        for w, h in shapes:
            img = base.resize((w, h))
            ref = processor(images=[img], return_tensors="np")["pixel_values"][0]
            assert np.abs(pre(img) - ref).max() < 1e-5, (processor, (w, h))


def test_preprocessor_reads_the_config_and_pickles():
    cfg = {
        "do_resize": True,
        "size": {"shortest_edge": 336},
        "do_center_crop": True,
        "crop_size": {"height": 336, "width": 336},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
    }
    pre = Preprocessor.from_config(cfg)
    assert pre.output_size == (336, 336) and pre.mean == (0.5,) * 3 and pre.std == (0.25,) * 3
    assert pickle.loads(pickle.dumps(pre)) == pre
    assert pre.draft_scale(4000, 3000) == 4  # 750 >= 2 * 336
    assert pre.draft_scale(1000, 700) == 1
    assert (
        Preprocessor.from_config({**cfg, "size": {"height": 64, "width": 32}}).draft_scale(
            1000, 300
        )
        == 2
    )  # a fixed size: both sides cover twice the larger target side
    with pytest.raises(ValueError, match="longest_edge"):
        Preprocessor.from_config({**cfg, "size": {"shortest_edge": 224, "longest_edge": 300}})
    with pytest.raises(ValueError, match="draft_factor"):
        Preprocessor(draft_factor=-1)
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocessor(std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="exactly one"):
        Preprocessor(shortest_edge=None)


# --------------------------------------------------------------------------- behaviour


class EncodeOnly:
    """A user's encoder with nothing but ``encode(images)`` (tests' wrappers look like this)."""

    def __init__(self, inner):
        self.inner, self.dim, self.model_name = inner, inner.dim, inner.model_name
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return self.inner.encode(images)


def _mixed_values(tmp_path: Path) -> list:
    good = jpeg_bytes(photo("astronaut", 400))
    big_path = tmp_path / "big.jpg"
    photo("coffee", 600).resize((1200, 800)).save(big_path, "JPEG")
    truncated = jpeg_bytes(photo("chelsea", 300))[:2000]
    return [
        good,  # 0 bytes
        str(big_path),  # 1 a path, drafted
        b"not an image at all",  # 2 not_an_image
        None,  # 3 empty
        "https://example.com/x.jpg",  # 4 url_not_fetched
        str(tmp_path / "missing.jpg"),  # 5 missing_file
        truncated,  # 6 truncated
        photo("rocket", 200),  # 7 PIL image
        np.asarray(photo("camera", 100)),  # 8 array
        {"bytes": None, "path": "big.jpg"},  # 9 datasets dict, relative path
        "big.jpg",  # 10 relative path (image_root)
        {"bytes": good, "path": "x.jpg"},  # 11 datasets dict with bytes
        12345,  # 12 unsupported_type
        "",  # 13 empty
        str(tmp_path),  # 14 a directory
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_failures_are_reported_exactly_as_the_loader_reports_them(tmp_path, encoder, num_workers):
    values = _mixed_values(tmp_path)
    options = {"image_root": tmp_path, "max_pixels": 1_000_000}
    expected = [try_load_image(v, **options) for v in values]
    exp_failures = [(i, f) for i, (_, f) in enumerate(expected) if f is not None]
    exp_positions = [i for i, (img, _) in enumerate(expected) if img is not None]
    assert len(exp_failures) == 8
    emb, positions, failures = embed_images(
        values, encoder, batch_size=4, num_workers=num_workers, **options
    )
    assert positions == exp_positions
    assert failures == exp_failures  # same reasons and messages, in order
    assert emb.shape == (len(exp_positions), encoder.dim)
    # The 1200x800 JPEG is over max_pixels=900_000 from its header, drafted or not.
    _, _, fails = embed_images([values[1]], encoder, max_pixels=900_000, num_workers=0)
    assert fails == [(0, try_load_image(values[1], max_pixels=900_000)[1])]
    assert fails[0][1].reason == "decompression_bomb"


def test_batches_come_in_order_with_progress(tmp_path, encoder):
    values = _mixed_values(tmp_path)
    seen = []
    batches = list(
        iter_embedded_batches(
            values, encoder, batch_size=4, num_workers=2, image_root=tmp_path, progress=seen.append
        )
    )
    assert len(batches) == 4 and seen == [4, 4, 4, 3]
    assert all(isinstance(b, EmbeddedBatch) for b in batches)
    for k, batch in enumerate(batches):
        in_range = set(range(4 * k, 4 * k + 4))
        assert set(batch.positions) | {p for p, _ in batch.failures} == in_range & set(
            range(len(values))
        )
        assert batch.embeddings.shape == (len(batch.positions), encoder.dim)
        assert len(batch.pixels) == len(batch.positions)
    # Stored sizes, not the drafted ones: the 1200x800 JPEG counts 960000 pixels.
    assert batches[0].pixels[batches[0].positions.index(1)] == 1200 * 800


def test_batch_size_and_workers_do_not_change_results(tmp_path, encoder):
    values = _mixed_values(tmp_path)
    runs = {
        (bs, nw): embed_images(values, encoder, batch_size=bs, num_workers=nw, image_root=tmp_path)
        for bs, nw in [(1, 0), (3, 0), (3, 2), (32, 0), (5, 1)]
    }
    ref_emb, ref_pos, ref_fail = runs[(3, 0)]
    for (bs, nw), (emb, pos, fail) in runs.items():
        assert pos == ref_pos and fail == ref_fail
        if bs == 3:
            assert np.array_equal(emb, ref_emb), "workers change nothing, bit for bit"
        assert np.abs(emb - ref_emb).max() < 1e-5, (bs, nw)


def test_an_encode_only_encoder_works_in_workers(tmp_path, encoder):
    values = _mixed_values(tmp_path)
    plain = EncodeOnly(encoder)
    emb, positions, failures = embed_images(
        values, plain, batch_size=4, num_workers=2, image_root=tmp_path
    )
    # It gets the loader's full-size images (no draft), so it equals encode() on them.
    ref = encoder.encode([load_image(values[p], image_root=tmp_path) for p in positions])
    assert np.abs(emb - ref).max() < 1e-5
    assert plain.calls == 3 and len(failures) == 8  # the last range has no image


def test_drafted_decode_is_smaller_and_the_same_picture(tmp_path):
    path = tmp_path / "big.jpg"
    photo("coffee", 600).resize((1600, 1200)).save(path, "JPEG", quality=90)
    pre = Preprocessor(shortest_edge=224, crop=(224, 224))
    image, npix, full_size = _Loader(None, None, pre)._load_drafted(str(path))
    assert image.size == (800, 600) and npix == 1600 * 1200  # scale 2 keeps >= 2 x 224
    assert full_size == (1600, 1200)
    full = load_image(path)
    a = pre.to_uint8(image, full_size).astype(np.float32)
    b = pre.to_uint8(full).astype(np.float32)
    assert np.abs(a - b).mean() < 2.0  # gray levels of 255
    assert _Loader(None, None, pre)._load_drafted(str(tmp_path / "missing.jpg")) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned a quarter: 1200 x 1600
    photo("coffee", 600).resize((1600, 1200)).save(tmp_path / "rot.jpg", "JPEG", exif=exif)
    turned, _, turned_size = _Loader(None, None, pre)._load_drafted(str(tmp_path / "rot.jpg"))
    assert turned.size == (600, 800) and turned_size == (1200, 1600)
    small = tmp_path / "small.jpg"
    photo("coffee", 300).save(small, "JPEG")
    assert _Loader(None, None, pre)._load_drafted(str(small)) is None  # nothing to gain


def test_empty_input_and_bad_options(encoder):
    emb, positions, failures = embed_images([], encoder)
    assert emb.shape == (0, encoder.dim) and positions == [] and failures == []
    emb, positions, failures = embed_images([None, b""], encoder, num_workers=0)
    assert emb.shape == (0, encoder.dim) and [f.reason for _, f in failures] == ["empty"] * 2
    with pytest.raises(ValueError, match="num_workers"):
        iter_embedded_batches([None], encoder, num_workers=-1)  # checked when called
    with pytest.raises(ValueError, match="max_pixels"):
        embed_images([None], encoder, max_pixels=0)
    with pytest.raises((TypeError, ValueError), match="batch_size"):
        embed_images([None], encoder, batch_size=0)
    assert 0 <= default_num_workers() <= 4


# --------------------------------------------------------------------------- models, devices


def test_siglip_loads_by_path_with_its_own_dimension(tiny_siglip):
    enc = load_encoder(tiny_siglip, device="cpu")
    assert isinstance(enc, HFImageEncoder) and enc.dim == 32
    assert enc.preprocessor.size == (96, 96) and enc.preprocessor.crop is None
    assert enc.preprocessor.mean == (0.5, 0.5, 0.5)
    out = enc.encode([photo("coffee"), photo("astronaut")])
    assert out.shape == (2, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)


def test_a_model_without_image_features_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path)
    _pil_processor("CLIP")().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="get_image_features"):
        CLIPEncoder(str(tmp_path), device="cpu")


def test_precision_and_threads(tiny_clip):
    images = [photo("astronaut"), photo("coffee")]
    fp32 = CLIPEncoder(tiny_clip, device="cpu")
    assert fp32.precision == "fp32" and fp32.threads >= 1
    assert torch.get_num_threads() == fp32.threads
    bf16 = CLIPEncoder(tiny_clip, device="cpu", precision="bf16", threads=1)
    assert torch.get_num_threads() == 1
    cos = (fp32.encode(images) * bf16.encode(images)).sum(axis=1)
    assert cos.min() > 0.99
    with pytest.raises(ValueError, match="precision"):
        CLIPEncoder(tiny_clip, device="cpu", precision="int4")
    torch.set_num_threads(fp32.threads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_matches_cpu(tiny_clip, hard_images):
    files = list(hard_images.values())
    cpu = load_encoder(tiny_clip, device="cpu")
    gpu = load_encoder(tiny_clip, device="cuda")
    assert gpu.precision == "fp16"
    a, _, _ = embed_images(files, cpu, num_workers=0)
    b, _, _ = embed_images(files, gpu, num_workers=2)
    assert (a * b).sum(axis=1).min() > 0.999
    lite = load_encoder("efficientnet-lite0", device="cuda")
    assert lite._channels_last
    c, _, _ = embed_images(files, lite, num_workers=2)
    d, _, _ = embed_images(files, load_encoder("efficientnet-lite0", device="cpu"), num_workers=0)
    assert (c * d).sum(axis=1).min() > 0.999


# --------------------------------------------------------------------------- the operator


def test_operator_results_do_not_depend_on_workers(photo_dir, encoder):
    names = ["a.jpg", "b.jpg", "missing.jpg", "c.png", "a_reenc.jpg", "a_copy.jpg"]
    frame = pd.DataFrame({"image": names, "id": range(len(names))})
    outs = []
    for workers in (0, 2):
        storage = MemoryStorage(frame)
        filt = ImageDeduplicateFilter(
            threshold=COPY_THRESHOLD,
            encoder=encoder,
            image_root=photo_dir,
            batch_size=2,
            num_workers=workers,
        )
        filt.run(storage)
        outs.append((storage.written[0], filt.last_report))
    (out0, rep0), (out2, rep2) = outs
    pd.testing.assert_frame_equal(out0, out2)
    assert rep0.failures == rep2.failures and [p for p, _ in rep0.failures] == [2]
    assert out0["id"].tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="num_workers"):
        ImageDeduplicateFilter(encoder=encoder, num_workers=-2)


def test_jpeg_bytes_through_the_operator_are_drafted_but_equal(encoder):
    big = jpeg_bytes(photo("astronaut", 512).resize((1024, 1024)), quality=92)
    again = jpeg_bytes(Image.open(io.BytesIO(big)).convert("RGB"), quality=92)
    storage = MemoryStorage(pd.DataFrame({"image": [big, jpeg_bytes(photo("coffee")), again]}))
    filt = ImageDeduplicateFilter(threshold=COPY_THRESHOLD, encoder=encoder, num_workers=1)
    filt.run(storage)
    assert filt.last_report.rejects["duplicate_of_row"].tolist() == [0]
