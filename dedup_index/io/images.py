"""Load one image value (path, bytes, array, PIL image, datasets dict...) as a plain RGB image.

This is the first stage of the pipeline: every row of the input becomes either a fully decoded
RGB ``PIL.Image.Image`` or a :class:`LoadFailure` saying precisely why it could not be loaded,
so a bad row is reported instead of silently dropped or crashing a long run.

Design points:

* Only PIL, numpy and the standard library are used (no torch / transformers here).
* Global PIL state is never modified: ``ImageFile.LOAD_TRUNCATED_IMAGES`` and
  ``Image.MAX_IMAGE_PIXELS`` are left alone. Truncated files are detected by forcing a full
  decode; oversized images are rejected by our own ``max_pixels`` check on the header size,
  before any pixel data is decoded.
* Returned images are fully loaded copies, detached from any file handle.
* PIL's ``DecompressionBombWarning`` is silenced with ``warnings.catch_warnings()`` while an
  image is decoded, since our own ``max_pixels`` check replaces it. ``catch_warnings`` is not
  thread-safe: with concurrent loads in threads the process-wide warning filters can be
  altered for a moment (in a rare interleaving, an "ignore DecompressionBombWarning" filter
  can outlive the call). Nothing in this module depends on that filter.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import stat
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from numbers import Integral
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dedup_index.errors import DedupIndexError

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_READ_TIMEOUT",
    "ImageLoadError",
    "LoadFailure",
    "load_image",
    "open_regular_file",
    "to_rgb",
    "try_load_image",
]

#: Largest ``width * height`` accepted by default. Same number as PIL's default
#: ``Image.MAX_IMAGE_PIXELS`` (about 179 megapixels, ~0.5 GB as RGB), but enforced by this
#: module from the file header, independently of PIL's global setting and warnings filter.
#: Pass ``max_pixels=None`` to disable it (PIL's own hard limit, 2 * ``Image.MAX_IMAGE_PIXELS``,
#: still applies to files and is reported as ``"decompression_bomb"``).
DEFAULT_MAX_PIXELS: int = 178_956_970

_REASONS = frozenset(
    {
        "missing_file",
        "not_an_image",
        "truncated",
        "decompression_bomb",
        "unsupported_type",
        "url_not_fetched",
        "invalid_data_uri",
        "unreadable",
        "empty",
        "not_a_regular_file",
        "file_too_large",
        "read_timeout",
    }
)
#: Image files larger than this are refused (``file_too_large``) before a byte is read.
DEFAULT_MAX_FILE_BYTES: int = 1 << 30
#: Seconds one image file may take to open and read before it is given up
#: (``read_timeout``): a hung network mount or device must not hang the run.  Read when
#: each file is opened, so setting ``dedup_index.io.images.DEFAULT_READ_TIMEOUT`` changes it
#: for the process (worker processes started afterwards inherit it where they fork).
DEFAULT_READ_TIMEOUT: float = 60.0

_ACCEPTED = (
    "a local path (str or os.PathLike), a 'data:' URI, image file bytes "
    "(bytes/bytearray/memoryview), a PIL.Image.Image, a uint8 numpy array (HxW or HxWxC with "
    "C in 1/3/4), or a datasets image dict {'bytes': ..., 'path': ...}"
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_PREMULTIPLIED_MODES = frozenset({"RGBa", "La"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
# Substrings of PIL error messages that mean "the data stops before the image is complete".
_TRUNCATION_HINTS = (
    "truncated",
    "broken data stream",
    "premature end",
    "unexpected end",
    "not enough data",
)


@dataclass(frozen=True)
class LoadFailure:
    """Why one value could not be loaded: a stable ``reason`` code plus a message for humans.

    ``reason`` is one of ``missing_file``, ``not_an_image``, ``truncated``,
    ``decompression_bomb``, ``unsupported_type``, ``url_not_fetched``, ``invalid_data_uri``,
    ``unreadable``, ``empty``, ``not_a_regular_file``, ``file_too_large`` or
    ``read_timeout``; the codes are meant for grouping/counting failures in reports.
    """

    reason: str
    message: str

    def __post_init__(self) -> None:
        if self.reason not in _REASONS:
            raise ValueError(f"unknown LoadFailure reason {self.reason!r}")

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ImageLoadError(DedupIndexError, ValueError):
    """Raised by :func:`load_image`; ``.failure`` holds the :class:`LoadFailure`.

    A ``ValueError`` (bad input) and a ``DedupIndexError`` like every deliberate error of the
    package. The failure is the only constructor argument so the exception pickles cleanly (useful
    when loading in worker processes).
    """

    def __init__(self, failure: LoadFailure) -> None:
        super().__init__(failure)
        self.failure = failure

    def __str__(self) -> str:
        return str(self.failure)


def _fail(reason: str, message: str) -> ImageLoadError:
    return ImageLoadError(LoadFailure(reason, message))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_image(
    value: Any,
    *,
    image_root: str | os.PathLike[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load ``value`` as a fully decoded, file-detached RGB image.

    ``image_root`` resolves relative paths (absolute paths and ``~`` paths are unaffected).
    ``max_pixels`` rejects images whose ``width * height`` exceeds it, checked from the header
    before decoding; ``None`` disables the check. Raises :class:`ImageLoadError` on bad input.
    """
    _check_max_pixels_arg(max_pixels)
    return _load(value, image_root, max_pixels)


