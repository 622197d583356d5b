"""Shared fixtures: a tiny real CLIP checkpoint on disk and real photos from scikit-image."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# Random CLIP weights put distinct photos at cosine up to ~0.999 and exact or re-encoded
# copies above 0.99999, so operator tests use this threshold.
COPY_THRESHOLD = 0.9999


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    from dedup_index.encode.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def encoder(tiny_clip):
    from dedup_index.encode.clip import CLIPEncoder

    return CLIPEncoder(tiny_clip, device="cpu", batch_size=8)


def photo(name: str, max_side: int = 160) -> Image.Image:
    """A real photo shipped with scikit-image, RGB, shrunk to keep tests fast."""
    import skimage.data

    arr = (
        skimage.data.stereo_motorcycle()[0]
        if name == "motorcycle"
        else getattr(skimage.data, name)()
    )
    img = Image.fromarray(np.asarray(arr)).convert("RGB")
    img.thumbnail((max_side, max_side))
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """a.jpg (astronaut), b.jpg (coffee), a_copy.jpg (same bytes), a_reenc.jpg (re-encoded)."""
    folder = tmp_path / "images"
    folder.mkdir()
    a = jpeg_bytes(photo("astronaut"))
    (folder / "a.jpg").write_bytes(a)
    (folder / "b.jpg").write_bytes(jpeg_bytes(photo("coffee")))
    (folder / "a_copy.jpg").write_bytes(a)
    reenc = Image.open(io.BytesIO(a)).convert("RGB")
    (folder / "a_reenc.jpg").write_bytes(jpeg_bytes(reenc, quality=70))
    (folder / "c.png").write_bytes(_png(photo("chelsea")))
    return folder


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


class MemoryStorage:
    """A DataFlow-style storage over an in-memory table (the operator takes any such object)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.written: list[pd.DataFrame] = []

    def read(self, kind: str) -> pd.DataFrame:
        assert kind == "dataframe"
        return self.frame.copy()

    def write(self, frame: pd.DataFrame) -> None:
        self.written.append(frame)
