"""Parallel load, decode and preprocess feeding the model: images in, embeddings out.

The values (anything :func:`dedup_index.io.try_load_image` accepts) are cut into ranges
of ``batch_size``. Worker processes (a torch ``DataLoader``; ``num_workers=0`` runs in
this process) load each range, decode and preprocess it to one uint8
``(B, 3, H, W)`` tensor while the main process runs the model on the previous one, so
decoding and the forward pass overlap. Batches come back in order, each with the
positions that loaded and the failures of its range, exactly as a sequential
``try_load_image`` loop reports them.

Decoding costs what it must: a JPEG is decoded at 1/2, 1/4 or 1/8 scale
(``PIL.Image.draft``, DCT-domain scaling) when it stays at least ``draft_factor`` times
the model's resize target (see :meth:`Preprocessor.draft_scale`), so a 2-megapixel photo
headed for 224 x 224 decodes and resizes about four times faster while its embedding
keeps cosine >= 0.999 with the full-size one. Any value or outcome the fast path does not
handle (another format, a failure, an oversize header) is loaded again by
``try_load_image``, so failures keep their exact reasons and messages.

An encoder with ``preprocessor`` and ``encode_pixels`` (the built-in ones) gets uint8
tensors (pinned on CUDA); any other object with only ``encode(images)`` gets the decoded
PIL images from the workers and encodes them here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..io import DEFAULT_MAX_PIXELS, LoadFailure, open_regular_file, try_load_image
from ..validation import check_positive_int
from .runtime import available_cpus, current_device, default_batch_size, is_cuda

logger = logging.getLogger(__name__)

#: Upper bounds of the default worker count: on the CPU the workers share the cores with
#: the model, so a few suffice; a GPU model consumes images as fast as many cores decode.
MAX_DEFAULT_WORKERS = 4
MAX_DEFAULT_WORKERS_CUDA = 16
_ORIENTATION = 0x0112  # the EXIF orientation tag


class EmbeddedBatch(NamedTuple):
    """One range of ``batch_size`` values, loaded and embedded."""

    #: Indices into ``values`` that loaded, in order.
    positions: list[int]
    #: ``(len(positions), dim)`` float32 unit rows.
    embeddings: np.ndarray
    #: ``(index into values, reason)`` for this range's values that failed to load.
    failures: list[tuple[int, LoadFailure]]
    #: ``width * height`` of each loaded image as stored (before any reduced-scale decode).
    pixels: list[int] = []  # noqa: RUF012 - never mutated; NamedTuple defaults are shared


def default_num_workers(device: str | None = "cpu") -> int:
    """``min(CPUs - 1, 4)`` (``16`` on CUDA): one CPU is left to the main process."""
    cap = MAX_DEFAULT_WORKERS_CUDA if is_cuda(device) else MAX_DEFAULT_WORKERS
    return max(0, min(available_cpus() - 1, cap))


def iter_embedded_batches(
    values: Sequence[Any],
    encoder: Any,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    image_root: str | os.PathLike | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], Any] | None = None,
) -> Iterator[EmbeddedBatch]:
    """Load, decode, preprocess (in workers) and embed ``values`` batch by batch, in order.

    Args:
        values: image values, anything :func:`~dedup_index.io.try_load_image` accepts.
        encoder: a built-in encoder (``preprocessor`` + ``encode_pixels``) or any object
            with ``encode(list of PIL images) -> (N, D)``.
        batch_size: values per batch (and per model call); a throughput knob only.
            None: the encoder's ``batch_size`` (else
            :func:`~dedup_index.encode.runtime.default_batch_size` for its device).
        num_workers: loader processes; None = :func:`default_num_workers` for the
            encoder's device, 0 = in this process. No more workers start than there are
            batches after the first (one batch loads in this process).
        image_root: folder that relative paths are resolved against.
        max_pixels: images larger than this are refused (``decompression_bomb``).
        progress: called with the number of values of each finished batch.

    Yields one :class:`EmbeddedBatch` per range of ``batch_size`` values.
    """
    batch_size = pipeline_batch_size(batch_size, encoder)
    if num_workers is None:
        num_workers = default_num_workers(getattr(encoder, "device", "cpu"))
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 or None, got {num_workers!r}")
    try_load_image(None, max_pixels=max_pixels)  # validates max_pixels up front
    values = values if isinstance(values, list) else list(values)
    preprocessor = _pixel_preprocessor(encoder)
    source = _Ranges(
        values, batch_size, _Loader(image_root, max_pixels, preprocessor), preprocessor is not None
    )
    num_workers = min(num_workers, len(source) - 1) if len(source) > 1 else 0
    # Arguments are checked above, when called; the batches come from a generator.
    return _embed_ranges(source, num_workers, encoder, progress)


def _embed_ranges(
    source: _Ranges, num_workers: int, encoder: Any, progress: Callable[[int], Any] | None
) -> Iterator[EmbeddedBatch]:
    preprocessor = source.loader.preprocessor
    batch_size, total = source.batch_size, len(source.values)
    for start, positions, batch, failures, pixels in _iterate(source, num_workers, encoder):
        if positions:
            if preprocessor is not None:
                emb = encoder.encode_pixels(batch)
            else:
                emb = encoder.encode(batch)
            emb = np.asarray(emb, dtype=np.float32)
            if emb.shape[0] != len(positions):
                raise ValueError(
                    f"the encoder returned {emb.shape[0]} rows for {len(positions)} images"
                )
        else:
            emb = np.zeros((0, _dim_or_zero(encoder)), np.float32)
        yield EmbeddedBatch(positions, emb, failures, pixels)
        if progress is not None:
            progress(min(batch_size, total - start))


@dataclass(frozen=True)
class EmbeddedImages:
    """What :func:`embed_images` returns: the embeddings of the values that loaded.

    Unpacks as ``embeddings, positions, failures`` (the three fields most callers need).
    """

    #: ``(len(positions), dim)`` float32 unit rows, in the order of ``positions``.
    embeddings: np.ndarray
    #: Indices into ``values`` that loaded, ascending.
    positions: list[int]
    #: ``(index into values, reason)`` of every value that did not load, ascending.
    failures: list[tuple[int, LoadFailure]]
    #: Values decoded and run through the encoder by this call.
    embedded: int = 0
    #: Values whose embedding came from the cache, not the encoder.
    cached: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.embeddings, self.positions, self.failures))


def embed_images(
    values: Sequence[Any],
    encoder: Any,
    *,
    cache: Any = None,
    progress: bool | None = None,
    **options: Any,
) -> EmbeddedImages:
    """Embed every value: the one path from image values to embeddings.

    The operator, ``dedup-index run`` and ``index add/query``,
    :meth:`DedupIndex.add_images <dedup_index.index.DedupIndex.add_images>` and the Ray
    encoder actors all call this, so an image gets the same bits whichever door it came
    in by (same decode, JPEG draft and preprocessing; batches cut at the same positions).

    Args:
        values, encoder: as in :func:`iter_embedded_batches`.
        cache: an open :class:`~dedup_index.encode.cache.EmbeddingCache`, or None.  Values
            it holds are neither decoded nor embedded; the rest are embedded in batches
            and each batch is committed to the cache before the next starts, so an
            interrupted run resumes where it stopped.
        progress: an images/s bar on stderr (None: when stderr is a terminal and
            ``DEDUP_INDEX_PROGRESS`` is not ``0``).
        options: ``batch_size``, ``num_workers``, ``image_root``, ``max_pixels`` of
            :func:`iter_embedded_batches`.
    """
    from ..progress import progress as progress_bar

    values = values if isinstance(values, list) else list(values)
    n = len(values)
    found = np.zeros(n, dtype=bool)
    cached_rows = np.zeros((0, 0), np.float32)
    fingerprints: list[str | None] = []
    if cache is not None:
        from .cache import fingerprint

        max_pixels = options.get("max_pixels", DEFAULT_MAX_PIXELS)
        root = options.get("image_root")
        fingerprints = [fingerprint(v, root, max_pixels=max_pixels) for v in values]
        found, cached_rows = cache.lookup(fingerprints, max_pixels=max_pixels)
    todo = np.flatnonzero(~found)
    # Row p's embedding goes to out[p]; allocated once the dimension is known.
    out = None
    if found.any():
        out = np.empty((n, cached_rows.shape[1]), np.float32)
        out[found] = cached_rows
    loaded = found.copy()
    failures: list[tuple[int, LoadFailure]] = []
    with progress_bar(len(todo), "embedding", unit="img", enabled=progress) as bar:
        batches = iter_embedded_batches(
            [values[p] for p in todo.tolist()], encoder, progress=bar.update, **options
        )
        for batch in batches:
            failures.extend((int(todo[k]), f) for k, f in batch.failures)
            if not batch.positions:
                continue
            rows = todo[batch.positions]
            if out is None:
                out = np.empty((n, batch.embeddings.shape[1]), np.float32)
            out[rows] = batch.embeddings
            loaded[rows] = True
            if cache is not None:
                cache.add(
                    [fingerprints[p] for p in rows.tolist()], batch.embeddings, pixels=batch.pixels
                )
    positions = np.flatnonzero(loaded)
    if out is None:
        embeddings = np.zeros((0, _dim_or_zero(encoder)), np.float32)
    else:
        embeddings = out if len(positions) == n else out[positions]
    n_cached = int(found.sum())
    if cache is not None:
        logger.info(
            "embedding cache: %d rows from the cache, %d embedded",
            n_cached,
            len(positions) - n_cached,
        )
    return EmbeddedImages(
        embeddings, positions.tolist(), failures, len(positions) - n_cached, n_cached
    )


# --------------------------------------------------------------------------------------------
# Main-process side
# --------------------------------------------------------------------------------------------


def pipeline_batch_size(batch_size: int | None, encoder: Any) -> int:
    """``batch_size`` checked, or when None the encoder's own (its ``batch_size``
    attribute), else :func:`~dedup_index.encode.runtime.default_batch_size` for its device."""
    if batch_size is not None:
        return check_positive_int(batch_size, "batch_size")
    own = getattr(encoder, "batch_size", None)
    if isinstance(own, int) and not isinstance(own, bool) and own > 0:
        return own
    return default_batch_size(getattr(encoder, "device", "cpu"))


def _pixel_preprocessor(encoder: Any) -> Any:
    """The encoder's preprocessor if it takes uint8 batches of one fixed size, else None."""
    pre = getattr(encoder, "preprocessor", None)
    if pre is None or not callable(getattr(encoder, "encode_pixels", None)):
        return None
    try:
        pre.output_size  # noqa: B018 - raises when outputs would not stack
    except (AttributeError, ValueError):
        return None
    return pre if callable(getattr(pre, "to_uint8", None)) else None


