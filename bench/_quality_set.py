"""The labelled near-duplicate set of ``bench/quality.py`` and the metrics it reports.

The set is built from real photos that scikit-image ships (``skimage.data``), offline:

- *Distinct images* are non-overlapping tiles of those photos (a ``rows x cols`` grid per
  photo, see :data:`SOURCES`).  Each photo is first shrunk so that its tiles' shorter side
  is at most :data:`TILE_SIDE` pixels, so every tile has about the same size.  Tiles of one
  photo are different images, but they share colours, texture and subject (two quarters of
  a brick wall, of the moon, of a gravel bed): the hard case for any near-duplicate
  detector.  Pairs of those are counted separately ("same photo") in the false positives.
- *Near-duplicates* of each tile are made by the transforms of :data:`TRANSFORMS` (resize,
  JPEG recompression, a small crop, brightness/contrast, blur, a small rotation, grayscale,
  a text watermark, and one combination).
- *Labels*: a tile and all its variants form one group.  True pairs are all pairs within a
  group (original-variant and variant-variant); every other pair is a distinct pair.

Rows are shuffled with a fixed seed, so an original is not always the first of its group
(which matters only for the row-level numbers: under the reference policy the first row
of a group in input order is the one that should stay).

Metrics work on predicted pairs ``(i, j, score)`` with ``i < j`` where a larger score
means closer (cosine similarity; for perceptual hashes ``-hamming_distance``): at a cut
``c`` the prediction is every pair with ``score >= c``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

#: Photos used: ``(name, rows, cols, tiles)``: a ``rows x cols`` grid, and the grid cells
#: kept (row-major indices; None = all).  Four photos give all four quarters (the hard
#: cases: textures and look-alike regions), the others two diagonal quarters or both
#: halves, to keep the set at a few hundred images on a shared 2-core machine.  All exist in
#: scikit-image 0.2x without pooch.  Left out: ``cat`` (the same photo as ``chelsea``), the
#: right view of ``stereo_motorcycle`` (a near-duplicate of the left one), synthetic images
#: (``checkerboard``, ``binary_blobs``, ``colorwheel``, ``logo``, ``shepp_logan_phantom``),
#: the binary ``horse`` silhouette, and ``microaneurysms`` (102 px).
SOURCES: tuple[tuple[str, int, int, tuple[int, ...] | None], ...] = (
    ("astronaut", 2, 2, None),
    ("camera", 2, 2, None),
    ("hubble_deep_field", 2, 2, None),
    ("brick", 2, 2, None),
    ("coffee", 2, 2, (0, 3)),
    ("chelsea", 1, 2, None),
    ("rocket", 2, 2, (0, 3)),
    ("motorcycle", 2, 2, (0, 3)),
    ("immunohistochemistry", 2, 2, (0, 3)),
    ("retina", 2, 2, (0, 3)),
    ("moon", 2, 2, (0, 3)),
    ("cell", 2, 2, (0, 3)),
    ("coins", 1, 2, None),
    ("clock", 1, 2, None),
    ("text", 1, 2, None),
    ("page", 1, 2, None),
    ("grass", 2, 2, (0, 3)),
    ("gravel", 2, 2, (0, 3)),
)

#: A photo is shrunk (never enlarged) so that its tiles' shorter side is at most this.
TILE_SIDE = 256

ORIGINAL = "original"


def load_photo(name: str) -> Image.Image:
    """``skimage.data.<name>()`` as an RGB PIL image (``motorcycle``: the left stereo view)."""
    import skimage.data

    if name == "motorcycle":
        arr = skimage.data.stereo_motorcycle()[0]
    else:
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            raise ValueError(f"skimage.data has no image {name!r}")
        arr = loader()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def tile_boxes(width: int, height: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``(left, top, right, bottom)`` boxes of a ``rows x cols`` grid,
    row-major, covering the image (the last row/column takes the remainder pixels)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows} x {cols}")
    if width < cols or height < rows:
        raise ValueError(f"a {width}x{height} image cannot hold a {rows} x {cols} grid")
    xs = [round(width * c / cols) for c in range(cols + 1)]
    ys = [round(height * r / rows) for r in range(rows + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


# --------------------------------------------------------------------------- transforms


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _scale(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.LANCZOS)


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), round(w * right), round(h * bottom)))


def _bright_contrast(img: Image.Image) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.3)).enhance(0.7)


def _watermark(img: Image.Image) -> Image.Image:
    """Semi-transparent white text with a dark outline across the lower third."""
    w, h = img.size
    font = ImageFont.load_default(size=max(10, h // 9))
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.text(
        (w * 0.05, h * 0.62),
        "(c) stock photo",
        font=font,
        fill=(255, 255, 255, 170),
        stroke_width=max(1, h // 90),
        stroke_fill=(0, 0, 0, 120),
    )
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _combined(img: Image.Image) -> Image.Image:
    out = _crop(img, 0.05, 0.05, 0.95, 0.95)
    out = ImageEnhance.Brightness(out).enhance(1.15)
    return _jpeg(_scale(out, 0.75), 50)


#: Near-duplicate transforms, in report order: ``name -> (description, function)``.
TRANSFORMS: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "resize": ("downscale to 50% (Lanczos)", lambda im: _scale(im, 0.5)),
    "jpeg": ("JPEG recompression at quality 50", lambda im: _jpeg(im, 50)),
    "crop": ("small crop: keep 85% x 85%, off-centre", lambda im: _crop(im, 0.1, 0.05, 0.95, 0.9)),
    "bright_contrast": ("brightness x1.3, then contrast x0.7", _bright_contrast),
    "blur": ("Gaussian blur, radius 1.5 px", lambda im: im.filter(ImageFilter.GaussianBlur(1.5))),
    "rotate": (
        "rotate 5 degrees, same canvas, black corners",
        lambda im: im.rotate(5, resample=Image.BICUBIC),
    ),
    "grayscale": ("grayscale (as RGB)", lambda im: im.convert("L").convert("RGB")),
    "watermark": ("text watermark across the lower third", _watermark),
    "combined": ("crop 90% + brightness x1.15 + resize 75% + JPEG q50", _combined),
}


# --------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class QualitySet:
    """A labelled set: one row per image, in (shuffled) input order.

    Attributes:
        images: the RGB PIL images.
        group: per row, the id of its source tile (its near-duplicate group).
        photo: per row, the id of the photo its tile was cut from.
        transform: per row, ``"original"`` or the transform's name.
        tiles: per group id, a name like ``"astronaut[0,1]"`` (grid row, column).
        photos: per photo id, the ``skimage.data`` name.
        transforms: the transform names used, in order.
    """

    images: list[Image.Image]
    group: np.ndarray
    photo: np.ndarray
    transform: np.ndarray
    tiles: list[str]
    photos: list[str]
    transforms: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.images)

    def describe(self, row: int) -> str:
        """``"astronaut[0,1] jpeg"``: the row's tile and transform."""
        return f"{self.tiles[self.group[row]]} {self.transform[row]}"


