"""What every torch image encoder shares: device, precision, threads, batches of pixels.

An encoder here is a model plus a :class:`~dedup_index.encode.preprocess.Preprocessor`.
:meth:`TorchImageEncoder.encode_pixels` takes the uint8 ``(B, 3, H, W)`` batches that the
loader workers produce (:mod:`dedup_index.encode.pipeline`), copies them to the device
(non-blocking from pinned memory on CUDA), normalises them there, runs the model and
returns L2-normalised float32 rows. :meth:`TorchImageEncoder.encode` is the same for a
list of PIL images, preprocessed on the calling thread.

Precision: ``"auto"`` is float32 on the CPU (bfloat16 is slower than float32 on CPUs
without AMX, and float16 matmuls are slower still) and float16 autocast on CUDA (weights
stay float32, matmuls and convolutions run in half precision; the output is normalised in
float32). Convolutional models also run channels-last, where cuDNN's and oneDNN's NHWC
kernels are faster (EfficientNet-Lite0 on this 2-core CPU: 22 -> 32 images/s);
transformers gain nothing from it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..validation import check_choice, check_positive_int
from ..validation import resolve_device as check_device

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; checks the rest
    (:func:`dedup_index.validation.resolve_device`, the rule the search follows too)."""
    return check_device("auto" if device is None else device, what="embedding")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch CPU threads when none are given: every CPU this process may use, unless
    ``OMP_NUM_THREADS`` says otherwise (Ray and job schedulers set it per worker)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return max(1, torch.get_num_threads())
    return available_cpus()


class TorchImageEncoder:
    """Base of the built-in encoders: ``model`` + ``preprocessor`` on ``device``.

    Subclasses set ``model`` (an ``nn.Module``) and ``preprocessor``, call
    :meth:`_init_runtime`, and implement :meth:`_features` (normalised pixels -> ``(B, D)``
    feature tensor). They then have ``encode(images)`` (PIL in, unit float32 rows out),
    ``encode_pixels(uint8 batch)`` (what the parallel pipeline calls), ``dim``, ``device``,
    ``precision``, ``threads`` and ``batch_size``.
    """

    model: Any
    preprocessor: Any
    #: Convolutional models set this: channels-last input and weights (CPU and CUDA).
    channels_last: bool = False

    def _init_runtime(
        self,
        device: str | None,
        batch_size: int,
        threads: int | None,
        precision: str,
    ) -> None:
        """Validate and apply the runtime options; call before moving the model."""
        import torch

        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.precision = check_choice(precision, PRECISIONS, "precision")
        threads = check_positive_int(threads, "threads", allow_none=True)
        self.device = resolve_device(device)
        self.on_cuda = torch.device(self.device).type == "cuda"
        if threads is None and not self.on_cuda:
            threads = default_threads()
        self.threads = threads
        if threads is not None:
            # Explicit, not whatever the OpenMP runtime guessed (it may count hyperthreads
            # or CPUs outside the affinity mask).
            torch.set_num_threads(threads)
        if self.precision == "auto":
            self.precision = "fp16" if self.on_cuda else "fp32"
        self._autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[
            self.precision
        ]
        self._channels_last = self.channels_last

    def _place_model(self) -> None:
        """Move the model to the device (channels-last where it helps) in eval mode."""
        import torch

        self.model.to(self.device).eval()
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _features(self, pixels: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dim(self) -> int:  # pragma: no cover - subclasses answer
        raise NotImplementedError

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        """Embed a ``(B, 3, H, W)`` uint8 batch (torch tensor or numpy array).

        Returns ``(B, dim)`` float32 rows of unit norm. The batch is cut into chunks of
        ``batch_size`` for the forward passes.
        """
        import torch

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        n = int(pixels.shape[0])
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        use_amp = self._autocast_dtype is not None
        device_type = torch.device(self.device).type
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                chunk = pixels[start : start + self.batch_size]
                x = chunk.to(self.device, non_blocking=self.on_cuda)
                x = self.preprocessor.normalize(x)
                if self._channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type, dtype=self._autocast_dtype, enabled=use_amp):
                    feats = self._features(x)
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                out[start : start + len(chunk)] = feats.cpu().numpy()
        return out

    def encode(
        self, images: Sequence[Any], *, progress: Callable[[int], Any] | None = None
    ) -> np.ndarray:
        """Embed RGB PIL ``images``; returns ``(len(images), dim)`` unit float32 rows.

        Preprocessing runs on the calling thread, batch by batch; for many images from
        files use :func:`dedup_index.encode.pipeline.embed_images`, which decodes in
        parallel. ``progress``, when given, is called with each finished batch's size.
        """
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            pixels = np.stack([self.preprocessor.to_uint8(img) for img in batch])
            out[start : start + len(batch)] = self.encode_pixels(pixels)
            if progress is not None:
                progress(len(batch))
        return out


__all__ = [
    "PRECISIONS",
    "TorchImageEncoder",
    "available_cpus",
    "default_threads",
    "resolve_device",
]
