"""The encoders' GPU code path, run on the CPU through the same code (issue 16, defect 9).

Out of memory is our own test double of the GPU's failure: an encoder subclass whose
forward pass raises ``torch.cuda.OutOfMemoryError`` (the class exists in CPU builds) above
a batch size, so the real retry path runs.  Tests marked ``needs CUDA`` run only where a
GPU is present (``bench/gpu_check.py`` runs them).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, photo

from dedup_index.encode import load_encoder
from dedup_index.encode.clip import CLIPEncoder
from dedup_index.encode.pipeline import embed_images, pipeline_batch_size
from dedup_index.encode.runtime import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_SIZE_CUDA,
    cuda_index,
    current_device,
    default_batch_size,
)

NAMES = ["astronaut", "coffee", "chelsea", "camera", "rocket", "moon", "page", "text", "brick"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def images():
    return [photo(name, 96) for name in NAMES]


def _failing(base: type) -> type:
    """``base`` whose forward pass runs out of "GPU memory" above ``oom_above`` images."""

    class OutOfMemoryAbove(base):
        sizes: list[int]
        oom_above: int | None = None

        def _features(self, pixels):
            self.sizes.append(int(pixels.shape[0]))
            if self.oom_above is not None and pixels.shape[0] > self.oom_above:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {pixels.shape[0]} images"
                )
            return super()._features(pixels)

    return OutOfMemoryAbove


def _build(kind: str, tiny_clip: str, limit: int | None, batch_size: int):
    if kind == "clip":
        enc = _failing(CLIPEncoder)(tiny_clip, device="cpu", batch_size=batch_size)
    else:
        pytest.importorskip("efficientnet_lite_pytorch")
        from dedup_index.encode.efficientnet import EfficientNetLiteEncoder

        enc = _failing(EfficientNetLiteEncoder)(device="cpu", batch_size=batch_size)
    enc.sizes, enc.oom_above = [], limit
    return enc


@pytest.mark.parametrize(
    ("kind", "count", "batch", "limit", "tried", "live"),
    # 8 fails, 4 fails, 2 fits; then 2 at a time for the rest of the encoder's life.
    # (Fewer, smaller passes for the slower EfficientNet on the CPU.)
    [("clip", 9, 8, 3, [8, 4, 2], 2), ("efficientnet", 5, 4, 1, [4, 2, 1], 1)],
)
def test_out_of_memory_halves_the_batch_and_gives_the_same_bits(
    kind, count, batch, limit, tried, live, tiny_clip, images, caplog
):
    images = images[:count]
    enc = _build(kind, tiny_clip, None, batch)  # one model: the un-failed run first
    reference = enc.encode(images)
    enc.sizes, enc.oom_above = [], limit
    with caplog.at_level(logging.WARNING, logger="dedup_index.encode.runtime"):
        got = enc.encode(images)
        again = enc.encode(images)
    assert enc.sizes[:3] == tried and set(enc.sizes[3:]) <= {1, live}
    assert enc.live_batch_size == live and enc.batch_size == batch
    # The same bits as passes cut at the live size from the start (every row, in order,
    # once); against the unfailed batch, equal up to float rounding: a GEMM's reduction
    # order may change with the batch's size (it does on AVX2 CPUs, not on AVX-512 ones).
    cut = np.concatenate([enc.encode(images[i : i + live]) for i in range(0, count, live)])
    assert np.array_equal(got, cut) and np.array_equal(again, cut)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and f"retrying with {batch // 2}" in warnings[0].getMessage()


def test_out_of_memory_at_one_image_raises_the_real_error(tiny_clip, images):
    enc = _build("clip", tiny_clip, 0, 4)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate 1 images"):
        enc.encode(images[:3])
    assert enc.sizes == [3, 1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_out_of_memory_inside_the_pipeline_gives_the_same_bits(
    tiny_clip, tmp_path, images, num_workers
):
    values = []
    for k, img in enumerate(images):
        (tmp_path / f"{k}.jpg").write_bytes(jpeg_bytes(img))
        values.append(str(tmp_path / f"{k}.jpg"))
    values.insert(3, str(tmp_path / "missing.jpg"))
    reference = embed_images(values, _build("clip", tiny_clip, None, 8), num_workers=0)
    enc = _build("clip", tiny_clip, 2, 8)
    got = embed_images(values, enc, num_workers=num_workers)
    assert got.positions == reference.positions and len(got.failures) == 1
    # Bit for bit as a run one image per pass (the size the retries end at); up to float
    # rounding as the unfailed run (see the test above).
    single = embed_images(values, _build("clip", tiny_clip, None, 1), num_workers=0)
    assert np.array_equal(got.embeddings, single.embeddings)
    np.testing.assert_allclose(got.embeddings, reference.embeddings, rtol=0, atol=1e-5)
    # The first batch holds 7 images (one value is missing): 7 -> 3 -> 1.
    assert enc.sizes[:3] == [7, 3, 1] and enc.live_batch_size == 1


def test_the_normalisation_is_built_once_on_the_encoders_device(encoder, images):
    scale, shift = encoder.normalization()
    encoder.encode(images[:2])
    again = encoder.normalization()
    assert again[0] is scale and again[1] is shift
    assert scale.shape == shift.shape == (1, 3, 1, 1) and scale.dtype == torch.float32
    assert str(scale.device) == encoder.device
    pixels = np.stack([encoder.preprocessor.to_uint8(img) for img in images[:3]])
    via_cached = encoder.preprocessor.normalize(torch.from_numpy(pixels), affine=(scale, shift))
    assert torch.equal(via_cached, encoder.preprocessor.normalize(torch.from_numpy(pixels)))
    np.testing.assert_array_equal(via_cached.numpy(), encoder.preprocessor.normalize_numpy(pixels))


def test_the_default_batch_is_chosen_in_one_place(tiny_clip, encoder):
    assert (DEFAULT_BATCH_SIZE, DEFAULT_BATCH_SIZE_CUDA) == (32, 256)
    assert default_batch_size("cpu") == 32
    assert default_batch_size("cuda") == default_batch_size("cuda:1") == 256
    assert default_batch_size(torch.device("cuda", 0)) == 256
    built = load_encoder(tiny_clip, device="cpu")
    assert built.batch_size == built.live_batch_size == 32
    # The pipeline cuts batches the size of the encoder's passes unless told otherwise.
    assert pipeline_batch_size(None, encoder) == encoder.batch_size == 8
    assert pipeline_batch_size(5, encoder) == 5
    assert pipeline_batch_size(None, object()) == 32
    with pytest.raises(ValueError, match="batch_size"):
        pipeline_batch_size(0, encoder)
    with pytest.raises(ValueError, match="batch_size"):
        CLIPEncoder(tiny_clip, device="cpu", batch_size=0)


def test_cuda_ordinals_and_the_current_device_context():
    assert cuda_index("cuda:1") == 1 and cuda_index(torch.device("cuda", 2)) == 2
    assert cuda_index("cuda") is None and cuda_index("cpu") is None
    with pytest.raises(ValueError, match="cuda:N"):
        cuda_index("cuda:x")
    with current_device("cpu"), current_device("cuda"):
        pass  # no-ops: nothing to switch


@pytest.mark.parametrize("kind", ["clip", "efficientnet"])
def test_a_bad_cuda_ordinal_is_refused_before_the_model_loads(kind, tiny_clip, monkeypatch):
    """A one-GPU machine, simulated (issue 16 allows patching torch.cuda's answers)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:3': this machine has 1 CUDA device"):
        if kind == "clip":
            CLIPEncoder(tiny_clip, device="cuda:3")
        else:
            load_encoder("efficientnet-lite0", device="cuda:3")


# ---------------------------------------------------------------- only where CUDA exists


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_cuda_embeddings_match_the_cpu(tiny_clip, tmp_path, images, precision, num_workers):
    values = []
    for k, img in enumerate(images):
        (tmp_path / f"{k}.jpg").write_bytes(jpeg_bytes(img))
        values.append(str(tmp_path / f"{k}.jpg"))
    cpu = embed_images(values, CLIPEncoder(tiny_clip, device="cpu"), num_workers=0)
    gpu_encoder = CLIPEncoder(tiny_clip, device="cuda", precision=precision)
    assert gpu_encoder.batch_size == 256
    gpu = embed_images(values, gpu_encoder, num_workers=num_workers)
    assert gpu.positions == cpu.positions
    np.testing.assert_allclose(np.linalg.norm(gpu.embeddings, axis=1), 1.0, atol=1e-5)
    assert (np.sum(gpu.embeddings * cpu.embeddings, axis=1) > 0.995).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_the_second_gpu_pins_and_runs_on_the_second_gpu(tiny_clip, tmp_path, images):
    with current_device("cuda:1"):
        assert torch.accelerator.current_device_index() == 1
    values = []
    for k, img in enumerate(images):
        (tmp_path / f"{k}.jpg").write_bytes(jpeg_bytes(img))
        values.append(str(tmp_path / f"{k}.jpg"))
    enc = CLIPEncoder(tiny_clip, device="cuda:1", batch_size=2)
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    got = embed_images(values, enc, num_workers=2)
    assert got.embeddings.shape[0] == len(values)
    assert torch.cuda.memory_allocated(0) == before
    assert str(enc.normalization()[0].device) == "cuda:1"