def build_set(
    sources: Sequence[tuple[str, int, int, tuple[int, ...] | None]] = SOURCES,
    transforms: Sequence[str] | None = None,
    *,
    seed: int = 0,
    tile_side: int = TILE_SIDE,
    shuffle: bool = True,
    catalog: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] | None = None,
) -> QualitySet:
    """Tile every source photo, make each transform of each tile, label and shuffle.

    ``sources`` lists ``(skimage.data name, rows, cols, kept cells or None)``.  Returns
    ``len(tiles) * (1 + len(transforms))`` rows.  Deterministic for a given ``seed``.
    ``catalog`` maps transform names to ``(description, function)`` (default
    :data:`TRANSFORMS`; the harder set of ``_hard_set.py`` passes its own).
    """
    catalog = TRANSFORMS if catalog is None else catalog
    names = tuple(catalog) if transforms is None else tuple(transforms)
    unknown = [t for t in names if t not in catalog]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; choose from {list(catalog)}")
    if tile_side < 16:
        raise ValueError(f"tile_side must be >= 16 pixels, got {tile_side}")
    images: list[Image.Image] = []
    group: list[int] = []
    photo: list[int] = []
    transform: list[str] = []
    tiles: list[str] = []
    photos: list[str] = []
    for name, rows, cols, keep in sources:
        img = load_photo(name)
        w, h = img.size
        scale = min(1.0, tile_side / min(w / cols, h / rows))
        if scale < 1.0:
            img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
        photos.append(name)
        for k, box in enumerate(tile_boxes(img.width, img.height, rows, cols)):
            if keep is not None and k not in keep:
                continue
            tile = img.crop(box)
            tiles.append(f"{name}[{k // cols},{k % cols}]")
            for t in (ORIGINAL, *names):
                images.append(tile if t == ORIGINAL else catalog[t][1](tile))
                group.append(len(tiles) - 1)
                photo.append(len(photos) - 1)
                transform.append(t)
    order = np.arange(len(images))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(images))
    return QualitySet(
        images=[images[k] for k in order],
        group=np.asarray(group, dtype=np.int64)[order],
        photo=np.asarray(photo, dtype=np.int64)[order],
        transform=np.asarray(transform, dtype=object)[order],
        tiles=tiles,
        photos=photos,
        transforms=names,
    )


# --------------------------------------------------------------------------- pair metrics


