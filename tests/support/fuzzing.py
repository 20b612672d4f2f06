"""What the fuzz tests share: the seed inputs (real bundled photos and the bad files tests/test_images.py makes),
the documented one-line reasons an input may be refused with, and the time each fuzzer may take.

IMAGE_SIMILARITY_FUZZ_SECONDS (default 20) bounds each coverage-guided (atheris) run, and
IMAGE_SIMILARITY_FUZZ_EXAMPLES (default 150) the inputs of each property-based (hypothesis, schemathesis) test:
raise them for a longer local run. IMAGE_SIMILARITY_FUZZ_SEED (default 1) seeds the coverage-guided runs, so that
CI replays the same inputs as a local run of the same length; change it locally to explore further.
"""
from __future__ import annotations

import base64
import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from image_similarity.core.images import BadImageError

from .images import DATA, PHOTO, encode, png_claiming_size

SECONDS = int(os.environ.get("IMAGE_SIMILARITY_FUZZ_SECONDS", "20"))
EXAMPLES = int(os.environ.get("IMAGE_SIMILARITY_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("IMAGE_SIMILARITY_FUZZ_SEED", "1"))
HANG_SECONDS = 60
"""An input that takes longer than this is a hang (a generous bound: the machine may be busy)."""

REASONS = ("empty file", "not an image", "truncated image data", "corrupt image data", "too large", "empty image",
           "unsupported image mode")
"""The reasons BadImageError documents (its message starts with one of them)."""


def check_reason(message: str) -> None:
    """Fail unless `message` is one of the documented one-line reasons."""
    assert "\n" not in message and "\r" not in message, repr(message)
    assert message.startswith(REASONS), repr(message)


def decode_or_refuse(decode, data: bytes):
    """`decode(data)`, or None when it refused the data with a documented reason; anything else propagates."""
    try:
        return decode(data)
    except BadImageError as err:
        check_reason(str(err))
        return None


def seeds() -> dict[str, bytes]:
    """Real photos (JPEG, PNG with alpha) and the files tests/test_images.py makes, good and bad."""
    rgb = Image.new("RGB", (16, 16), (1, 2, 3))
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "photo.jpg": PHOTO.read_bytes(),
        "rgba.png": (DATA / "leopard" / "872.jpg").read_bytes(),
        "rgb.png": (DATA / "leopard" / "102.jpg").read_bytes(),
        "small.gif": encode(rgb, "GIF"),
        "small.tiff": encode(rgb, "TIFF"),
        "small.webp": encode(rgb, "WEBP"),
        "small.bmp": encode(rgb, "BMP"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "16bit.png": encode(Image.fromarray(gradient), "PNG"),
        "float.tiff": encode(Image.fromarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)), "TIFF"),
        "palette.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        "mpo.jpg": encode(frames[0], "MPO", save_all=True, append_images=frames[1:]),
        "rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "truncated.jpg": PHOTO.read_bytes()[: PHOTO.stat().st_size // 2],
        "bomb.png": png_claiming_size(10_000, 10_000),
        "text.csv": b"id,label\n1,dotted\n" * 20,
        "random.bin": random.Random(0).randbytes(4096),
        "empty": b"",
    }


def write_seeds(folder: Path, prefix: bytes = b"") -> Path:
    """The seeds as files in `folder`, each after `prefix` (a corpus for a coverage-guided fuzzer)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (folder / name).write_bytes(prefix + data)
    return folder


def libfuzzer_stats(output: str) -> dict[str, int]:
    """The final statistics a libFuzzer run prints with -print_final_stats=1."""
    return {name: int(value) for name, value in re.findall(r"^stat::(\w+):\s+(\d+)", output, re.M)}


def run_atheris(tmp_path: Path, target: list[str], rss_limit_mb: int, prefix: bytes = b"") -> dict[str, int]:
    """Run a target of tests/support/fuzz_targets.py for SECONDS from the seeds (each after `prefix`); fail on any
    crash, hang or memory blow-up, with the fuzzer's report; return its final statistics."""
    from . import needs

    needs.require("atheris (pip install atheris: a wheel for Linux on x86-64)",
                  None if importlib.util.find_spec("atheris") else "not installed")
    corpus, crashes = tmp_path / "corpus", tmp_path / "crashes"
    corpus.mkdir()
    crashes.mkdir()
    # libFuzzer's RSS limit reads getrusage's peak RSS, which Linux carries across exec from the forking process's
    # memory: started from a large pytest process, the fuzzer would begin at that size. A small python in between
    # forks it instead.
    command = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
               sys.executable, str(Path(__file__).with_name("fuzz_targets.py")), *target,
               f"-max_total_time={SECONDS}", f"-seed={SEED}", f"-timeout={HANG_SECONDS}", f"-rss_limit_mb={rss_limit_mb}",
               "-print_final_stats=1", f"-artifact_prefix={crashes}/", str(corpus),
               str(write_seeds(tmp_path / "seeds", prefix))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 600, check=False)
    found = sorted(crashes.iterdir())
    first = base64.b64encode(found[0].read_bytes()[:65536]).decode() if found else ""
    assert done.returncode == 0 and not found, \
        f"{[p.name for p in found]}\n{done.stderr[-6000:]}\nfirst input, base64 (up to 64 KB): {first}"
    return libfuzzer_stats(done.stderr)
