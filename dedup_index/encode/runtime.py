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

Batch size: :func:`default_batch_size` is the one default for the encoders and the
pipeline: :data:`DEFAULT_BATCH_SIZE_CUDA` (256) images per forward pass on a GPU, which
a batch of 32 leaves mostly idle, and :data:`DEFAULT_BATCH_SIZE` (32) on the CPU, where a
larger batch gains nothing and holds more memory. A forward pass that runs out of GPU
memory (``torch.cuda.OutOfMemoryError``) is retried at half the batch, down to one
image (then the error is raised); the smaller size is kept for the encoder's later
batches and logged once. Rows do not depend on how a batch is cut beyond float rounding
(a GEMM's reduction order may change with the batch's size: the tiny test models give
the same bits at any batch size on an AVX-512 CPU, not on an AVX2 one); passes cut the
same way give the same bits.

The normalisation (``pixel * scale - shift`` per channel) uses two ``(1, 3, 1, 1)``
tensors built once per encoder on its device, not a host-to-device copy per batch (a
pageable copy that synchronises the GPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..validation import available_cpus, check_choice, check_positive_int
from ..validation import resolve_device as check_device

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: Images per forward pass by default on the CPU (:func:`default_batch_size`).
DEFAULT_BATCH_SIZE = 32
#: Images per forward pass by default on a CUDA device (:func:`default_batch_size`).
DEFAULT_BATCH_SIZE_CUDA = 256


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; checks the rest
    (:func:`dedup_index.validation.resolve_device`, the rule the search follows too)."""
    return check_device("auto" if device is None else device, what="embedding")


def is_cuda(device: Any) -> bool:
    """Whether ``device`` (a string or ``torch.device``) names a CUDA device; no torch import."""
    return str(device).split(":", 1)[0] == "cuda"


def default_batch_size(device: Any) -> int:
    """Images per forward pass when none is given, the one place it is chosen:
    :data:`DEFAULT_BATCH_SIZE_CUDA` on a CUDA device, :data:`DEFAULT_BATCH_SIZE` elsewhere.

    A GPU needs hundreds of images per pass to be busy (and has the memory: CLIP
    ViT-B/32 in fp16 at 256 images holds well under 2 GB of activations); on a CPU the
    throughput is flat beyond a few dozen.  A batch that does not fit is halved and
    retried (:meth:`TorchImageEncoder.encode_pixels`).
    """
    return DEFAULT_BATCH_SIZE_CUDA if is_cuda(device) else DEFAULT_BATCH_SIZE


def cuda_index(device: Any) -> int | None:
    """The CUDA ordinal of ``device`` (``"cuda:1"`` -> 1), None for ``"cuda"`` (the current
    device) and for anything that is not CUDA.  No torch import."""
    text = str(device)
    if not is_cuda(text) or ":" not in text:
        return None
    try:
        index = int(text.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"device must be 'cuda' or 'cuda:N'; got {text!r}") from None
    if index < 0:
        raise ValueError(f"device must be 'cuda' or 'cuda:N' with N >= 0; got {text!r}")
    return index


def current_device(device: Any) -> Any:
    """A context in which ``device`` is torch's current CUDA device (for ``cuda:N``); a
    no-op for the CPU and plain ``"cuda"``.

    Whatever torch starts inside it on "the current device" starts on ``device``: the
    DataLoader's pin-memory thread pins for the current device when its iterator is
    created, which is device 0 unless this says otherwise.
    """
    import contextlib

    index = cuda_index(device)
    if index is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(index)


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
        batch_size: int | None,
        threads: int | None,
        precision: str,
    ) -> None:
        """Validate and apply the runtime options; call before moving the model.

        ``batch_size`` None: :func:`default_batch_size` for the device.
        """
        import torch

        batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
        self.precision = check_choice(precision, PRECISIONS, "precision")
        threads = check_positive_int(threads, "threads", allow_none=True)
        self.device = resolve_device(device)
        self.on_cuda = torch.device(self.device).type == "cuda"
        self.batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        #: Images per forward pass now: ``batch_size`` until a pass runs out of memory.
        self.live_batch_size = self.batch_size
        self._affine: tuple[Any, Any, Any] | None = None
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

    def normalization(self) -> tuple[Any, Any]:
        """The preprocessor's ``(scale, shift)`` as ``(1, 3, 1, 1)`` float32 tensors on the
        device, built once (again only if ``preprocessor`` is replaced)."""
        pre = self.preprocessor
        if self._affine is None or self._affine[0] is not pre:
            scale, shift = pre.affine_tensors(self.device)
            self._affine = (pre, scale, shift)
        return self._affine[1], self._affine[2]

    def _embed_chunk(self, chunk: Any) -> np.ndarray:
        """One forward pass: uint8 ``(b, 3, H, W)`` on the host -> ``(b, dim)`` unit rows."""
        import torch

        scale, shift = self.normalization()
        x = chunk.to(self.device, non_blocking=self.on_cuda)
        x = self.preprocessor.normalize(x, affine=(scale, shift))
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        device_type = torch.device(self.device).type
        use_amp = self._autocast_dtype is not None
        with torch.autocast(device_type, dtype=self._autocast_dtype, enabled=use_amp):
            feats = self._features(x)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def _shrink_batch(self, failed: int, error: str) -> None:
        """After a forward pass of ``failed`` images ran out of memory: halve the batch for
        this and every later pass (logged the first time), and give the memory back."""
        import torch

        if self.live_batch_size == self.batch_size:
            logger.warning(
                "out of memory on %s with %d images per forward pass; retrying with %d "
                "(and fewer if needed). Pass a smaller batch_size to avoid the retries. (%s)",
                self.device,
                failed,
                max(1, failed // 2),
                error,
            )
        self.live_batch_size = max(1, min(self.live_batch_size, failed // 2))
        if self.on_cuda:
            torch.cuda.empty_cache()

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        """Embed a ``(B, 3, H, W)`` uint8 batch (torch tensor or numpy array).

        Returns ``(B, dim)`` float32 rows of unit norm. The batch is cut into chunks of
        ``live_batch_size`` (``batch_size`` until a pass ran out of GPU memory) for the
        forward passes. A pass that raises ``torch.cuda.OutOfMemoryError`` is run again
        at half the size, down to one image; one image that does not fit raises.
        """
        import torch

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        n = int(pixels.shape[0])
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        start = 0
        with torch.inference_mode():
            while start < n:
                chunk = pixels[start : start + self.live_batch_size]
                size = int(chunk.shape[0])
                error = None
                try:
                    rows = self._embed_chunk(chunk)
                except torch.cuda.OutOfMemoryError as exc:
                    if size == 1:
                        raise
                    error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if error is not None:
                    # Outside the except block, holding only the message: the failed
                    # pass's tensors (kept alive by the traceback) are freed by now.
                    self._shrink_batch(size, error)
                    continue
                out[start : start + size] = rows
                start += size
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
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_SIZE_CUDA",
    "PRECISIONS",
    "TorchImageEncoder",
    "available_cpus",
    "cuda_index",
    "current_device",
    "default_batch_size",
    "default_threads",
    "is_cuda",
    "resolve_device",
]
