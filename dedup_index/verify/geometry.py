"""Local features and a geometric model: is image B a copy (edited) of image A?

SIFT keypoints on the luminance, resized so the longer side is :attr:`GeometricOptions.side`
pixels (small images upscaled, large ones downscaled), nearest-neighbour matching with
Lowe's ratio test, then an affine model fitted by RANSAC (OpenCV).  The pair's
verification score is the number of RANSAC inliers; it is verified when that reaches
``min_inliers`` and the model is a plausible edit (no collapse, no extreme stretch).

Mirror-aware without a second extraction: the descriptor of a keypoint in the mirror
image is the same descriptor with its 4 x 4 spatial grid flipped vertically (in the
keypoint's frame) and its 8 orientation bins reversed (``b -> -b mod 8``), and the
keypoint's position is ``x -> width - 1 - x``.  When the direct match does not verify,
the mirror of A is matched against B.

Deterministic: SIFT is, OpenCV's RANSAC draws from a fixed seed each call, and no thread
count enters the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class GeometricOptions:
    """Parameters of feature extraction and matching.

    Attributes:
        side: the longer side, in pixels, that images are resized to before extraction.
        max_features: SIFT keypoints kept per image (the strongest).
        min_side: images whose shorter side is below this many pixels have no features
            (reason ``too_small``).
        ratio: Lowe's ratio test: a match is kept when its distance is below ``ratio``
            times the second-nearest's.
        ransac_px: RANSAC reprojection tolerance, in pixels of the resized images.
        min_inliers: inliers needed to verify a pair.
        max_stretch: largest ratio of the affine model's two singular values (aspect
            changes up to this pass; degenerate fits on a line do not).
        min_agreement: the photometric check: image A warped onto B by the model, 70% of
            a 10 x 10 grid of B's blocks must correlate with A at least this much.
            Rejects pairs whose inliers all lie on shared furniture (the same caption,
            the same window frame, a cloned texture patch) while the pictures differ.
            0 turns it off.
        contrast: SIFT's contrast threshold (OpenCV's default is 0.04; lower finds
            keypoints in blurred copies).
    """

    side: int = 384
    max_features: int = 800
    min_side: int = 16
    ratio: float = 0.85
    ransac_px: float = 4.0
    min_inliers: int = 8
    max_stretch: float = 3.0
    min_agreement: float = 0.25
    contrast: float = 0.02

    def __post_init__(self) -> None:
        for name in ("side", "max_features", "min_side", "min_inliers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if not self.ransac_px > 0:
            raise ValueError(f"ransac_px must be > 0, got {self.ransac_px!r}")
        if not self.contrast > 0:
            raise ValueError(f"contrast must be > 0, got {self.contrast!r}")
        if not self.max_stretch >= 1.0:
            raise ValueError(f"max_stretch must be >= 1, got {self.max_stretch!r}")
        if self.min_inliers < 4:
            raise ValueError(
                f"min_inliers must be >= 4 (an affine model needs 3), got {self.min_inliers!r}"
            )


@dataclass(frozen=True)
class Features:
    """Keypoint positions ``(K, 2)`` float32 and SIFT descriptors ``(K, 128)`` uint8 of
    one image, in the resized image of ``width`` pixels; ``thumb`` is that image's
    luminance at :data:`THUMB_SCALE` of its size (the photometric check)."""

    xy: np.ndarray
    descriptors: np.ndarray
    width: int
    thumb: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.xy.shape[0])


@dataclass(frozen=True)
class Match:
    """Outcome of matching two images: RANSAC ``inliers`` (0 when no model), tentative
    ``matches`` after the ratio test, the photometric ``agreement`` (NaN when not
    computed), and whether the mirror image matched."""

    inliers: int
    matches: int
    agreement: float
    mirrored: bool

    def verified(self, options: GeometricOptions) -> bool:
        """Enough inliers, and (when checked) the pictures agree under the model."""
        if self.inliers < options.min_inliers:
            return False
        return options.min_agreement <= 0 or not self.agreement < options.min_agreement


_SINGLE_THREADED: list[bool] = []


def prepare_opencv() -> None:
    """Import OpenCV and set it to one thread, in this process (before forking workers)."""
    _cv2()


def _cv2():
    """OpenCV, set to one thread on first use: verification parallelises by processes,
    and a forked worker must not inherit a running OpenCV thread pool (it hangs)."""
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - the extra is part of the test install
        raise ImportError(
            "verify='geometric' needs OpenCV: pip install 'dedup-index[verify]'"
        ) from exc
    if not _SINGLE_THREADED:
        cv2.setNumThreads(1)
        _SINGLE_THREADED.append(True)
    return cv2


_SIFT: dict[tuple[int, float], object] = {}

#: The thumbnail of the photometric check, relative to the resized image (96 px of 384).
THUMB_SCALE = 0.25
_GRID = 10
#: The agreement is this quantile of the block correlations: 70% of the blocks must agree,
#: so a shared overlay (a caption, a window frame: well under half the picture) cannot
#: carry a pair, while a copy under such an overlay still passes.
_QUANTILE = 0.3
#: Share of B (or of A) that the model must overlap.
_MIN_COVER = 0.25


def _stretch(pixels: np.ndarray) -> np.ndarray:
    """Contrast stretched to 0..255 between the 1st and 99th percentiles, so faint images
    (a dim micrograph, a washed-out scan) still give SIFT keypoints."""
    lo, hi = np.percentile(pixels, (1, 99))
    if hi - lo < 1:
        return pixels
    out = (pixels.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def extract_features(image: Image.Image, options: GeometricOptions) -> Features | None:
    """SIFT features of a PIL image, or None when it is smaller than ``min_side``."""
    cv2 = _cv2()
    w, h = image.size
    if min(w, h) < options.min_side:
        return None
    scale = options.side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = image.convert("L")
    if size != (w, h):
        gray = gray.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
    pixels = np.ascontiguousarray(_stretch(np.asarray(gray, dtype=np.uint8)))
    tw, th = max(1, round(size[0] * THUMB_SCALE)), max(1, round(size[1] * THUMB_SCALE))
    thumb = cv2.GaussianBlur(cv2.resize(pixels, (tw, th), interpolation=cv2.INTER_AREA), (3, 3), 0)
    key = (options.max_features, options.contrast)
    sift = _SIFT.get(key)
    if sift is None:
        sift = _SIFT[key] = cv2.SIFT_create(
            nfeatures=options.max_features, contrastThreshold=options.contrast
        )
    keypoints, desc = sift.detectAndCompute(pixels, None)
    if desc is None or not keypoints:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), size[0], thumb)
    xy = np.array([k.pt for k in keypoints], dtype=np.float32)
    descriptors = np.clip(np.rint(desc), 0, 255).astype(np.uint8)
    return Features(xy, descriptors, size[0], thumb)


#: Descriptor index permutation of the mirror image (see the module docstring).
def _mirror_permutation() -> np.ndarray:
    idx = np.arange(128).reshape(4, 4, 8)
    return idx[::-1, :, (-np.arange(8)) % 8].ravel()


_MIRROR_PERM = _mirror_permutation()


def mirror(features: Features) -> Features:
    """The features of the horizontally mirrored image, computed from ``features``."""
    xy = features.xy.copy()
    xy[:, 0] = features.width - 1 - xy[:, 0]
    thumb = None if features.thumb is None else np.ascontiguousarray(features.thumb[:, ::-1])
    return Features(xy, features.descriptors[:, _MIRROR_PERM], features.width, thumb)


def agreement(a: Features, b: Features, model: np.ndarray) -> float:
    """The 30% quantile over B's 10 x 10 blocks of the correlation of B with A warped by
    ``model`` (blocks A does not cover, or flat in both images, are left out; a block flat
    in only one of them scores 0; 1.0 when no block is left: nothing contradicts the
    model); 0 when the model overlaps under a quarter of either image."""
    cv2 = _cv2()
    if a.thumb is None or b.thumb is None:
        return 1.0
    m = model.astype(np.float64).copy()
    m[:, 2] *= THUMB_SCALE
    h, w = b.thumb.shape
    warped = cv2.warpAffine(a.thumb.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR)
    cover = cv2.warpAffine(np.ones(a.thumb.shape, np.float32), m, (w, h), flags=cv2.INTER_NEAREST)
    target = b.thumb.astype(np.float32)
    covered = float((cover > 0.5).sum())
    a_area = abs(float(np.linalg.det(m[:, :2]))) * a.thumb.size
    if max(covered / b.thumb.size, covered / max(a_area, 1.0)) < _MIN_COVER:
        return 0.0  # the model puts (almost) none of A on B: no copy
    scores = []
    ys = np.linspace(0, h, _GRID + 1).round().astype(int)
    xs = np.linspace(0, w, _GRID + 1).round().astype(int)
    for r in range(_GRID):
        for c in range(_GRID):
            block = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
            valid = cover[block] > 0.5
            if valid.sum() < 0.8 * valid.size or valid.size < 4:
                continue
            p, q = warped[block][valid], target[block][valid]
            p, q = p - p.mean(), q - q.mean()
            sp, sq = float(np.sqrt((p * p).sum())), float(np.sqrt((q * q).sum()))
            flat_p, flat_q = sp < 2.0 * np.sqrt(p.size), sq < 2.0 * np.sqrt(q.size)
            if flat_p and flat_q:
                continue  # flat in both (std below 2 grey levels): no evidence either way
            scores.append(0.0 if flat_p or flat_q else float((p * q).sum()) / (sp * sq))
    return float(np.quantile(scores, _QUANTILE)) if scores else 1.0


def _ratio_matches(a: Features, b: Features, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbours of A's descriptors among B's (one GEMM), Lowe's ratio test, and
    each of B's keypoints used once (by the first of A's that claims it)."""
    da = a.descriptors.astype(np.float32)
    db = b.descriptors.astype(np.float32)
    d2 = (da * da).sum(1)[:, None] + (db * db).sum(1)[None, :] - 2.0 * (da @ db.T)
    np.maximum(d2, 0.0, out=d2)
    two = np.argpartition(d2, 1, axis=1)[:, :2]
    pair = np.take_along_axis(d2, two, axis=1)
    first = np.argmin(pair, axis=1)
    rows = np.arange(len(a))
    nearest = two[rows, first]
    d1, d2nd = pair[rows, first], pair[rows, 1 - first]
    keep = np.flatnonzero(d1 < (ratio * ratio) * d2nd)  # squared distances
    _, once = np.unique(nearest[keep], return_index=True)
    keep = np.sort(keep[once])
    return a.xy[keep], b.xy[nearest[keep]]


