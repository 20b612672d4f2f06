"""Validate untrusted image bytes and decode them into plain 8-bit RGB images."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import BadInput
from .dedup import dhash

MAX_FILE_BYTES: int = 64 * 1024 * 1024
MAX_PIXELS: int = 64_000_000

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class BadImageError(BadInput):
    """The bytes are not a usable image.

    ``str(err)`` is a short human-readable reason starting with one of: "empty file", "not an image",
    "truncated image data", "corrupt image data", "too large", "empty image", "unsupported image mode".
    """


@dataclass(frozen=True)
class ImageInfo:
    """Facts about an image file, as read from its bytes."""

    format: str  # container format detected from the bytes ("JPEG", "PNG", ...), not the file name
    width: int  # after EXIF orientation
    height: int
    mode: str  # PIL mode as stored ("RGB", "P", "CMYK", "I;16", ...)
    sha256: str  # hex digest of the raw bytes
    dhash: str  # dedup.dhash of the decoded RGB image


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode image bytes into a fully loaded 8-bit RGB image.

    With `min_side`, a JPEG is decoded in draft mode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least `min_side` (or the full size when smaller): far less work for a large photo that will be resized
    anyway. Applies the EXIF orientation, keeps the first frame of animations, composites transparency onto
    white and converts palette, grayscale, CMYK and 16-bit/float images to RGB (high bit depths are scaled,
    not clipped).

    Raises
    ------
    BadImageError
        If the data is empty, larger than ``MAX_FILE_BYTES``, not an image, truncated or corrupt, or
        has more than ``MAX_PIXELS`` pixels (checked from the header, before decoding).
    """
    return _to_rgb(_load(data, min_side))


def inspect_image(data: bytes) -> tuple[ImageInfo, Image.Image]:
    """Validate and decode ``data`` once; return its metadata and the RGB image (see `decode_image`)."""
    source = _load(data)
    image = _to_rgb(source)
    info = ImageInfo(
        format="JPEG" if source.format == "MPO" else source.format,  # MPO: a JPEG with extra frames
        width=image.width,
        height=image.height,
        mode=source.mode,
        sha256=hashlib.sha256(data).hexdigest(),
        dhash=dhash(image),
    )
    return info, image


def _load(data: bytes, min_side: int | None = None) -> ImageFile.ImageFile:
    """Open ``data``, enforce the size limits, decode the first frame (a JPEG in draft mode with `min_side`) and
    apply the EXIF orientation."""
    if not data:
        raise BadImageError("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise BadImageError(f"too large: {len(data)} bytes (limit {MAX_FILE_BYTES})")
    with warnings.catch_warnings():
        # MAX_PIXELS, enforced below from the header, is stricter than Pillow's bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise BadImageError("not an image") from exc
        except Exception as exc:
            raise BadImageError(_reason(exc, "not an image")) from exc
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise BadImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS})")
        if width * height == 0:
            raise BadImageError(f"empty image: {width}x{height} pixels")
        try:
            if min_side and image.format in ("JPEG", "MPO"):
                image.draft(image.mode, (min_side, min_side))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as exc:
            raise BadImageError(_reason(exc, "corrupt image data")) from exc
    return image


def _reason(exc: Exception, default: str) -> str:
    """Short reason for a Pillow failure."""
    if isinstance(exc, Image.DecompressionBombError):  # beyond Pillow's own hard limit
        return f"too large: {exc}"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated image data"
    return f"{default}: {exc}"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB, compositing transparency onto white.

    No full-size float64 or extra RGBA copies: decoding needs at most 13 bytes per pixel at its peak (a 32-bit
    float image), about 830 MB at the MAX_PIXELS limit (tests/test_fuzz_images.py measures it)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    try:
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
            white = Image.new("RGB", rgba.size, "white")
            white.paste(rgba, mask=rgba)
            return white
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot convert
        raise BadImageError(f"unsupported image mode: {image.mode}") from exc


_FROM_16_BIT = np.rint(np.arange(65536) / 257).astype(np.uint8)
"""16-bit value -> 8-bit value, scaled by 255/65535 and rounded."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit ("I;16*") image by 255/65535, or stretch a 32-bit ("I", "F") one to 0-255, as "L"."""
    if image.mode.startswith("I;16"):
        return Image.fromarray(_FROM_16_BIT[np.asarray(image).astype(np.uint16)])
    pixels = np.array(image, dtype=np.float32)
    low, high = pixels.min(), pixels.max()
    if not high > low:  # flat, or NaN somewhere
        return Image.new("L", image.size, 0)
    pixels -= low
    pixels *= 255 / (high - low)
    return Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8))
