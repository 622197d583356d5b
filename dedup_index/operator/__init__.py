"""The DataFlow-compatible operator and storage: rows in, kept rows (+ rejects) out."""

from .filter import ImageDeduplicateFilter, RunReport
from .storage import FileStorage

__all__ = ["FileStorage", "ImageDeduplicateFilter", "RunReport"]
