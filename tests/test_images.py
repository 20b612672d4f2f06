"""Tests for image_similarity.core.images: the bundled photos and the messy inputs found in real catalogues."""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile
from support.images import DATA, PHOTO, encode, png_claiming_size

from image_similarity.core import images
from image_similarity.core.dedup import dhash
from image_similarity.core.images import BadImageError, decode_image, inspect_image


def bad_reason(data: bytes) -> str:
    with pytest.raises(BadImageError) as excinfo:
        decode_image(data)
    return str(excinfo.value)


def test_bundled_photos():
    paths = sorted(DATA.glob("*/*.jpg"))
    formats = Counter()
    for path in paths:
        data = path.read_bytes()
        info, image = inspect_image(data)
        formats[info.format] += 1
        assert image.mode == "RGB"
        assert (info.width, info.height) == image.size
        assert min(image.size) == 224
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.dhash == dhash(image)
        assert len(info.dhash) == 64
    assert len(paths) == 557
    assert formats == {"JPEG": 554, "PNG": 3}


@pytest.mark.parametrize(
    ("name", "mode"), [("leopard/102.jpg", "RGB"), ("striped/1380.jpg", "RGB"), ("leopard/872.jpg", "RGBA")]
)
def test_format_comes_from_bytes_not_extension(name, mode):
    info, _ = inspect_image((DATA / name).read_bytes())
    assert (info.format, info.mode) == ("PNG", mode)


def test_png_saved_as_jpg_in_tmp_dir(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, "PNG")
    info, image = inspect_image(path.read_bytes())
    assert info.format == "PNG"
    assert image.getpixel((4, 4)) == (10, 20, 30)


def test_bundled_transparent_png_becomes_white():
    path = DATA / "leopard" / "872.jpg"
    alpha = np.asarray(Image.open(path))[..., 3]
    pixels = np.asarray(decode_image(path.read_bytes()))
    assert (alpha == 0).mean() > 0.2
    assert (pixels[alpha == 0] == 255).all()


def test_rgba_composited_on_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (8, 0, 16, 16))
    image.putpixel((0, 15), (255, 0, 0, 128))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((12, 2)) == (0, 0, 255)
    assert decoded.getpixel((0, 15)) == (255, 127, 127)


def test_grayscale_with_alpha_composited_on_white():
    image = Image.new("LA", (8, 8), (0, 0))
    image.paste((50, 255), (4, 0, 8, 8))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.getpixel((1, 1)) == (255, 255, 255)
    assert decoded.getpixel((6, 1)) == (50, 50, 50)


def test_palette_transparent_index_becomes_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (8, 0, 16, 16))
    info, decoded = inspect_image(encode(image, "PNG", transparency=0))
    assert info.mode == "P"
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((12, 2)) == (255, 0, 0)


def test_grayscale():
    info, decoded = inspect_image(encode(Image.new("L", (8, 8), 100), "PNG"))
    assert info.mode == "L"
    assert decoded.mode == "RGB"
    assert decoded.getpixel((3, 3)) == (100, 100, 100)


def test_16_bit_is_scaled_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    info, decoded = inspect_image(encode(Image.fromarray(gradient), "PNG"))
    assert info.mode == "I;16"
    row = np.asarray(decoded)[0, :, 0]
    assert (row[0], row[32], row[-1]) == (0, 130, 255)
    assert (np.diff(row.astype(int)) >= 0).all()
    assert len(np.unique(row)) == 64


@pytest.mark.parametrize(
    "values", [np.linspace(1000, 5000, 32).astype(np.int32), np.linspace(-1, 1, 32).astype(np.float32)]
)
def test_32_bit_is_stretched(values):
    decoded = decode_image(encode(Image.fromarray(np.tile(values, (4, 1))), "TIFF"))
    row = np.asarray(decoded)[0, :, 0]
    assert (row[0], row[-1]) == (0, 255)
    assert (np.diff(row.astype(int)) > 0).all()


def test_cmyk_jpeg():
    cmyk = Image.new("RGB", (32, 32), (200, 30, 60)).convert("CMYK")
    info, decoded = inspect_image(encode(cmyk, "JPEG", quality=95))
    assert (info.format, info.mode) == ("JPEG", "CMYK")
    assert decoded.getpixel((16, 16)) == (200, 30, 60)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    info, decoded = inspect_image(data)
    assert (info.format, info.mode, info.width, info.height) == ("GIF", "P", 16, 16)
    assert decoded.getpixel((8, 8)) == (255, 0, 0)


