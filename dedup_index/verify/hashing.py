"""The cheap first check: a DCT perceptual hash, mirror-aware, in numpy.

A 256-bit hash in the manner of pHash and PDQ: the image's luminance resized to 64 x 64
(Pillow, Lanczos), its 2-D DCT-II, the 16 x 16 lowest frequencies, each bit set where the
coefficient exceeds their median.  Mirroring the image horizontally multiplies the DCT
coefficient of every odd horizontal frequency by -1, so the hash of the mirror image comes
from the same coefficients for free: :func:`perceptual_hashes` returns both, and
:func:`hash_distance` of two images is the smaller Hamming distance of (a, b) and
(mirror a, b).  No dependency beyond numpy and Pillow; the same bits on every machine up
to float noise at the median (a coefficient exactly at the median is not set).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Side of the luminance image that is transformed, and of the low-frequency block kept.
HASH_INPUT = 64
HASH_BLOCK = 16
#: Bits of a hash.
HASH_BITS = HASH_BLOCK * HASH_BLOCK


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m * np.sqrt(2.0 / n)


_DCT = _dct_matrix(HASH_INPUT)[:HASH_BLOCK]
#: +1 / -1 per horizontal frequency: the DCT of the mirror image.
_MIRROR = np.where(np.arange(HASH_BLOCK) % 2 == 0, 1.0, -1.0)[None, :]


def _bits(coeffs: np.ndarray) -> np.ndarray:
    flat = coeffs.ravel()
    return np.packbits(flat > np.median(flat))


def perceptual_hashes(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(hash, hash of the mirror image)`` of a PIL image, each ``HASH_BITS / 8`` uint8."""
    gray = image.convert("L").resize((HASH_INPUT, HASH_INPUT), Image.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    coeffs = _DCT @ pixels @ _DCT.T  # (16, 16): rows vertical, columns horizontal frequency
    return _bits(coeffs), _bits(coeffs * _MIRROR)


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Bits that differ between two packed hashes."""
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def hash_distance(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[int, bool]:
    """``(distance, mirrored)``: the Hamming distance of ``a`` and ``b``, or of ``a``'s
    mirror image and ``b`` when that is smaller."""
    direct = hamming(a[0], b[0])
    flipped = hamming(a[1], b[0])
    return (flipped, True) if flipped < direct else (direct, False)


__all__ = ["HASH_BITS", "hamming", "hash_distance", "perceptual_hashes"]
