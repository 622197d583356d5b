"""Verification: are the embedding's candidate pairs really copies of each other?

Embedding similarity finds images that look alike, which is not the same as copies (two
tiles of one brick wall, two photos of one flag).  This stage takes the candidate pairs of
the embedding search and keeps only those it can confirm: first by a perceptual hash
(exact and near-exact copies, :mod:`.hashing`), then by local features and a geometric
model (crops, rotations, flips, overlays, re-framing, :mod:`.geometry`).  The keep policies
then run on the verified pairs, so the reference ``i < j`` semantics hold on them.

    from dedup_index.verify import verify_pairs
    verification = verify_pairs(result.pairs, image_values)   # every candidate + evidence
    verification.pairs                                        # the verified PairSet

Needs OpenCV for the geometric step: ``pip install 'dedup-index[verify]'``.
"""

from .geometry import Features, GeometricOptions, Match, extract_features, match_features
from .hashing import HASH_BITS, hash_distance, perceptual_hashes
from .stage import (
    HASH_MAX_DISTANCE,
    VERIFY_METHODS,
    Verification,
    candidate_threshold,
    check_verify,
    verify_pairs,
    verify_result,
)

__all__ = [
    "Features",
    "GeometricOptions",
    "HASH_BITS",
    "HASH_MAX_DISTANCE",
    "Match",
    "VERIFY_METHODS",
    "Verification",
    "candidate_threshold",
    "check_verify",
    "extract_features",
    "hash_distance",
    "match_features",
    "perceptual_hashes",
    "verify_pairs",
    "verify_result",
]