def try_load_image(
    value: Any,
    *,
    image_root: str | os.PathLike[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image | None, LoadFailure | None]:
    """Like :func:`load_image` but returns ``(image, None)`` or ``(None, failure)``.

    Never raises for bad input, so a batch can record the failure and move on.
    """
    _check_max_pixels_arg(max_pixels)
    try:
        return _load(value, image_root, max_pixels), None
    except ImageLoadError as exc:
        return None, exc.failure


def to_rgb(img: Image.Image) -> Image.Image:
    """Return a new, fully loaded RGB copy of ``img`` with the conversions done right.

    First frame of animations; EXIF orientation applied; any transparency composited on white
    (so a fully transparent pixel is white, not whatever colour hides under alpha 0); 16-bit
    data scaled by ``>> 8`` instead of clipped; float data clipped to 0..255. ``img`` itself is
    not modified (an animation's current frame is restored). Raises PIL's ``OSError`` for
    undecodable data and ``ValueError`` for modes it cannot convert.
    """
    frame = _first_frame_upright(img)
    return _convert_to_rgb(frame)


# --------------------------------------------------------------------------------------------
# Dispatch on the value's type
# --------------------------------------------------------------------------------------------


def _check_max_pixels_arg(max_pixels: int | None) -> None:
    if max_pixels is None:
        return
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, Integral) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")


def _load(
    value: Any, image_root: str | os.PathLike[str] | None, max_pixels: int | None
) -> Image.Image:
    if value is None or _is_missing_scalar(value):
        raise _fail(
            "empty", f"no image value (None/NaN) (got {value!r}); the row has no image to load"
        )
    if isinstance(value, str):
        return _load_str(value, image_root, max_pixels)
    if isinstance(value, os.PathLike):
        return _load_path(os.fsdecode(os.fspath(value)), image_root, max_pixels)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _load_bytes(value, _describe_bytes(value), max_pixels)
    if isinstance(value, Image.Image):
        return _load_pil(value, max_pixels)
    if isinstance(value, np.ndarray):
        return _load_array(value, max_pixels)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        return _load_datasets_dict(value, image_root, max_pixels)
    raise _fail(
        "unsupported_type",
        f"cannot load an image from a value of type {type(value).__module__}."
        f"{type(value).__qualname__} ({_short_repr(value)}); accepted: {_ACCEPTED}",
    )


