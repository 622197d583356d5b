"""The harder labelled set of ``bench/quality.py --set hard``: copy detection, not look-alikes.

Built like :mod:`_quality_set` (the same tiles of the same ``skimage.data`` photos, the
same labels: a tile and its variants are one group, other tiles of the same photo are the
hard negatives) but with the edits that copies go through on the web and that global
embeddings and perceptual hashes miss: a mirror image, a 30% crop, rotations of 12 and 90
degrees, a strong blur, JPEG at quality 10, a colour shift, a caption banner over the
image, the image framed like a screenshot, and an aspect change.
"""

from __future__ import annotations

from collections.abc import Callable

from _quality_set import _crop, _jpeg
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    return img.rotate(degrees, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))


def _colour_shift(img: Image.Image) -> Image.Image:
    """Warm tint: red x1.25, blue x0.75, a +15 lift, like a filter app."""
    r, g, b = img.split()
    r = r.point(lambda v: min(255, round(v * 1.25) + 15))
    g = g.point(lambda v: min(255, v + 15))
    b = b.point(lambda v: min(255, round(v * 0.75) + 15))
    return Image.merge("RGB", (r, g, b))


def _caption(img: Image.Image) -> Image.Image:
    """An opaque black banner over the lower fifth with white meme-style text."""
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    top = round(h * 0.8)
    draw.rectangle((0, top, w, h), fill=(0, 0, 0))
    font = ImageFont.load_default(size=max(10, (h - top) // 2))
    draw.text((w * 0.05, top + (h - top) * 0.2), "WHEN THE CODE WORKS", font=font, fill="white")
    return out


def _screenshot(img: Image.Image) -> Image.Image:
    """Shrunk to 80%, placed on a light-grey window with a title bar and a status bar."""
    small = img.resize((round(img.width * 0.8), round(img.height * 0.8)), Image.LANCZOS)
    w, h = small.width + 40, small.height + 70
    canvas = Image.new("RGB", (w, h), (236, 236, 236))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, w, 28), fill=(52, 58, 64))
    for k, colour in enumerate(((255, 95, 86), (255, 189, 46), (39, 201, 63))):
        draw.ellipse((8 + 16 * k, 9, 18 + 16 * k, 19), fill=colour)
    draw.text((70, 8), "IMG_2024.jpg - Viewer", fill="white")
    canvas.paste(small, (20, 36))
    draw.text((20, h - 24), f"{img.width} x {img.height}  100%", fill=(90, 90, 90))
    return canvas


def _aspect(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.resize((round(w * 1.4), round(h * 0.8)), Image.LANCZOS)


#: Harder edits, in report order: ``name -> (description, function)``.
HARD_TRANSFORMS: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "hflip": ("horizontal mirror image", ImageOps.mirror),
    "crop30": ("30% crop: keep 70% x 70%, off-centre", lambda im: _crop(im, 0.2, 0.1, 0.9, 0.8)),
    "rotate12": ("rotate 12 degrees, canvas expanded, white corners", lambda im: _rotate(im, 12)),
    "rotate90": ("rotate 90 degrees", lambda im: im.transpose(Image.ROTATE_90)),
    "blur": ("Gaussian blur, radius 3 px", lambda im: im.filter(ImageFilter.GaussianBlur(3))),
    "jpeg10": ("JPEG recompression at quality 10", lambda im: _jpeg(im, 10)),
    "colour": ("colour shift: red x1.25, blue x0.75, +15 lift", _colour_shift),
    "caption": ("opaque caption banner over the lower fifth", _caption),
    "screenshot": ("shrunk 80% inside a window frame with title and status bars", _screenshot),
    "aspect": ("aspect change: width x1.4, height x0.8", _aspect),
}
