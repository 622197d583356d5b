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


def write_version_1_index(root: Path, E: np.ndarray, keys: list[str], threshold: float) -> dict:
    """A format-1 index at ``root`` as an older dedup_index wrote it (one ``embeddings/``
    store, one pair part, one state file, SHA-256 of those two in the manifest), holding
    ``E`` under ``keys`` with the dense oracle's decisions; returns the manifest."""
    import hashlib

    from dedup_index import dedup_embeddings
    from dedup_index.files import write_json_atomic
    from dedup_index.store import EmbeddingStore, write_pair_file

    n, dim = E.shape
    (root / "pairs").mkdir(parents=True)
    with EmbeddingStore.create(root / "embeddings", dim, meta={"model_name": None}) as store:
        store.append(E, keys=keys)
    first = dedup_embeddings(E, threshold, backend="dense")
    part = "pairs/part-000001.parquet"
    sums = {part: write_pair_file(root / part, first.pairs)}
    buf = io.BytesIO()
    np.savez(
        buf,
        keep=first.keep,
        duplicate_of=first.duplicate_of,
        duplicate_similarity=first.duplicate_similarity,
        group=first.group,
        nearest=first.max_similarity,
        earlier=first.max_earlier_similarity,
    )
    (root / "state-000001.npz").write_bytes(buf.getvalue())
    sums["state-000001.npz"] = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest = {
        "format": "dedup-index",
        "version": 1,
        "dim": dim,
        "threshold": threshold,
        "policy": "reference",
        "backend": "blocked",
        "model_name": None,
        "count": n,
        "generation": 1,
        "backend_options": {},
        "ann": None,
        "pairs": [part],
        "state": "state-000001.npz",
        "checksums": sums,
        "n_pairs": len(first.pairs),
    }
    write_json_atomic(root / "manifest.json", manifest)
    return manifest
