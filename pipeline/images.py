"""Decode a page image just large enough for the model's panel crops.

Why: real scans are about 2000x3000 pixels while the models crop panels to
64-224 px, and a full decode is most of a page's CPU.  A JPEG is decoded with
libjpeg-turbo's DCT scaling at 1/8, 1/4 or 1/2 (the entropy decoding costs
the same, the inverse DCT and colour conversion shrink with the scale),
through simplejpeg straight into a numpy array that the crops are cut from;
other formats, CMYK JPEGs and JPEGs libjpeg only warns about go through PIL,
decoded in full and reduced once.  Boxes stay in the page's own pixels: a
:class:`~pipeline.pages.Page` carries the scale of its image.

The reduction is planned from the kept boxes alone (pure arithmetic,
:func:`reduction_for`): the strongest one that leaves every panel crop at
least ``side`` pixels on each axis, so no crop is upsampled where a full
decode would have downsampled it.  A model that states no side gets a full
decode, as before.
"""
from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

REDUCTIONS = (8, 4, 2)  # what libjpeg's DCT scaling offers, strongest first
ORIENTATION = 0x0112  # the EXIF tag


class ImageDecodeError(Exception):
    """The bytes are not a decodable image; ``str(err)`` is the reason (the caller adds the path)."""


def least_side(crop_side: int) -> int:
    """The smallest panel side a model resizing crops to ``crop_side`` needs: 7/8 of it.

    A crop may then be upsampled by at most 8/7 on one axis; measured on scan-size pages, outputs stay
    within cosine 0.99 of a full decode's, and 224 px models can decode 4-across pages of 2000 px
    scans at 1/2 (panels of about 430 px) where a strict 224 would decode them in full.
    """
    return max(1, (int(crop_side) * 7) // 8)


def reduction_for(boxes: np.ndarray, page_size: tuple[float, float], side: int | None) -> int:
    """The largest of 8, 4, 2 (else 1) that keeps every box at least ``side`` px a side once reduced.

    ``boxes`` are ``[n, 4]`` x, y, w, h in page pixels; with no boxes the whole page is the crop
    (a page without panels is embedded whole).  ``side`` None: the model needs full resolution.
    """
    if not side:
        return 1
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    smallest = float(boxes[:, 2:].min()) if boxes.shape[0] else float(min(page_size))
    return next((r for r in REDUCTIONS if smallest / r >= side), 1)


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Read the header only (cheap: a decompression bomb costs nothing); ``ImageDecodeError`` if unreadable."""
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ImageDecodeError("exceeds the decompression-bomb limit") from None
    except Exception as exc:  # PIL raises many kinds for data it cannot identify
        kind = "not an image" if "cannot identify" in str(exc) else "corrupt or truncated image"
        raise ImageDecodeError(f"{kind}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"image is {w}x{h} pixels, over the {max_pixels} pixel limit")
    return img


#: EXIF orientation -> the transpose that makes the image upright (5-8 swap width and height)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def orientation_for(img: Image.Image, page_size: tuple[float, float] | None) -> int:
    """The EXIF orientation to apply (1: none), judged against the manifest's ``page_size``.

    Only a quarter turn can be told from the sizes: it is applied when ``page_size`` matches the
    turned image and not the stored one (the detector saw the page upright).  Otherwise boxes are
    taken in the stored frame, as a detector that ignores EXIF wrote them.
    """
    value = img.getexif().get(ORIENTATION, 1)
    if value not in (5, 6, 7, 8) or page_size is None:
        return 1
    w, h = img.size
    def near(a, b):
        return abs(a - b) <= 1
    upright = near(h, page_size[0]) and near(w, page_size[1])
    stored = near(w, page_size[0]) and near(h, page_size[1])
    return value if upright and not stored else 1


def upright_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class Decoded(NamedTuple):
    """A decoded page: RGB ``image``, its ``scale`` (image pixels per page pixel) and, when the decoder
    made them first, the same ``pixels`` as uint8 ``[H, W, 3]`` (crops are cut from them, no copy)."""

    image: Image.Image
    scale: float
    pixels: np.ndarray | None = None


def decode(img: Image.Image, reduction: int, orientation: int = 1, raw: bytes | None = None) -> Decoded:
    """Decode at ``1/reduction`` of the full size: RGB, alpha composited on white.

    The scale is exactly ``1/r`` for the ``r`` actually used.  Given the file's ``raw`` bytes, an RGB or
    greyscale JPEG is decoded by libjpeg-turbo through simplejpeg: the same pixels as PIL's
    ``draft`` (measured equal), about 10% less CPU at 1/4 and 1/8, and no copy out of PIL for the
    crops.  Anything else, or a JPEG libjpeg-turbo only warns about, is decoded by PIL as before, so a
    damaged file fails with PIL's reason; a JPEG PIL cannot DCT-scale is decoded in full and reduced once.
    """
    turbo = raw is not None and img.format == "JPEG" and img.mode in ("RGB", "L")
    pixels = _turbo(raw, img.size, reduction) if turbo else None
    if pixels is not None:
        img, used = Image.fromarray(pixels), round(img.size[0] / pixels.shape[1])
    else:
        img, used = _pil_decode(img, reduction)
    if orientation in _UPRIGHT:  # the array is of the stored frame: a turned page is cropped from the image
        return Decoded(img.transpose(_UPRIGHT[orientation]), 1.0 / used)
    return Decoded(img, 1.0 / used, pixels)


def _pil_decode(img: Image.Image, reduction: int) -> tuple[Image.Image, int]:
    """PIL's decode at ``1/reduction``, RGB: DCT-scaled where PIL can (JPEG), else reduced once after."""
    full = img.size
    used = 1
    if reduction > 1 and img.format == "JPEG":
        mode = "RGB" if img.mode in ("RGB", "YCbCr") else img.mode  # CMYK and L stay what they are
        got = img.draft(mode, (max(1, full[0] // reduction), max(1, full[1] // reduction)))
        if got is not None:
            used = round(full[0] / got[1][2])  # draft's box is (0, 0, W / scale, H / scale)
    try:
        img.load()
    except Exception as exc:  # PIL raises many kinds for corrupt data
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    img = _rgb(img)
    if used < reduction:
        factor = reduction // used
        img = img.reduce(factor)
        used *= factor
    return img, used


def _turbo(raw: bytes, size: tuple[int, int], reduction: int) -> np.ndarray | None:
    """libjpeg-turbo's decode at ``1/reduction`` (ceil of each side, as PIL's draft), or None where it
    raises: it is strict, so a recoverable warning ("extraneous bytes") lets PIL decide, as before."""
    import simplejpeg

    w, h = size
    try:
        return simplejpeg.decode_jpeg(raw, "RGB", min_height=-(-h // reduction), min_width=-(-w // reduction))
    except ValueError:
        return None


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(image_size: tuple[int, int], box) -> tuple[float, float, float, float]:
    """``x, y, w, h`` (image pixels) as a PIL box clipped to the image, at least 1 px of source."""
    width, height = image_size
    x, y, w, h = (float(v) for v in box)
    x0 = min(max(x, 0.0), max(width - 1.0, 0.0))
    y0 = min(max(y, 0.0), max(height - 1.0, 0.0))
    x1 = min(max(x + w, x0 + 1.0), float(max(width, 1)))
    y1 = min(max(y + h, y0 + 1.0), float(max(height, 1)))
    return x0, y0, max(x1, x0 + 1e-3), max(y1, y0 + 1e-3)


def crop_panels(pixels: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """Every box cropped from ``pixels`` (uint8 ``[H, W, 3]``, :meth:`Page.rgb <pipeline.pages.Page.rgb>`)
    and resized to ``side``² (antialiased bilinear), as one uint8 ``[n, side, side, 3]``.

    Each crop is a view of the page resized by torch's uint8 SIMD kernel (measured 2.4x faster than
    PIL's ``resize(box=...)`` at 224 px, same filter).  Box edges are rounded to whole pixels.
    """
    import torch
    from torch.nn.functional import interpolate

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty((boxes.shape[0], side, side, 3), dtype=np.uint8)
    if not boxes.shape[0]:
        return out
    size = (pixels.shape[1], pixels.shape[0])
    pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    target = torch.from_numpy(out)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = pixel_box(size, box)
        region = pixels[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)
        resized = interpolate(region, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        target[i].copy_(resized[0].permute(1, 2, 0))
    return out


def pixel_box(image_size: tuple[int, int], box) -> tuple[int, int, int, int]:
    """:func:`crop_box` rounded to whole pixels, at least one pixel a side."""
    x0, y0, x1, y1 = crop_box(image_size, box)
    width, height = image_size
    ix0, iy0 = min(int(round(x0)), width - 1), min(int(round(y0)), height - 1)
    return ix0, iy0, max(ix0 + 1, min(int(round(x1)), width)), max(iy0 + 1, min(int(round(y1)), height))


def scaled(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Boxes from page pixels to image pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return boxes if scale == 1.0 else boxes * np.float32(scale)


__all__ = ["least_side", "reduction_for", "open_image", "orientation_for", "upright_size", "decode", "Decoded", "crop_panels", "crop_box", "pixel_box",
           "scaled", "ImageDecodeError", "REDUCTIONS"]
