"""CLIP image encoder on transformers' CLIP classes.

Loads ``model_name`` (hub id or local path) once, embeds PIL images in batches of
``batch_size`` under ``torch.inference_mode`` and returns L2-normalised float32 rows.
Works with transformers 4.x (``get_image_features`` returns a tensor) and 5.x (it returns
an output object whose ``pooler_output`` holds the projected features).

When the model cannot be had, one :class:`~dedup_index.errors.ModelLoadError` says so at
once: the local cache is tried first, the hub only when it answers a quick connection
check, so an offline machine fails in seconds instead of retrying for half a minute.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

import numpy as np

from .._validation import check_positive_int
from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; checks the rest."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {device!r}"
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        # Upstream pipelines hard-code device="cuda"; run them anyway, and say so.
        logger.warning("device=%r asked for but CUDA is not available: using the CPU", device)
        return "cpu"
    return str(parsed)


class CLIPEncoder:
    """Embeds images with a CLIP checkpoint's image tower (``get_image_features``)."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        import torch

        self.model_name = str(model_name)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        threads = check_positive_int(threads, "threads", allow_none=True)
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model, self.processor = _load_clip(self.model_name)
        self.model.to(self.device).eval()
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension (the projection size)."""
        if self._dim is None:
            cfg = self.model.config
            self._dim = int(getattr(cfg, "projection_dim", 0) or cfg.vision_config.hidden_size)
        return self._dim

    def encode(self, images: Sequence, *, progress=None) -> np.ndarray:
        """Embed RGB PIL ``images``; returns ``(len(images), dim)`` unit float32."""
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start : start + self.batch_size])
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
                feats = _as_tensor(
                    self.model.get_image_features(pixel_values=pixels.to(self.device))
                )
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                out[start : start + len(batch)] = feats.cpu().numpy()
                if progress is not None:
                    progress(len(batch))
        return out


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


def _load_clip(model_name: str):
    """Load (model, image processor), trying the local cache before the hub."""
    from transformers import CLIPModel

    try:  # transformers 5.x: the PIL processor (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

    def load(**kw):
        model = CLIPModel.from_pretrained(model_name, **kw)
        processor = CLIPImageProcessor.from_pretrained(model_name, **kw)
        model.text_model = None  # only the image tower is used; frees its memory
        return model, processor

    if os.path.isdir(model_name):
        try:
            return load()
        except Exception as exc:  # noqa: BLE001 - any failure becomes one clear error
            raise ModelLoadError(
                f"could not load CLIP model from local directory {model_name!r}: {exc}. "
                "It must hold a CLIP checkpoint (config.json with model_type 'clip', the "
                "weights, and preprocessor_config.json), e.g. written by save_pretrained()."
            ) from exc
    if _looks_like_path(model_name):
        raise ModelLoadError(
            f"model {model_name!r} looks like a local path but no such directory exists; "
            "pass an existing checkpoint directory or a hub id such as "
            f"{DEFAULT_MODEL!r}"
        )
    try:
        return load(local_files_only=True)
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
        "and pass the local directory as model_name, or set HF_HOME to a cache that holds "
        f"it. (cache lookup said: {cache_error.__class__.__name__})"
    ) from cache_error


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
