"""A persistent dedup index: add new rows in batches, get the one-shot answer."""

from .core import AddResult, DedupIndex, IndexCorruptError, IndexError_, IndexLockedError

__all__ = ["AddResult", "DedupIndex", "IndexCorruptError", "IndexError_", "IndexLockedError"]
