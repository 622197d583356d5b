"""The CLIP encoder on a real (tiny) checkpoint loaded from disk."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import photo

from dedup_index import ModelLoadError
from dedup_index.encode import load_encoder
from dedup_index.encode.clip import CLIPEncoder, _as_tensor, resolve_device

NAMES = ["astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "moon", "horse"]


@pytest.fixture(scope="module")
def images():
    return [photo(n) for n in NAMES]


def test_unit_float32_and_equal_to_the_upstream_way(tiny_clip, encoder, images):
    ours = encoder.encode(images)
    assert ours.dtype == np.float32 and ours.shape == (len(images), encoder.dim)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # Upstream: CLIPModel + processor + get_image_features, normalised.
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        feats = _as_tensor(
            model.get_image_features(**processor(images=images, return_tensors="pt"))
        )
    feats = (feats / feats.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(ours - feats).max() < 1e-5


def test_batch_size_does_not_change_embeddings(tiny_clip, encoder, images):
    one = load_encoder(tiny_clip, device="cpu", batch_size=1).encode(images)
    assert np.abs(one - encoder.encode(images)).max() < 1e-5


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        CLIPEncoder(str(tmp_path / "no" / "such" / "model"))


def test_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load CLIP model from local directory"):
        CLIPEncoder(str(tmp_path))


@pytest.mark.parametrize("offline", ["1", None])
def test_uncached_hub_model_fails_at_once(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        # An endpoint nothing listens on: the quick check fails without retries.
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError) as info:
        CLIPEncoder("openai/clip-vit-base-patch32", device="cpu")
    message = str(info.value)
    assert "openai/clip-vit-base-patch32" in message and "not in the local cache" in message
    assert "pass the local directory as model_name" in message


def test_devices(caplog):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in {"cpu", "cuda"}
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("quantum")
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING):
            assert resolve_device("cuda") == "cpu"
        assert "CUDA is not available" in caplog.text


def test_as_tensor_accepts_both_transformers_conventions():
    t = torch.ones(2, 3)

    class Output:  # transformers 5.x returns an output object
        pooler_output = t

    assert _as_tensor(t) is t and _as_tensor(Output()) is t
    with pytest.raises(TypeError):
        _as_tensor(object())


def test_encode_equals_encode_pixels_of_the_preprocessed_batch(encoder, images):
    from dedup_index.encode.clip import HFImageEncoder

    assert HFImageEncoder is CLIPEncoder and encoder.precision == "fp32"
    pixels = np.stack([encoder.preprocessor.to_uint8(img) for img in images])
    assert pixels.dtype == np.uint8 and pixels.shape[1:] == (3, 64, 64)
    assert np.array_equal(encoder.encode_pixels(pixels), encoder.encode(images))
    assert encoder.encode_pixels(pixels[:0]).shape == (0, encoder.dim)
