"""dedup-index: near-duplicate image removal with CLIP embeddings and a FAISS index.

``import dedup_index`` is light: numpy only.  FAISS loads on the first search; torch and
transformers load only when an image encoder is built (the operator, ``encode``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# The same image must embed to the same bits whatever the thread count (one machine with
# 16 threads, a Ray actor with 1): MKL's GEMM splits small products across threads, which
# moves the last bit of CLIP's projection head.  Strict conditional numerical
# reproducibility makes MKL's results independent of the thread count.  Read when MKL
# starts (torch's first GEMM), so set before torch runs anything; a user's value wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562) so that heavy
# dependencies are imported only by the stage that needs them.
from .lazy import lazy_exports  # noqa: E402 - after MKL_CBWR, before anything heavy

_LAZY = {
    "dedup_embeddings": "dedup_index.dedup",
    "DedupResult": "dedup_index.dedup",
    "PairSet": "dedup_index.search.pairs",
    "ImageDeduplicateFilter": "dedup_index.operator.filter",
    "FileStorage": "dedup_index.operator.storage",
    "load_image": "dedup_index.io",
    "try_load_image": "dedup_index.io",
    "LoadFailure": "dedup_index.io",
    "ImageLoadError": "dedup_index.io",
    "CLIPEncoder": "dedup_index.encode.clip",
    "load_encoder": "dedup_index.encode",
    "DedupIndexError": "dedup_index.errors",
    "ModelLoadError": "dedup_index.errors",
    "NoValidImagesError": "dedup_index.errors",
    "ImagesFailedError": "dedup_index.errors",
    "TooLargeForBackendError": "dedup_index.errors",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .dedup import DedupResult, dedup_embeddings  # noqa: F401
    from .encode import load_encoder  # noqa: F401
    from .encode.clip import CLIPEncoder  # noqa: F401
    from .errors import (  # noqa: F401
        DedupIndexError,
        ImagesFailedError,
        ModelLoadError,
        NoValidImagesError,
        TooLargeForBackendError,
    )
    from .io import ImageLoadError, LoadFailure, load_image, try_load_image  # noqa: F401
    from .operator.filter import ImageDeduplicateFilter  # noqa: F401
    from .operator.storage import FileStorage  # noqa: F401
    from .search.pairs import PairSet  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
