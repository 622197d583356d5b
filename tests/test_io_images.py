"""Tests for dedup_index.io: every accepted input form, every conversion, every failure reason.

All images are real files written under tmp_path with real PIL; nothing is mocked.
"""

from __future__ import annotations

import base64
import os
import pickle
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dedup_index.io import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    LoadFailure,
    load_image,
    to_rgb,
    try_load_image,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def assert_fails(value, reason: str, **kwargs) -> LoadFailure:
    """Both entry points must agree on the failure reason."""
    image, failure = try_load_image(value, **kwargs)
    assert image is None
    assert failure is not None and failure.reason == reason, failure
    with pytest.raises(ImageLoadError) as info:
        load_image(value, **kwargs)
    assert info.value.failure == failure
    assert str(info.value) == str(failure) == f"{reason}: {failure.message}"
    return failure


@pytest.fixture
def source() -> np.ndarray:
    """A 24x32 RGB pattern: gradients plus noise, so any pixel mix-up shows."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:24, 0:32]
    arr = np.stack([x * 8, y * 10, (x + y) * 4], axis=-1).astype(np.int32)
    arr = (arr + rng.integers(0, 16, arr.shape)) % 256
    return arr.astype(np.uint8)


@pytest.fixture
def png_path(tmp_path: Path, source: np.ndarray) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(source).save(path)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------
# Accepted forms all give the source pixels
# ------------------------------------------------------------------------------------------


def test_str_and_path(png_path: Path, source: np.ndarray) -> None:
    for value in (str(png_path), png_path):
        out = load_image(value)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(pixels(out), source)


def test_relative_path_with_image_root(png_path: Path, source: np.ndarray) -> None:
    root = png_path.parent
    for value in ("img.png", Path("img.png")):
        np.testing.assert_array_equal(pixels(load_image(value, image_root=root)), source)
        np.testing.assert_array_equal(pixels(load_image(value, image_root=str(root))), source)
    # An absolute path ignores image_root.
    other = root / "elsewhere"
    np.testing.assert_array_equal(pixels(load_image(png_path, image_root=other)), source)


def test_tilde_expansion(png_path: Path, source: np.ndarray, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(png_path.parent))
    np.testing.assert_array_equal(pixels(load_image("~/img.png")), source)


def test_bytes_forms(png_path: Path, source: np.ndarray) -> None:
    data = png_path.read_bytes()
    for value in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(pixels(load_image(value)), source)


def test_pil_image(source: np.ndarray) -> None:
    img = Image.fromarray(source)
    out = load_image(img)
    np.testing.assert_array_equal(pixels(out), source)
    assert out is not img


def test_numpy_arrays(source: np.ndarray) -> None:
    np.testing.assert_array_equal(pixels(load_image(source)), source)
    # Non-contiguous views are fine too.
    np.testing.assert_array_equal(pixels(load_image(source[:, ::-1])), source[:, ::-1])
    gray = source[..., 0]
    expected_gray = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(pixels(load_image(gray)), expected_gray)
    np.testing.assert_array_equal(pixels(load_image(gray[..., None])), expected_gray)
    opaque = np.concatenate([source, np.full(source.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(pixels(load_image(opaque)), source)


def test_datasets_dicts(png_path: Path, source: np.ndarray) -> None:
    data = png_path.read_bytes()
    with_bytes = {"bytes": data, "path": "ignored-when-bytes-given.png"}
    np.testing.assert_array_equal(pixels(load_image(with_bytes)), source)
    path_only = {"bytes": None, "path": str(png_path)}
    np.testing.assert_array_equal(pixels(load_image(path_only)), source)
    relative = {"bytes": None, "path": "img.png"}
    np.testing.assert_array_equal(pixels(load_image(relative, image_root=png_path.parent)), source)


def test_data_uri(png_path: Path, source: np.ndarray) -> None:
    encoded = base64.b64encode(png_path.read_bytes()).decode()
    np.testing.assert_array_equal(pixels(load_image(f"data:image/png;base64,{encoded}")), source)
    # Scheme is case-insensitive, the media type is optional, line breaks are tolerated.
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    np.testing.assert_array_equal(pixels(load_image(f"DATA:;base64,{wrapped}")), source)


def test_result_is_detached_and_loaded(png_path: Path, source: np.ndarray) -> None:
    out = load_image(png_path)
    assert type(out) is Image.Image  # a plain image, not an ImageFile holding a handle
    png_path.unlink()
    np.testing.assert_array_equal(pixels(out), source)


def test_global_pil_state_untouched(png_path: Path, tmp_path: Path) -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    load_image(png_path)
    try_load_image(png_path.read_bytes()[:200])
    try_load_image(png_header_only(3000, 3000), max_pixels=1_000_000)
    after = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    assert after == before


# ------------------------------------------------------------------------------------------
# RGB conversion
# ------------------------------------------------------------------------------------------


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = pixels(load_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))

    bilevel = Image.fromarray(gray >= 128)  # mode "1"
    assert bilevel.mode == "1"
    out = pixels(load_image(bilevel))
    np.testing.assert_array_equal(out[..., 0], np.where(gray >= 128, 255, 0))


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 1))
    img.putpalette([*RED, *GREEN, *BLUE] + [0, 0, 0] * 253)
    for x, index in enumerate([0, 1, 2, 1]):
        img.putpixel((x, 0), index)
    return img


def test_palette_without_transparency(tmp_path: Path) -> None:
    _palette_image().save(tmp_path / "p.png")
    out = pixels(load_image(tmp_path / "p.png"))
    assert out.tolist() == [[list(RED), list(GREEN), list(BLUE), list(GREEN)]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparent_index_becomes_white(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"p.{fmt.lower()}"
    _palette_image().save(path, fmt, transparency=1)  # green is the transparent index
    out = pixels(load_image(path))
    assert out.tolist() == [[list(RED), [255, 255, 255], list(BLUE), [255, 255, 255]]]


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array(
        [[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128], [200, 100, 0, 128]]], np.uint8
    )
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = pixels(load_image(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, colour ignored
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque unchanged
    for got, colour in ((out[0, 2], (0, 0, 0)), (out[0, 3], (200, 100, 0))):
        expected = np.array(colour) * 128 / 255 + 255 * 127 / 255
        assert np.all(np.abs(got - expected) <= 1), (got, expected)


def test_la_and_premultiplied_modes() -> None:
    la = Image.fromarray(np.array([[[40, 0], [40, 255], [0, 128]]], np.uint8))
    assert la.mode == "LA"
    out = pixels(load_image(la)).astype(int)
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [40] * 3
    assert abs(out[0, 2, 0] - 127) <= 1
    premultiplied = Image.new("RGBa", (1, 1), (100, 50, 0, 128))  # stored premultiplied
    got = pixels(load_image(premultiplied))[0, 0].astype(int)
    assert np.all(np.abs(got - np.array([100, 50, 0]) - 127) <= 1), got


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    expected = np.asarray(cmyk.convert("RGB"))[0, 0].astype(int)
    cmyk.save(tmp_path / "c.jpg", quality=95)
    out = pixels(load_image(tmp_path / "c.jpg")).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out - expected).max() <= 8


def test_sixteen_bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 256]], np.uint16)
    img = Image.fromarray(values)
    img.save(tmp_path / "d.png")
    out = pixels(load_image(tmp_path / "d.png"))
    assert out[0, :, 0].tolist() == [0, 128, 255, 1]
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 0] == out[..., 2])
    # Same data in the other 16-bit modes and in 32-bit mode "I".
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    for variant in (big_endian, img.convert("I")):
        assert pixels(to_rgb(variant))[0, :, 0].tolist() == [0, 128, 255, 1], variant.mode


def test_float_mode_clipped() -> None:
    img = Image.fromarray(np.array([[-5.0, 100.4, 300.0, np.nan]], np.float32))
    assert img.mode == "F"
    assert pixels(to_rgb(img))[0, :, 0].tolist() == [0, 100, 255, 0]


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_other_colour_spaces(mode: str, source: np.ndarray) -> None:
    converted = Image.fromarray(source).convert(mode)
    out = pixels(to_rgb(converted))
    np.testing.assert_array_equal(out, pixels(converted.convert("RGB")))
    # The 8-bit round trip is lossy (LAB most of all, for saturated colours) but close.
    assert np.abs(out.astype(int) - source.astype(int)).mean() < 3


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 8, 8))  # mark the stored top-left corner
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    # 6: rotate 90 deg clockwise to display -> the corner goes top-right; 8: bottom-left.
    x, y = (16, 3) if orientation == 6 else (3, 36)
    assert np.abs(np.array(out.getpixel((x, y))) - RED).max() < 40
    assert np.abs(np.array(out.getpixel((3, 3) if orientation == 6 else (16, 3))) - BLUE).max() < 40


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animation_gives_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert pixels(load_image(path))[4, 4].tolist() == list(RED)
    with Image.open(path) as opened:
        opened.seek(2)
        assert pixels(load_image(opened))[4, 4].tolist() == list(RED)
        assert opened.tell() == 2  # the caller's frame position is restored


# ------------------------------------------------------------------------------------------
# Failures, each on a real file
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    failure = assert_fails(missing, "missing_file")
    assert str(missing) in failure.message
    failure = assert_fails("nope.jpg", "missing_file", image_root=tmp_path)
    assert str(missing) in failure.message and "image_root" in failure.message
    assert_fails({"bytes": None, "path": str(missing)}, "missing_file")


def test_directory(tmp_path: Path) -> None:
    failure = assert_fails(tmp_path, "unreadable")
    assert "directory" in failure.message


def test_text_file_and_random_bytes(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n" * 20)
    assert_fails(text, "not_an_image")
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.png").write_bytes(noise)
    assert_fails(tmp_path / "noise.png", "not_an_image")
    assert_fails(noise, "not_an_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, source: np.ndarray, fmt: str) -> None:
    big = np.tile(source, (4, 4, 1))
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(big).save(full, fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    failure = assert_fails(cut, "truncated")
    assert str(cut) in failure.message
    assert_fails(data[: len(data) // 2], "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_checked_from_header(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000), 90).save(path, compress_level=1)
    start = time.perf_counter()
    failure = assert_fails(path, "decompression_bomb", max_pixels=1_000_000)
    assert time.perf_counter() - start < 0.5
    assert "3000x3000" in failure.message and "max_pixels" in failure.message
    # The same file cut in half: header-only checking says "bomb", never reaching "truncated".
    cut = tmp_path / "big_cut.png"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails(cut, "decompression_bomb", max_pixels=1_000_000)
    assert_fails(cut, "truncated", max_pixels=None)
    # Disabled check: the real image loads.
    out = load_image(path, max_pixels=None)
    assert out.size == (3000, 3000) and out.getpixel((0, 0)) == (90, 90, 90)
    # In-memory inputs obey the same limit.
    assert_fails(np.zeros((1001, 1000), np.uint8), "decompression_bomb", max_pixels=1_000_000)


def test_bomb_check_independent_of_pil_globals(tmp_path: Path, monkeypatch) -> None:
    """PIL's limit/warning must neither block a permitted image nor leak a warning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "mid.png"
    Image.new("RGB", (150, 100), GREEN).save(path)  # 15k px: above PIL's limit, below 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would now be an exception
        assert load_image(path, max_pixels=None).size == (150, 100)
        assert load_image(path, max_pixels=20_000).size == (150, 100)
        assert_fails(path, "decompression_bomb", max_pixels=10_000)
        # Beyond 2x PIL's limit PIL itself refuses; that is reported as a bomb too.
        huge = tmp_path / "huge.png"
        huge.write_bytes(png_header_only(300, 100))
        failure = assert_fails(huge, "decompression_bomb", max_pixels=None)
        assert "MAX_IMAGE_PIXELS" in failure.message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert_fails(path, "decompression_bomb", max_pixels=DEFAULT_MAX_PIXELS // 20_000)


@pytest.mark.parametrize(
    "value", [42, [1, 2, 3], {"a": 1}, object(), True, np.zeros((4, 4), np.float32)]
)
def test_unsupported_types(value) -> None:
    failure = assert_fails(value, "unsupported_type")
    if isinstance(value, np.ndarray):
        assert "float32" in failure.message and "(4, 4)" in failure.message
    else:
        assert type(value).__name__ in failure.message and "numpy" in failure.message


def test_unsupported_array_shapes() -> None:
    for arr in (np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8), np.zeros(8, bool)):
        failure = assert_fails(arr, "unsupported_type")
        assert str(arr.shape) in failure.message


