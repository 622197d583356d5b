"""Image preprocessing read from a checkpoint's image-processor config, split where it is cheap.

A Hugging Face image processor (``CLIPImageProcessor``, ``SiglipImageProcessor``, ...)
resizes with PIL, centre-crops, rescales and normalises one image at a time in float64.
:class:`Preprocessor` does the same arithmetic in two halves:

* :meth:`Preprocessor.to_uint8` (in a loader worker): PIL resize with the checkpoint's
  filter and output-size rule, then the centre crop (zero padding when the image is
  smaller, as the processor does), giving a ``(3, H, W)`` uint8 array. Pixels stay uint8,
  so a batch crosses the process boundary at a quarter of the float32 size.
* :meth:`Preprocessor.normalize` (on the model's device): one fused affine map
  ``x * (rescale / std) - mean / std`` over the whole ``(B, 3, H, W)`` batch.

The resize is the processor's own (PIL on uint8, same sizes, same filter), so the result
equals the processor's up to float rounding. It is a frozen dataclass of plain numbers:
it pickles into worker processes, and neither it nor its module imports transformers or
torch (``normalize`` imports torch when called).

:meth:`Preprocessor.draft_scale` says how far a JPEG may be decoded at reduced scale
(``PIL.Image.draft``, DCT scaling by 1/2, 1/4 or 1/8) while it stays at least
``draft_factor`` times the resize target, so the remaining anti-aliased resize does the
real downsampling and the embedding barely moves (the fidelity tests hold cosine >= 0.999
against the processor on full-size decodes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

#: PIL resampling filters by name, as image-processor configs spell them (ints also accepted).
RESAMPLE = {
    "nearest": 0,
    "lanczos": 1,
    "bilinear": 2,
    "bicubic": 3,
    "box": 4,
    "hamming": 5,
}
#: Drafted JPEGs keep at least this many times the resize target's pixels per side.
DEFAULT_DRAFT_FACTOR = 2.0


@dataclass(frozen=True)
class Preprocessor:
    """Resize, centre-crop, rescale and normalise images like a checkpoint's processor.

    Args:
        shortest_edge: resize so the shorter side is this long, the longer one
            ``int(shortest_edge * long / short)`` (the processors' rule). Exclusive with
            ``size``.
        size: ``(height, width)`` to resize to, ignoring the aspect ratio (SigLIP).
        crop: ``(height, width)`` of the centre crop, or None for no crop.
        resample: PIL filter code (3 = bicubic).
        rescale: factor applied to 0..255 pixels before normalising (1/255), or 1.0.
        mean, std: per-channel normalisation, applied after ``rescale``.
        draft_factor: JPEG reduced-scale decoding keeps at least this multiple of the
            resize target per side; ``0`` turns drafting off.
    """

    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)
    resample: int = 3
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    draft_factor: float = DEFAULT_DRAFT_FACTOR

    def __post_init__(self) -> None:
        if (self.shortest_edge is None) == (self.size is None):
            raise ValueError(
                "give exactly one of shortest_edge (int) or size ((height, width)); got "
                f"shortest_edge={self.shortest_edge!r}, size={self.size!r}"
            )
        if self.shortest_edge is not None:
            _check_side(self.shortest_edge, "shortest_edge")
        for name in ("size", "crop"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 2:
                    raise ValueError(f"{name} must be (height, width), got {value!r}")
                for side in value:
                    _check_side(side, name)
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
        if self.resample not in RESAMPLE.values():
            raise ValueError(f"resample must be a PIL filter code 0..5, got {self.resample!r}")
        if not (math.isfinite(self.rescale) and self.rescale > 0):
            raise ValueError(f"rescale must be a positive number, got {self.rescale!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) == 1:
                value = value * 3
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if not (math.isfinite(self.draft_factor) and self.draft_factor >= 0):
            raise ValueError(f"draft_factor must be >= 0 (0 = off), got {self.draft_factor!r}")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_processor(cls, processor: Any, **overrides: Any) -> Preprocessor:
        """Read the settings of a transformers image processor object (or its ``to_dict()``).

        The processor's class defaults are already applied to its attributes, so this is
        the checkpoint's effective configuration. Unsupported settings (padding, a
        ``longest_edge`` cap, no resize) raise ``ValueError`` naming them.
        """
        if isinstance(processor, Mapping):
            cfg = dict(processor)
        elif hasattr(processor, "to_dict"):
            cfg = processor.to_dict()
        else:
            cfg = vars(processor)
        return cls.from_config(cfg, **overrides)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> Preprocessor:
        """Build from a ``preprocessor_config.json`` mapping (keys as transformers writes)."""
        if cfg.get("do_pad"):
            raise ValueError("image processors that pad (do_pad=True) are not supported")
        if cfg.get("do_resize", True) is False:
            raise ValueError("image processors without a resize (do_resize=False): not supported")
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        size = {k: v for k, v in dict(size).items() if v is not None}
        kwargs: dict[str, Any] = {}
        if "shortest_edge" in size:
            if size.get("longest_edge"):
                raise ValueError(f"resize with a longest_edge cap is not supported: size={size}")
            kwargs.update(shortest_edge=int(size["shortest_edge"]), size=None)
        elif "height" in size and "width" in size:
            kwargs.update(shortest_edge=None, size=(int(size["height"]), int(size["width"])))
        else:
            raise ValueError(
                f"size must hold 'shortest_edge' or 'height' and 'width'; got size={size}"
            )
        crop = cfg.get("crop_size")
        if cfg.get("do_center_crop") and crop is not None:
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            kwargs["crop"] = (int(crop["height"]), int(crop["width"]))
        else:
            kwargs["crop"] = None
        resample = cfg.get("resample", 3)
        if isinstance(resample, str):
            resample = RESAMPLE[resample.lower()]
        kwargs["resample"] = int(resample)
        kwargs["rescale"] = (
            float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        )
        if cfg.get("do_normalize", True):
            kwargs["mean"] = tuple(_triple(cfg.get("image_mean", (0.5, 0.5, 0.5))))
            kwargs["std"] = tuple(_triple(cfg.get("image_std", (0.5, 0.5, 0.5))))
        else:
            kwargs["mean"], kwargs["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---------------------------------------------------------------- geometry

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        if self.crop is not None:
            return self.crop
        if self.size is not None:
            return self.size
        raise ValueError("shortest_edge resizing without a crop gives images of varying size")

    def resize_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` the resize step produces for an upright ``width x height`` image."""
        if self.size is not None:
            return self.size[1], self.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def draft_scale(self, width: int, height: int) -> int:
        """Largest JPEG DCT scale (1, 2, 4 or 8) keeping ``draft_factor`` x the resize target.

        Orientation-proof (EXIF may swap the sides later): with a fixed ``size`` both stored
        sides must cover the larger target side.
        """
        if self.draft_factor <= 0 or width <= 0 or height <= 0:
            return 1
        if self.size is not None:
            need = self.draft_factor * max(self.size)
        else:
            need = self.draft_factor * self.shortest_edge
        short = min(width, height)
        for scale in (8, 4, 2):
            if math.ceil(short / scale) >= need:
                return scale
        return 1

    # ---------------------------------------------------------------- pixels

    def to_uint8(
        self, image: Image.Image, source_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """RGB PIL image -> resized, centre-cropped ``(3, H, W)`` uint8 array.

        ``source_size``: the upright ``(width, height)`` of the full-size image when
        ``image`` is a reduced-scale decode of it; output sizes follow the full-size image,
        as they would without the reduction (rounding the sides alone may shift the crop).
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        target = self.resize_size(*(source_size or image.size))
        if target != image.size:
            image = image.resize(target, resample=self.resample)
        arr = np.asarray(image, dtype=np.uint8)
        if self.crop is not None:
            arr = _center_crop(arr, self.crop)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def normalize(self, pixels: Any, dtype: Any = None, *, affine: Any = None) -> Any:
        """``(B, 3, H, W)`` uint8 torch tensor -> normalised float tensor, on its device.

        ``affine``: :meth:`affine_tensors` for the tensor's device, built once by the
        caller; None builds them here (a host-to-device copy each call).
        """
        import torch

        scale, shift = self.affine_tensors(pixels.device) if affine is None else affine
        out = pixels.to(torch.float32) * scale - shift
        return out if dtype is None else out.to(dtype)

    def affine_tensors(self, device: Any = "cpu") -> tuple[Any, Any]:
        """:meth:`affine` as two float32 ``(1, 3, 1, 1)`` torch tensors on ``device``."""
        import torch

        scale, shift = self.affine()
        return (
            torch.tensor(scale, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(shift, dtype=torch.float32, device=device).view(1, 3, 1, 1),
        )

    def normalize_numpy(self, pixels: np.ndarray) -> np.ndarray:
        """Numpy twin of :meth:`normalize` for ``(..., 3, H, W)`` uint8 arrays (float32 out)."""
        scale, shift = (np.asarray(v, np.float32)[:, None, None] for v in self.affine())
        return pixels.astype(np.float32) * scale - shift

    def affine(self) -> tuple[list[float], list[float]]:
        """Per-channel ``(scale, shift)`` with ``normalised = pixel * scale - shift``."""
        scale = [self.rescale / s for s in self.std]
        shift = [m / s for m, s in zip(self.mean, self.std, strict=True)]
        return scale, shift

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One image -> ``(3, H, W)`` float32 model input (resize, crop, rescale, normalise)."""
        return self.normalize_numpy(self.to_uint8(image))


def _center_crop(arr: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Centre crop of an ``(H, W, C)`` array, zero-padded first when smaller (processors do)."""
    height, width = arr.shape[:2]
    ch, cw = crop
    if height < ch or width < cw:
        padded = np.zeros((max(height, ch), max(width, cw), arr.shape[2]), arr.dtype)
        top, left = (
            math.ceil((padded.shape[0] - height) / 2),
            math.ceil((padded.shape[1] - width) / 2),
        )
        padded[top : top + height, left : left + width] = arr
        arr, height, width = padded, padded.shape[0], padded.shape[1]
    top = (height - ch) // 2
    left = (width - cw) // 2
    return arr[top : top + ch, left : left + cw]


def _check_side(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be positive integers, got {value!r}")


def _triple(value: Any) -> Sequence[float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return [float(v) for v in value]


__all__ = ["DEFAULT_DRAFT_FACTOR", "RESAMPLE", "Preprocessor"]
