"""Image loading stage: turn any supported image value into an RGB PIL image or a LoadFailure.

Only PIL, numpy and the standard library are imported here, so loading can run (and be
tested) without torch or transformers installed.
"""

from dedup_index.io.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    LoadFailure,
    load_image,
    open_regular_file,
    to_rgb,
    try_load_image,
)

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "LoadFailure",
    "load_image",
    "open_regular_file",
    "to_rgb",
    "try_load_image",
]