def _dim_or_zero(encoder: Any) -> int:
    try:
        dim = getattr(encoder, "dim", 0)
    except Exception:  # noqa: BLE001 - a property that cannot answer yet
        return 0
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else 0


def _iterate(source: _Ranges, num_workers: int, encoder: Any) -> Iterator[tuple]:
    """The ranges' outputs in order: in this process, or from a DataLoader's workers."""
    if num_workers == 0:
        for k in range(len(source)):
            yield source[k]
        return
    from torch.utils.data import DataLoader

    device = str(getattr(encoder, "device", "cpu"))
    loader = DataLoader(
        source,
        batch_size=None,  # each item already is a batch
        shuffle=False,
        num_workers=num_workers,
        pin_memory=is_cuda(device) and source.as_pixels,
        prefetch_factor=2,
        worker_init_fn=partial(_die_with_parent, os.getpid()),
        collate_fn=_as_is,  # items are batches already; keep their types
    )
    logger.debug("loading %d batches with %d worker processes", len(source), num_workers)
    # The pin-memory thread pins for torch's current device as the iterator starts it:
    # make that the encoder's (cuda:1 pins for cuda:1, not device 0).
    with current_device(device):
        batches = iter(loader)
    for start, positions, batch, failures, pixels in batches:
        # Pinning rebuilds containers as lists: restore the (index, failure) pairs.
        yield start, list(positions), batch, [(int(p), f) for p, f in failures], list(pixels)


