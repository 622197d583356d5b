"""Exceptions raised by dedup-index.

Every error names the bad value and says what to do; callers can catch
``DedupIndexError`` for anything raised on purpose by this package.
"""

from __future__ import annotations


class DedupIndexError(Exception):
    """Base class of the errors this package raises on purpose."""


class ModelLoadError(DedupIndexError, OSError):
    """The embedding model could not be loaded (offline, not cached, bad path)."""


class NoValidImagesError(DedupIndexError, ValueError):
    """No image of the input could be loaded, so there is nothing to deduplicate."""


class ImagesFailedError(DedupIndexError, ValueError):
    """Some images failed to load and ``on_error="raise"`` was asked for."""


class TooLargeForBackendError(DedupIndexError, ValueError):
    """The chosen backend refuses an input this large (the dense oracle)."""
