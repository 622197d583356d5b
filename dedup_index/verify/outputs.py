"""The evidence of verification, written out: every pair with what confirmed or rejected it.

``dedup-index run --verify geometric --pairs pairs.parquet`` writes the verified pairs to
``pairs.parquet`` (``i``, ``j`` input rows, ``key_i``, ``key_j``, ``similarity``, and the
evidence: ``hash_distance`` of 256 bits, ``inliers``, ``matches``, ``agreement``,
``mirrored``, ``how``) and every candidate, verified or not, to
``pairs.candidates.parquet`` with a ``verified`` column: what verification removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def candidates_path(pairs_path: str | os.PathLike) -> Path:
    """``pairs.parquet`` -> ``pairs.candidates.parquet`` (same folder)."""
    path = Path(pairs_path)
    return path.with_name(f"{path.stem}.candidates{path.suffix or '.parquet'}")


def evidence_frame(verification: Any, rows: Any, keys: Any):
    """Every candidate as a DataFrame with input rows and keys (see the module doc)."""
    frame = verification.to_frame()
    rows = np.asarray(rows, dtype=np.int64)
    key_array = np.asarray(keys, dtype=object)
    i, j = frame["i"].to_numpy(np.int64), frame["j"].to_numpy(np.int64)
    frame["i"], frame["j"] = rows[i], rows[j]
    frame.insert(2, "key_i", key_array[i].tolist())
    frame.insert(3, "key_j", key_array[j].tolist())
    frame["how"] = frame["how"].astype(str)
    return frame


def write_verified_pairs(
    path: str | os.PathLike,
    candidates: str | os.PathLike,
    verification: Any,
    rows: Any,
    keys: Any,
) -> int:
    """Verified pairs with their evidence to ``path``, every candidate to ``candidates``
    (Parquet; the caller stages both, :class:`~dedup_index.files.StagedWrites`); returns
    the number of verified pairs written."""
    frame = evidence_frame(verification, rows, keys)
    verified = frame[frame["verified"]].drop(columns=["verified"]).reset_index(drop=True)
    frame.to_parquet(candidates, index=False)
    verified.to_parquet(path, index=False)
    return len(verified)


__all__ = ["candidates_path", "evidence_frame", "write_verified_pairs"]