@pytest.mark.parametrize(
    "url", ["http://example.com/a.jpg", "https://example.com/a.png", "HTTPS://EXAMPLE.COM/b.png"]
)
def test_urls_not_fetched(url: str) -> None:
    failure = assert_fails(url, "url_not_fetched")
    assert "not downloaded" in failure.message and "local paths" in failure.message
    assert_fails({"bytes": None, "path": url}, "url_not_fetched")


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64,@@@not base64@@@",
        "data:image/png;base64,iVBORw0KGgo=extra",
        "data:image/png,rawdata-not-base64",
        "data:image/png;base64",
    ],
)
def test_invalid_data_uri(uri: str) -> None:
    assert_fails(uri, "invalid_data_uri")


def test_data_uri_that_is_not_an_image() -> None:
    payload = base64.b64encode(b"hello world").decode()
    assert_fails(f"data:text/plain;base64,{payload}", "not_an_image")


@pytest.mark.parametrize(
    "value",
    [None, float("nan"), np.float32("nan"), b"", bytearray(), "", {"bytes": None, "path": None}],
)
def test_empty(value) -> None:
    failure = assert_fails(value, "empty")
    if value is None or isinstance(value, float):
        assert "None/NaN" in failure.message


def test_failure_objects() -> None:
    failure = LoadFailure("empty", "nothing")
    assert str(failure) == "empty: nothing"
    with pytest.raises(ValueError):
        LoadFailure("bogus", "unknown reason codes are rejected")
    error = ImageLoadError(failure)
    assert isinstance(error, ValueError) and error.failure is failure
    assert pickle.loads(pickle.dumps(error)).failure == failure


