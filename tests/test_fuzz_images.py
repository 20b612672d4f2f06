"""Fuzzing the image decoder (images.inspect_image, which ingest, featurize and the service use): property-based
tests (hypothesis) on arbitrary bytes, on real files with random damage, and on every kind of image Pillow can
write; and a coverage-guided run (atheris) started from the real photos and the bad files tests make. Only the
documented one-line refusals may come out, and no input may hang or blow up memory."""
from __future__ import annotations

import io
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.fuzzing import EXAMPLES, HANG_SECONDS, decode_or_refuse, run_atheris
from support.strategies import damaged

from image_similarity.core.images import inspect_image

FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=HANG_SECONDS),
                suppress_health_check=[HealthCheck.too_slow])


def check(data: bytes) -> None:
    decoded = decode_or_refuse(inspect_image, data)
    if decoded is not None:
        info, image = decoded
        assert image.mode == "RGB" and image.size == (info.width, info.height) and min(image.size) > 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged TIFF/EXIF tags
@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes(data):
    check(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ
@given(damaged())
def test_damaged_files(data):
    check(data)


LOSSLESS = {"PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], "TIFF": ["1", "L", "RGB", "RGBA", "CMYK",
            "I;16", "I", "F"], "BMP": ["1", "L", "P", "RGB"], "GIF": ["L", "P"], "WEBP": ["RGB", "RGBA"]}


@st.composite
def written(draw) -> tuple[Image.Image, str, bytes]:
    """Random pixels in every mode each format can hold, written by Pillow: (image, format, bytes)."""
    fmt = draw(st.sampled_from(sorted(LOSSLESS) + ["JPEG"]))
    mode = draw(st.sampled_from(LOSSLESS.get(fmt, ["L", "RGB", "CMYK"])))
    size = draw(st.tuples(st.integers(1, 40), st.integers(1, 40)))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    image = Image.new(mode, size)
    rng = np.random.default_rng(seed)
    if mode in ("I", "F", "I;16"):
        top = {"I": 2 ** 31 - 1, "F": 1e6, "I;16": 65535}[mode]
        pixels = rng.uniform(-top if mode != "I;16" else 0, top, size[::-1])
        image = Image.fromarray(pixels.astype({"I": np.int32, "F": np.float32, "I;16": np.uint16}[mode]))
    else:
        image.frombytes(rng.integers(0, 256, len(image.tobytes()), dtype=np.uint8).tobytes())
    params = {"lossless": True} if fmt == "WEBP" else {}
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return image, fmt, buffer.getvalue()


@FUZZ
@given(written())
def test_every_image_pillow_writes_decodes(case):
    image, fmt, data = case
    info, decoded = inspect_image(data)
    assert decoded.mode == "RGB" and decoded.size == image.size == (info.width, info.height)
    if fmt == "PNG" and image.mode == "RGB" or fmt in ("BMP", "TIFF") and image.mode in ("RGB", "L"):
        assert decoded.tobytes() == image.convert("RGB").tobytes()


def test_coverage_guided(tmp_path, capsys):
    stats = run_atheris(tmp_path, ["decode"], rss_limit_mb=2048)
    with capsys.disabled():
        print(f"\n  atheris decode: {stats['number_of_executed_units']} inputs, 0 crashes,"
              f" {stats['new_units_added']} new coverage inputs, peak RSS {stats['peak_rss_mb']} MB")


MEASURE = """
import re, sys
from image_similarity.core.images import decode_image
def peak_kb():  # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
data = open(sys.argv[1], "rb").read()
before = peak_kb()
image = decode_image(data)
print(image.width * image.height, peak_kb() - before)
"""


@pytest.mark.parametrize(("mode", "fmt", "params"), [
    ("RGB", "JPEG", {}), ("RGBA", "PNG", {}), ("I;16", "PNG", {}), ("P", "PNG", {"transparency": 0}),
    ("F", "TIFF", {"compression": "tiff_deflate"}), ("CMYK", "TIFF", {"compression": "tiff_deflate"}),
])
def test_memory_per_pixel_is_bounded(tmp_path, mode, fmt, params):
    """A small file can hold a huge image (here 16 million pixels in at most a few hundred KB): decoding it in a
    fresh process may grow its peak memory by at most 13 bytes per pixel (the worst, a 32-bit float image: its
    own 4 bytes, a float32 working copy, 8-bit gray and RGB), so an image at the MAX_PIXELS limit (64 million
    pixels) costs at most about 830 MB (before issue 18: up to 22 bytes per pixel, 1.4 GB)."""
    path = tmp_path / f"big.{fmt.lower()}"
    Image.new(mode, (4000, 4000)).save(path, fmt, **params)
    assert path.stat().st_size < 600_000
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=300,
                          check=True)
    pixels, grown_kb = map(int, done.stdout.split())
    assert pixels == 16_000_000 and grown_kb * 1024 / pixels <= 13, grown_kb