def _is_missing_scalar(value: Any) -> bool:
    """True for float NaN (numpy or builtin) and pandas' NA/NaT, without importing pandas."""
    if isinstance(value, (float, np.floating)):
        return bool(math.isnan(value))
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        return value is getattr(pandas, "NA", object()) or value is getattr(pandas, "NaT", object())
    return False


def _load_str(
    value: str, image_root: str | os.PathLike[str] | None, max_pixels: int | None
) -> Image.Image:
    head = value.lstrip()[:8].lower()
    if head.startswith(("http://", "https://")):
        raise _fail(
            "url_not_fetched",
            f"{_short_repr(value)} is a remote URL; remote URLs are not downloaded by this "
            "loader. Download the images first and pass local paths (or the bytes).",
        )
    if head.startswith("data:"):
        return _load_data_uri(value.strip(), max_pixels)
    if value == "":
        raise _fail("empty", "empty string given as image path")
    return _load_path(value, image_root, max_pixels)


def _load_data_uri(uri: str, max_pixels: int | None) -> Image.Image:
    shown = _short_repr(uri, 60)
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise _fail("invalid_data_uri", f"data URI {shown} has no ',' separating header and data")
    if not header.lower().endswith(";base64"):
        raise _fail(
            "invalid_data_uri",
            f"data URI {shown} is not base64-encoded; only 'data:<mediatype>;base64,<data>' "
            "URIs can carry image bytes",
        )
    compact = "".join(unquote(payload).split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(
            "invalid_data_uri", f"data URI {shown} has invalid base64 data ({exc})"
        ) from None
    return _load_bytes(data, f"data URI {shown}", max_pixels)


def _load_datasets_dict(
    value: Mapping[str, Any], image_root: str | os.PathLike[str] | None, max_pixels: int | None
) -> Image.Image:
    data = value.get("bytes")
    path = value.get("path")
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _fail(
                "unsupported_type",
                f"datasets image dict has 'bytes' of type {type(data).__name__}; expected "
                "bytes (or None to use 'path')",
            )
        what = f"datasets image dict bytes {_describe_bytes(data)}"
        if path:
            what += f" (path {path!r})"
        return _load_bytes(data, what, max_pixels)
    if path is None or path == "":
        raise _fail(
            "empty",
            "datasets image dict has neither 'bytes' nor 'path' set; there is no image to load",
        )
    if not isinstance(path, (str, os.PathLike)):
        raise _fail(
            "unsupported_type",
            f"datasets image dict has 'path' of type {type(path).__name__}; expected str",
        )
    return _load_str(os.fsdecode(os.fspath(path)), image_root, max_pixels)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _resolve(raw: str, image_root: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """Expand ``~`` and join relative paths to ``image_root``; also say how it was resolved."""
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path, ""
    if image_root is not None:
        root = Path(os.fsdecode(os.fspath(image_root))).expanduser()
        return root / path, f" (relative path {raw!r} resolved against image_root {str(root)!r})"
    return path.absolute(), (
        f" (relative path {raw!r} resolved against the current directory; pass image_root= if "
        "paths are relative to a dataset folder)"
    )


def _load_path(
    raw: str, image_root: str | os.PathLike[str] | None, max_pixels: int | None
) -> Image.Image:
    path, how = _resolve(raw, image_root)
    shown = _short_repr(str(path), 500)
    if os.path.isdir(path):  # unlike Path.is_dir, never raises (long names, NUL bytes)
        raise _fail("unreadable", f"{shown} is a directory, not an image file{how}")
    try:
        fp = open_regular_file(path, shown)  # closed by the ``with`` below
    except ImageLoadError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise _fail(
            "missing_file", f"no such file: {shown}{how}; check the path and image_root"
        ) from None
    except IsADirectoryError:
        raise _fail("unreadable", f"{shown} is a directory, not an image file{how}") from None
    except PermissionError as exc:
        raise _fail(
            "unreadable", f"permission denied reading {shown} ({exc.strerror}); fix permissions"
        ) from None
    except (OSError, ValueError) as exc:  # e.g. name too long, embedded NUL byte, I/O error
        detail = getattr(exc, "strerror", None) or exc
        raise _fail("unreadable", f"cannot read {shown}: {detail}") from None
    with fp:
        return _decode(fp, f"file {shown}", max_pixels)


def open_regular_file(
    path: str | os.PathLike,
    shown: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float | None = None,
) -> IO[bytes]:
    """The bytes of ``path``, read within ``timeout`` seconds, if it is a regular file of at
    most ``max_bytes``; returned as an in-memory binary file.

    A FIFO, socket or device named ``x.jpg`` would block a plain ``open`` (a FIFO waits for a
    writer for ever) or stream without end: the file is opened non-blocking, checked with
    ``fstat`` before anything is read, and refused (``not_a_regular_file``,
    ``file_too_large``) with an :class:`ImageLoadError`.  A regular file can block too (a
    hung NFS or FUSE mount, a failing disk), and Python cannot interrupt a blocked
    ``read``: the open and the read run in a helper thread, and if they have not finished
    after ``timeout`` seconds (None: :data:`DEFAULT_READ_TIMEOUT`, read now; ``math.inf``:
    wait for ever, in this thread) the file is refused with ``read_timeout``; the stuck
    thread is left behind as a daemon and ends with the read, or with the process.  On a
    normal file this costs one hand-over to a reused reader thread (about 15 us, next to
    milliseconds of decoding).  ``OSError`` from the open or the read (missing,
    permission, I/O error) propagates for the caller to name.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, Integral) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    if timeout is None:
        timeout = DEFAULT_READ_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 (or math.inf), got {timeout!r}")
    shown = shown or _short_repr(os.fsdecode(os.fspath(path)), 500)
    if math.isinf(timeout):
        return BytesIO(_read_regular_file(path, shown, max_bytes))
    task = _ReadTask(path, shown, max_bytes)
    helper = getattr(_HELPERS, "reader", None)
    if helper is None:
        helper = _HELPERS.reader = _ReaderThread()
    helper.tasks.put(task)
    if not task.done.acquire(timeout=timeout):
        helper.abandon()  # it is stuck in this read: the next file gets a fresh helper
        _HELPERS.reader = None
        raise _fail(
            "read_timeout",
            f"reading {shown} did not finish within {timeout:g} s (a hung network mount or "
            "device?); skipped. If the storage is only slow, raise "
            "dedup_index.io.images.DEFAULT_READ_TIMEOUT",
        )
    if task.error is not None:
        raise task.error
    return BytesIO(task.data)


#: One reader thread per calling thread, reused from file to file: handing a read to a
#: waiting thread costs a few microseconds, starting a thread per file several times that.
_HELPERS = threading.local()


def _forget_reader() -> None:
    """In a forked child the parent's reader thread does not exist: start afresh."""
    _HELPERS.reader = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reader)


class _ReadTask:
    """One file to read; ``done`` (a plain lock, held until the read ends) is the cheapest
    primitive a caller can wait on with a timeout."""

    __slots__ = ("args", "data", "done", "error")

    def __init__(self, path: str | os.PathLike, shown: str, max_bytes: int) -> None:
        self.args = (path, shown, max_bytes)
        self.data = b""
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


class _ReaderThread(threading.Thread):
    """A daemon thread that runs :func:`_read_regular_file` for the tasks of one caller.
    Abandoned after a timeout, it ends once its stuck read returns (or with the process);
    idle, it ends soon after the thread it serves has ended (no leak per short-lived
    caller thread)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="dedup-index-reader")
        import queue

        self._owner = threading.current_thread()
        self._empty = queue.Empty
        self.tasks: queue.SimpleQueue[_ReadTask | None] = queue.SimpleQueue()
        self.start()

    def abandon(self) -> None:
        self.tasks.put(None)

    def run(self) -> None:
        while True:
            try:
                task = self.tasks.get(timeout=5.0)
            except self._empty:
                if self._owner.is_alive():
                    continue
                return
            if task is None:
                return
            try:
                task.data = _read_regular_file(*task.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                task.error = exc
            finally:
                task.done.release()


def _read_regular_file(path: str | os.PathLike, shown: str, max_bytes: int) -> bytes:
    """Open non-blocking, check it is a regular file of at most ``max_bytes`` (``fstat``,
    before reading), then read it to the end (never more than ``max_bytes``: a file that
    grows while read is refused too)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "is a directory", os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
            raise _fail("not_a_regular_file", f"{shown} is {kind}, not an image file; skipped")
        if st.st_size > max_bytes:
            raise _fail(
                "file_too_large",
                f"{shown} is {st.st_size} bytes, over the {max_bytes}-byte limit for one image",
            )
        if flags & getattr(os, "O_NONBLOCK", 0):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        chunks = []
        total = 0
        want = st.st_size + 1  # one byte more than fstat said: tells a file that grew
        while True:
            chunk = os.read(fd, max(want - total, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise _fail(
                    "file_too_large",
                    f"{shown} grew past the {max_bytes}-byte limit for one image while read",
                )
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _load_bytes(
    data: bytes | bytearray | memoryview, what: str, max_pixels: int | None
) -> Image.Image:
    if isinstance(data, memoryview):
        data = data.tobytes()
    if len(data) == 0:
        raise _fail("empty", f"{what} is empty (0 bytes); there is no image data")
    return _decode(BytesIO(data), what, max_pixels)


def _load_pil(img: Image.Image, max_pixels: int | None) -> Image.Image:
    what = f"PIL image (mode {img.mode}, size {img.size[0]}x{img.size[1]})"
    _check_size(img.size, what, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _convert_mapped(img, what)


def _load_array(arr: np.ndarray, max_pixels: int | None) -> Image.Image:
    what = f"numpy array (dtype {arr.dtype}, shape {arr.shape})"
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if arr.dtype != np.uint8 or not shape_ok:
        raise _fail(
            "unsupported_type",
            f"unsupported {what}; expected dtype uint8 with shape HxW or HxWxC, C in 1/3/4 "
            "(convert e.g. float arrays in [0,1] with (a * 255).round().astype(np.uint8))",
        )
    height, width = arr.shape[:2]
    _check_size((width, height), what, max_pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    img = Image.fromarray(np.ascontiguousarray(arr))
    return _convert_mapped(img, what)


# --------------------------------------------------------------------------------------------
# Decoding with precise failure reasons
# --------------------------------------------------------------------------------------------


def _check_size(size: tuple[int, int], what: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise _fail("empty", f"{what} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise _fail(
            "decompression_bomb",
            f"{what} is {width}x{height} = {width * height} pixels, more than "
            f"max_pixels={max_pixels}; refusing to decode it (possible decompression bomb). "
            "Pass a larger max_pixels (or None) if the image is trusted.",
        )


def _looks_truncated(exc: BaseException) -> bool:
    if isinstance(exc, EOFError):
        return True
    text = str(exc).lower()
    return any(hint in text for hint in _TRUNCATION_HINTS)


def _decode(fp: IO[bytes], what: str, max_pixels: int | None) -> Image.Image:
    """Identify, size-check and fully decode an image file object.

    PIL's own bomb warning is silenced here because our ``max_pixels`` comparison replaces it;
    its hard ``DecompressionBombError`` is still reported as ``decompression_bomb``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(fp)
        except UnidentifiedImageError:
            raise _fail(
                "not_an_image",
                f"{what} is not an image PIL can identify (wrong file, text, or unsupported "
                "format)",
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(what, exc) from None
        except Exception as exc:  # plugins raise many types on malformed headers
            if _looks_truncated(exc):
                raise _fail("truncated", f"{what} is truncated ({exc})") from None
            raise _fail("not_an_image", f"{what} could not be opened as an image ({exc})") from None
        with opened:
            what = f"{what} ({opened.format} {opened.size[0]}x{opened.size[1]})"
            _check_size(opened.size, what, max_pixels)
            return _convert_mapped(opened, what)


def _bomb(what: str, exc: BaseException) -> ImageLoadError:
    return _fail(
        "decompression_bomb",
        f"{what} exceeds PIL's own pixel limit ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS only "
        "if the image is trusted",
    )


def _convert_mapped(img: Image.Image, what: str) -> Image.Image:
    """Run :func:`to_rgb`, mapping decode errors to failure reasons."""
    try:
        return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(what, exc) from None
    except MemoryError:
        raise _fail(
            "decompression_bomb",
            f"{what} is too large to decode in the available memory; lower max_pixels",
        ) from None
    except Exception as exc:  # PIL decoders raise OSError, SyntaxError, ValueError, ...
        if _looks_truncated(exc):
            raise _fail(
                "truncated",
                f"{what} is truncated: the file ends before the image data does ({exc}); "
                "re-download or re-export it",
            ) from None
        if isinstance(exc, ValueError) and "closed" in str(exc).lower():
            raise _fail("unreadable", f"{what} is closed; pass an open image") from None
        raise _fail(
            "not_an_image",
            f"{what} could not be decoded ({type(exc).__name__}: {exc}); the file is corrupt or "
            "uses an unsupported variant of the format",
        ) from None


# --------------------------------------------------------------------------------------------
# RGB conversion
# --------------------------------------------------------------------------------------------


def _first_frame_upright(img: Image.Image) -> Image.Image:
    """Frame 0 of ``img``, EXIF-transposed, as a new loaded image; restores ``img``'s frame."""
    position = img.tell()
    if position != 0:
        img.seek(0)
    try:
        img.load()
        try:
            # exif_transpose reads orientation from the original (TIFF keeps it in tags that a
            # copy would lose) and returns a transposed image or a plain copy.
            return ImageOps.exif_transpose(img)
        except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError) as exc:
            if _looks_truncated(exc):
                raise
            return img.copy()  # malformed EXIF must not make a good image unloadable
    finally:
        if position != 0:
            img.seek(position)


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    palette = img.palette if img.mode == "P" else None
    return palette is not None and palette.mode == "RGBA"


def _composite_on_white(rgba: np.ndarray) -> Image.Image:
    """Blend straight-alpha RGBA (HxWx4 uint8) over white, rounding to nearest."""
    colour = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    out = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


def _convert_to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(np.asarray(img).astype(np.uint16) >> 8)
    if mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            # Genuine 32-bit data: map 0..2**31-1 onto 0..255, negatives to black.
            return _gray_to_rgb(np.clip(values, 0, None) >> 23)
        return _gray_to_rgb(values >> 8)  # 16-bit data stored as mode I (e.g. some PNG/TIFF)
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)))
    if mode in _PREMULTIPLIED_MODES:
        # Premultiplied colour over white is simply colour + (255 - alpha).
        arr = np.asarray(img).astype(np.int32)
        out = np.clip(arr[..., :-1] + (255 - arr[..., -1:]), 0, 255).astype(np.uint8)
        if mode == "La":
            return _gray_to_rgb(out[..., 0])
        return Image.fromarray(out)
    if _has_transparency(img):
        return _composite_on_white(np.asarray(img.convert("RGBA")))
    if mode == "RGB":
        return img  # already a fresh copy made by _first_frame_upright
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {exc}") from None


# --------------------------------------------------------------------------------------------
# Message helpers
# --------------------------------------------------------------------------------------------


def _short_repr(value: Any, limit: int = 120) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real failure
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[: limit - 3]}... ({len(text)} chars)"
    return text


def _describe_bytes(data: bytes | bytearray | memoryview) -> str:
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    head = bytes(data[:16])
    more = "..." if size > 16 else ""
    return f"<{type(data).__name__} of {size} bytes: {head!r}{more}>"
