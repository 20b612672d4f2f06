"""Image files made for the tests: the bundled photos and encoders for good and bad files."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "Resources" / "fashion-texture"
PHOTO = DATA / "dotted" / "1004.jpg"  # 224x299 JPEG


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)