@dataclass(frozen=True)
class PairCounts:
    """Pair-level confusion counts at one cut; ``fp_same_photo`` counts false positives
    between tiles of the same photo (or their variants)."""

    tp: int
    fp: int
    fn: int
    fp_same_photo: int = 0

    @property
    def predicted(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1.0 when nothing is predicted (no wrong claim was made)."""
        return self.tp / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1.0 when there is nothing to find."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    @property
    def precision_cross(self) -> float:
        """Precision not counting false positives between tiles of one photo (the hard
        look-alike case): TP / (TP + FP - fp_same_photo)."""
        predicted = self.predicted - self.fp_same_photo
        return self.tp / predicted if predicted else 1.0

    @property
    def f1_cross(self) -> float:
        """F1 not counting false positives between tiles of one photo."""
        denom = 2 * self.tp + self.fp - self.fp_same_photo + self.fn
        return 2 * self.tp / denom if denom else 1.0


def true_pair_total(group: np.ndarray) -> int:
    """Number of pairs within groups: sum over groups of ``k (k - 1) / 2``."""
    _, sizes = np.unique(np.asarray(group), return_counts=True)
    return int((sizes * (sizes - 1) // 2).sum())


def pair_counts(
    i: np.ndarray, j: np.ndarray, group: np.ndarray, photo: np.ndarray | None = None
) -> PairCounts:
    """Confusion counts of the predicted pairs ``(i, j)`` (each unordered pair once)."""
    group = np.asarray(group)
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    same = group[i] == group[j]
    tp = int(same.sum())
    fp = int(i.size - tp)
    same_photo = 0
    if photo is not None:
        photo = np.asarray(photo)
        same_photo = int((~same & (photo[i] == photo[j])).sum())
    return PairCounts(tp=tp, fp=fp, fn=true_pair_total(group) - tp, fp_same_photo=same_photo)


def sweep(
    i: np.ndarray,
    j: np.ndarray,
    score: np.ndarray,
    group: np.ndarray,
    cuts: Sequence[float],
    photo: np.ndarray | None = None,
) -> list[PairCounts]:
    """:func:`pair_counts` of the pairs with ``score >= cut``, for each cut."""
    score = np.asarray(score)
    out = []
    for cut in cuts:
        hit = score >= cut
        out.append(pair_counts(np.asarray(i)[hit], np.asarray(j)[hit], group, photo))
    return out


@dataclass(frozen=True)
class BestCut:
    """The cut maximising F1: predicting ``score >= cut`` gives ``counts``; any cut in
    ``(below, cut]`` gives the same prediction (``below`` is the next lower score, or
    -inf)."""

    cut: float
    below: float
    counts: PairCounts


def best_cut(
    i: np.ndarray,
    j: np.ndarray,
    score: np.ndarray,
    group: np.ndarray,
    photo: np.ndarray | None = None,
    *,
    cross_photo_only: bool = False,
) -> BestCut:
    """The exact F1-maximising cut over every distinct score (ties go to the highest cut).

    Only the given pairs can be predicted: pairs outside them (below the search's lowest
    threshold) count as false negatives at every cut.  With ``cross_photo_only`` (needs
    ``photo``) pairs of distinct tiles of one photo are ignored (neither right nor wrong):
    the cut maximising :attr:`PairCounts.f1_cross`.
    """
    group = np.asarray(group)
    score = np.asarray(score, dtype=np.float64)
    i, j = np.asarray(i), np.asarray(j)
    if cross_photo_only:
        if photo is None:
            raise ValueError("cross_photo_only=True needs photo ids")
        photo = np.asarray(photo)
        ignore = (group[i] != group[j]) & (photo[i] == photo[j])
        i, j, score = i[~ignore], j[~ignore], score[~ignore]
    total = true_pair_total(group)
    if score.size == 0:
        return BestCut(np.inf, -np.inf, PairCounts(0, 0, total))
    order = np.argsort(-score, kind="stable")
    s = score[order]
    same = (group[i[order]] == group[j[order]]).astype(np.int64)
    tp = np.cumsum(same)
    fp = np.arange(1, s.size + 1) - tp
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each distinct score
    f1 = 2 * tp[last] / (2 * tp[last] + fp[last] + (total - tp[last]))
    k = int(np.argmax(f1))
    end = last[k]
    below = float(s[end + 1]) if end + 1 < s.size else -np.inf
    hit = order[: end + 1]
    counts = pair_counts(i[hit], j[hit], group, photo)
    return BestCut(cut=float(s[end]), below=below, counts=counts)


def scores_of(
    i: np.ndarray, j: np.ndarray, score: np.ndarray, a: np.ndarray, b: np.ndarray, n: int
) -> np.ndarray:
    """The score of each query pair ``(a[k], b[k])`` (either order) among the predicted
    pairs ``(i, j, score)`` with ``i < j``; -inf where the pair is not among them."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    keys = np.asarray(i, dtype=np.int64) * n + np.asarray(j, dtype=np.int64)
    order = np.argsort(keys)
    keys = keys[order]
    want = lo * n + hi
    pos = np.clip(np.searchsorted(keys, want), 0, max(keys.size - 1, 0))
    out = np.full(want.shape, -np.inf)
    if keys.size:
        found = keys[pos] == want
        out[found] = np.asarray(score, dtype=np.float64)[order][pos[found]]
    return out


def transform_pairs(qs: QualitySet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per transform, the ``(original row, variant row)`` pairs of every group."""
    originals = np.full(len(qs.tiles), -1, dtype=np.int64)
    is_orig = qs.transform == ORIGINAL
    originals[qs.group[is_orig]] = np.flatnonzero(is_orig)
    out = {}
    for t in qs.transforms:
        rows = np.flatnonzero(qs.transform == t)
        out[t] = (originals[qs.group[rows]], rows)
    return out


def transform_recall(
    qs: QualitySet, i: np.ndarray, j: np.ndarray, score: np.ndarray, cuts: Sequence[float]
) -> dict[str, list[float]]:
    """Per transform, the fraction of its original-variant pairs predicted at each cut."""
    out = {}
    for t, (a, b) in transform_pairs(qs).items():
        s = scores_of(i, j, score, a, b, qs.n)
        out[t] = [float((s >= c).mean()) if s.size else float("nan") for c in cuts]
    return out


# --------------------------------------------------------------------------- row metrics


@dataclass(frozen=True)
class RowCounts:
    """Row-level outcome of the reference policy on the predicted pairs.

    ``removed_ok``: removed rows that have an earlier row of their own group (true
    duplicates); ``removed_wrong``: removed rows that are the first of their group;
    ``groups_lost``: groups with no kept row (a distinct image gone from the output);
    ``dups_left``: kept rows beyond the first kept one of each group.  Ideal: ``removed_ok
    = n - groups``, the other three 0.
    """

    removed: int
    removed_ok: int
    removed_wrong: int
    groups_lost: int
    dups_left: int


def row_counts(keep: np.ndarray, group: np.ndarray) -> RowCounts:
    """:class:`RowCounts` of a keep mask over rows in input order."""
    keep = np.asarray(keep, dtype=bool)
    group = np.asarray(group)
    first = np.zeros(group.size, dtype=bool)
    first[np.unique(group, return_index=True)[1]] = True
    removed = ~keep
    kept_groups = np.unique(group[keep])
    return RowCounts(
        removed=int(removed.sum()),
        removed_ok=int((removed & ~first).sum()),
        removed_wrong=int((removed & first).sum()),
        groups_lost=int(np.unique(group).size - kept_groups.size),
        dups_left=int(keep.sum() - kept_groups.size),
    )


def reference_keep(n: int, i: np.ndarray, j: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Keep mask of the library's reference policy (row ``j`` goes iff some earlier row
    pairs with it) on the pairs ``(i, j)``, ``i < j``: :func:`dedup_index.policy.decide`."""
    from dedup_index.policy import decide
    from dedup_index.search import PairSet

    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    order = np.lexsort((j, i))
    pairs = PairSet(i[order], j[order], np.asarray(score, dtype=np.float64)[order])
    return decide(n, pairs, "reference").keep


# --------------------------------------------------------------------------- pHash


def phash_bits(images: Sequence[Image.Image], hash_size: int = 8) -> np.ndarray:
    """``imagehash.phash`` of each image as an ``(N, hash_size**2 / 8)`` uint8 bit array."""
    import imagehash

    bits = [np.packbits(imagehash.phash(im, hash_size=hash_size).hash.flatten()) for im in images]
    return np.stack(bits) if bits else np.zeros((0, hash_size * hash_size // 8), np.uint8)


def hamming_pairs(bits: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` with Hamming distance ``<= max_distance``: ``(i, j, distance)``.

    All pairs, computed in row blocks (N = a few thousand at most here)."""
    n = bits.shape[0]
    parts_i, parts_j, parts_d = [], [], []
    for a in range(0, n, 512):
        block = bits[a : a + 512]
        dist = np.bitwise_count(block[:, None, :] ^ bits[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(dist <= max_distance)
        rows = rows + a
        upper = cols > rows
        parts_i.append(rows[upper])
        parts_j.append(cols[upper])
        parts_d.append(dist[rows[upper] - a, cols[upper]])
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j, d = (np.concatenate(p).astype(np.int64) for p in (parts_i, parts_j, parts_d))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]