def test_bytes_message_is_truncated() -> None:
    noise = bytes(range(256)) * 40
    failure = assert_fails(noise, "not_an_image")
    assert "10240 bytes" in failure.message and len(failure.message) < 300


def test_bad_max_pixels_argument(png_path: Path) -> None:
    for bad in (0, -1, 1.5, "10"):
        with pytest.raises(ValueError):
            try_load_image(png_path, max_pixels=bad)


def test_unreadable_paths(png_path: Path) -> None:
    assert_fails(png_path / "child.png", "missing_file")  # a file used as a directory
    assert_fails("bad\x00name.png", "unreadable")
    failure = assert_fails(png_path.parent / ("x" * 5000), "unreadable")
    assert len(failure.message) < 1000


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read mode-000 files"
)
def test_permission_denied(png_path: Path) -> None:
    png_path.chmod(0)
    try:
        assert_fails(png_path, "unreadable")
    finally:
        png_path.chmod(0o644)


def test_closed_pil_image_and_zero_size(png_path: Path) -> None:
    opened = Image.open(png_path)
    opened.close()
    assert_fails(opened, "unreadable")
    assert_fails(np.zeros((0, 4, 3), np.uint8), "empty")


def test_pandas_missing_values() -> None:
    pd = pytest.importorskip("pandas")
    for value in (pd.NA, pd.NaT):
        assert_fails(value, "empty")


def test_to_rgb_returns_new_image_and_leaves_input(source: np.ndarray) -> None:
    img = Image.fromarray(source)
    out = to_rgb(img)
    assert out is not img and out.mode == "RGB"
    out.putpixel((0, 0), (1, 2, 3))
    np.testing.assert_array_equal(pixels(img), source)
    rgba = Image.new("RGBA", (2, 2), (9, 9, 9, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (9, 9, 9, 0)


def test_numpy_integer_max_pixels_and_no_heavy_imports(png_path: Path) -> None:
    assert load_image(png_path, max_pixels=np.int64(10_000)).size == (32, 24)
    code = "import sys, dedup_index.io; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