def test_mpo_is_reported_as_jpeg():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    info, decoded = inspect_image(data)
    assert info.format == "JPEG"
    assert decoded.getpixel((8, 8))[2] < 10


def test_exif_orientation_applied():
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    info, decoded = inspect_image(encode(image, "JPEG", exif=exif, quality=95))
    assert (info.width, info.height) == (32, 64) == decoded.size
    red, green, blue = decoded.getpixel((28, 3))  # the red corner is now top-right
    assert red > 240 and green < 10 and blue < 10
    assert decoded.getpixel((3, 3))[2] > 240


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"id,label\n1,dotted\n" * 20, "not an image"),
        (random.Random(0).randbytes(4096), "not an image"),
        (PHOTO.read_bytes()[: PHOTO.stat().st_size // 2], "truncated image data"),
        (png_claiming_size(10_000, 10_000), "too large: 10000x10000 pixels (limit 64000000)"),
    ],
    ids=["empty", "text", "random", "truncated-jpeg", "bomb"],
)
def test_bad_input_reason(data, reason):
    assert bad_reason(data) == reason


def test_corrupt_png_data():
    data = bytearray(encode(Image.open(DATA / "leopard" / "102.jpg"), "PNG"))
    start = data.index(b"IDAT") + 200
    data[start : start + 60] = bytes(60)
    assert bad_reason(bytes(data)) == "corrupt image data: unrecognized data stream contents when reading image file"


def test_decompression_bomb_is_rejected_without_side_effects():
    limit, load_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak either
        assert bad_reason(png_claiming_size(10_000, 10_000)).startswith("too large: 10000x10000")
        # Far beyond Pillow's own hard limit: Pillow refuses to open it at all.
        assert bad_reason(png_claiming_size(50_000, 50_000)).startswith("too large: Image size (2500000000 pixels)")
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (limit, load_truncated)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 224 * 299 - 1)
    assert bad_reason(PHOTO.read_bytes()) == "too large: 224x299 pixels (limit 66975)"
    # A truncated file would fail to decode: rejecting it as too large shows no pixels were decoded.
    assert bad_reason(PHOTO.read_bytes()[:2000]) == "too large: 224x299 pixels (limit 66975)"
    monkeypatch.setattr(images, "MAX_PIXELS", 224 * 299)
    assert decode_image(PHOTO.read_bytes()).size == (224, 299)


def test_file_size_limit(monkeypatch):
    data = PHOTO.read_bytes()
    monkeypatch.setattr(images, "MAX_FILE_BYTES", len(data) - 1)
    assert bad_reason(data) == f"too large: {len(data)} bytes (limit {len(data) - 1})"
    monkeypatch.setattr(images, "MAX_FILE_BYTES", len(data))
    assert decode_image(data).size == (224, 299)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF/EXIF tags
def test_fuzzed_input_raises_only_bad_image_error():
    rng = random.Random(42)
    seeds = [
        PHOTO.read_bytes(),
        (DATA / "leopard" / "872.jpg").read_bytes(),  # RGBA PNG
        encode(Image.new("RGB", (16, 16), (1, 2, 3)), "GIF"),
        encode(Image.new("RGB", (16, 16), (1, 2, 3)), "TIFF"),
        encode(Image.new("RGB", (16, 16), (1, 2, 3)), "WEBP"),
        encode(Image.new("RGB", (16, 16), (1, 2, 3)), "BMP"),
    ]
    outcomes = Counter()
    for seed in seeds:
        for _ in range(60):
            data = bytearray(seed)
            cut = rng.randrange(8, len(data))
            if rng.random() < 0.5:  # a valid header followed by garbage
                data[cut:] = rng.randbytes(rng.randrange(600))
            else:  # a few corrupted bytes
                for _ in range(rng.randint(1, 10)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                assert decode_image(bytes(data)).mode == "RGB"
                outcomes["decoded"] += 1
            except BadImageError as err:
                outcomes[str(err).split(":")[0]] += 1
    reasons = {"not an image", "truncated image data", "corrupt image data", "too large", "empty image"}
    assert set(outcomes) - {"decoded"} <= reasons
    assert len(outcomes) >= 4