def _match_once(a: Features, b: Features, options: GeometricOptions) -> tuple[int, int, float]:
    cv2 = _cv2()
    if len(a) < 2 or len(b) < 2:
        return 0, 0, np.nan
    src, dst = _ratio_matches(a, b, options.ratio)
    tentative = int(src.shape[0])
    if tentative < options.min_inliers:
        return 0, tentative, np.nan
    model, mask = cv2.estimateAffine2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=options.ransac_px,
        maxIters=2000,
        confidence=0.995,
        refineIters=10,
    )
    if model is None or mask is None:
        return 0, tentative, np.nan
    singular = np.linalg.svd(model[:, :2], compute_uv=False)
    if (
        np.linalg.det(model[:, :2]) <= 0
        or singular[1] < 1e-3
        or singular[0] / singular[1] > options.max_stretch
        or not 1 / 8 <= float(np.sqrt(singular[0] * singular[1])) <= 8
    ):
        return 0, tentative, np.nan
    inliers = int(mask.sum())
    if inliers < options.min_inliers or options.min_agreement <= 0:
        return inliers, tentative, np.nan
    return inliers, tentative, agreement(a, b, model)


def match_features(a: Features, b: Features, options: GeometricOptions) -> Match:
    """Match ``a`` to ``b``, and ``a``'s mirror image to ``b`` unless the first verifies."""
    first = Match(*_match_once(a, b, options), False)
    if first.verified(options):
        return first
    second = Match(*_match_once(mirror(a), b, options), True)
    if second.verified(options) or second.inliers > first.inliers:
        return second
    return first


__all__ = [
    "Features",
    "GeometricOptions",
    "Match",
    "extract_features",
    "match_features",
    "mirror",
    "prepare_opencv",
]