def _as_is(item: Any) -> Any:
    return item


# --------------------------------------------------------------------------------------------
# Worker side: picklable, no transformers; torch only to hand tensors over
# --------------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    """Linux: have the kernel kill this worker when the main process dies.

    Without it a main process that is killed (OOM, ``os._exit``) can leave its workers
    blocked for ever on a full result pipe, holding the parent's stdout open.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the DataLoader's own watchdog remains
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class _Ranges:
    """Item ``k``: values ``[k * batch_size, (k + 1) * batch_size)`` loaded as one batch.

    Returns ``(start, positions, batch, failures, pixels)`` where ``batch`` is a uint8
    ``(B, 3, H, W)`` tensor (``as_pixels``) or a list of RGB PIL images.
    """

    def __init__(self, values: list, batch_size: int, loader: _Loader, as_pixels: bool) -> None:
        self.values, self.batch_size, self.loader, self.as_pixels = (
            values,
            batch_size,
            loader,
            as_pixels,
        )

    def __len__(self) -> int:
        return -(-len(self.values) // self.batch_size)

    def __getitem__(self, k: int) -> tuple:
        start = k * self.batch_size
        stop = min(start + self.batch_size, len(self.values))
        positions, items, failures, pixels = [], [], [], []
        for pos in range(start, stop):
            item, npix, failure = self.loader.load(self.values[pos], self.as_pixels)
            if failure is not None:
                failures.append((pos, failure))
            else:
                positions.append(pos)
                items.append(item)
                pixels.append(npix)
        if self.as_pixels:
            import torch

            height, width = self.loader.preprocessor.output_size
            batch = (
                torch.from_numpy(np.stack(items))
                if items
                else torch.zeros((0, 3, height, width), dtype=torch.uint8)
            )
        else:
            batch = items
        return start, positions, batch, failures, pixels


@dataclass(frozen=True)
class _Loader:
    """Loads one value: ``(uint8 pixels or PIL image, stored pixel count, failure)``."""

    image_root: Any
    max_pixels: int | None
    preprocessor: Any = None

    def load(self, value: Any, as_pixels: bool) -> tuple[Any, int, LoadFailure | None]:
        image, npix, full_size = None, 0, None
        if as_pixels and self.preprocessor.draft_factor > 0:
            drafted = self._load_drafted(value)
            if drafted is not None:
                image, npix, full_size = drafted
        if image is None:
            image, failure = try_load_image(
                value, image_root=self.image_root, max_pixels=self.max_pixels
            )
            if failure is not None:
                return None, 0, failure
            npix = image.size[0] * image.size[1]
        if as_pixels:
            return self.preprocessor.to_uint8(image, full_size), npix, None
        return image, npix, None

    def _load_drafted(self, value: Any) -> tuple[Any, int, tuple[int, int]] | None:
        """A JPEG decoded at reduced scale, or None for anything else (loaded normally).

        Returns ``(image, stored pixel count, upright full-size (width, height))``.

        Same checks and conversions as :func:`try_load_image` (header size against
        ``max_pixels``, EXIF orientation, RGB), which converts the drafted image itself;
        any failure here falls back to the normal path, which then reports it.
        """
        from PIL import Image

        source = _file_source(value, self.image_root)
        if source is None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with _open(source) as fp, Image.open(fp) as img:
                    if img.format != "JPEG":
                        return None
                    width, height = img.size
                    npix = width * height
                    if npix <= 0 or (self.max_pixels is not None and npix > self.max_pixels):
                        return None
                    scale = self.preprocessor.draft_scale(width, height)
                    if scale == 1:
                        return None
                    # EXIF orientations 5-8 turn the image a quarter: sides swap.
                    turned = img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
                    img.draft(img.mode, (width // scale, height // scale))
                    image, failure = try_load_image(img, max_pixels=None)
        except Exception:  # noqa: BLE001 - the normal path reloads it and names the failure
            return None
        if failure is not None:
            return None
        return image, npix, ((height, width) if turned else (width, height))


def _file_source(value: Any, image_root: Any) -> str | bytes | None:
    """The file path or the encoded bytes behind ``value``, when it has them."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) if len(value) else None
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        data = value.get("bytes")
        if data is not None:
            return _file_source(data, image_root) if isinstance(data, (bytes, bytearray)) else None
        path = value.get("path")
        return _file_source(path, image_root) if isinstance(path, (str, os.PathLike)) else None
    if isinstance(value, os.PathLike):
        value = os.fsdecode(os.fspath(value))
    if not isinstance(value, str) or not value:
        return None
    if value.lstrip()[:8].lower().startswith(("http://", "https://", "data:")):
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and image_root is not None:
        path = Path(os.fsdecode(os.fspath(image_root))).expanduser() / path
    return str(path)


def _open(source: str | bytes):
    # Regular files only (a FIFO named x.jpg must not block the fast path either).
    return open_regular_file(source) if isinstance(source, str) else BytesIO(source)


__all__ = [
    "EmbeddedBatch",
    "EmbeddedImages",
    "default_num_workers",
    "embed_images",
    "iter_embedded_batches",
    "pipeline_batch_size",
]
