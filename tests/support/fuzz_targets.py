"""Coverage-guided fuzz targets (atheris, libFuzzer), run as their own process by the fuzz tests:

    python tests/support/fuzz_targets.py decode [libFuzzer options] CORPUS...
    python tests/support/fuzz_targets.py upload DB [libFuzzer options] CORPUS...

`decode`: image_similarity.core.images.inspect_image on the input bytes (Pillow's and our code instrumented).
`upload`: POST /api/rank of the service on the catalogue in DB; the input's first byte picks the ranking method
and the declared content type, the second the `top` parameter, the rest is the uploaded file.
Any exception but a documented one-line refusal, any answer but the documented ones, is a crash that libFuzzer
records as a file; -timeout and -rss_limit_mb make a hang or a memory blow-up one too.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the support package

with atheris.instrument_imports(include=["PIL", "image_similarity"]):
    from image_similarity.core.images import inspect_image
    from support.fuzzing import check_reason, decode_or_refuse

METHODS = (None, "l2", "cosine", "scores", "learned")
TYPES = ("image/jpeg", "image/png", "application/octet-stream", "text/plain", "")


GROWTH_MB = 1024
"""How far one input may raise this process's resident memory: the decoder needs at most 13 bytes per pixel,
about 830 MB at its pixel limit."""


def memory_mb(field: str) -> int:
    """A memory figure of this process from /proc: VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) // 1024


@contextmanager
def bounded_memory(data: bytes) -> Iterator[None]:
    """Fail when the body raises the peak resident memory by GROWTH_MB or more (a decompression bomb got by)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak starts again from here
    before = memory_mb("VmRSS:")
    yield
    grown = memory_mb("VmHWM:") - before
    assert grown < GROWTH_MB, f"memory blow-up: {grown} MB for an input of {len(data)} bytes"


def fuzz_decode(data: bytes) -> None:
    with bounded_memory(data):
        decoded = decode_or_refuse(inspect_image, data)
    if decoded is not None:
        info, image = decoded
        assert image.mode == "RGB" and image.size == (info.width, info.height) and min(image.size) > 0


def upload_target(db: str):
    """The `upload` target on a service over the catalogue in `db`."""
    from fastapi.testclient import TestClient

    from image_similarity.entrypoints.web import create_app
    from image_similarity.pipeline.featurize import Featurizer
    from image_similarity.store import SQLiteStore

    client = TestClient(create_app(SQLiteStore(db), Featurizer(device="cpu")))
    size = client.get("/api/health").json()["images"]

    def fuzz_upload(data: bytes) -> None:
        if len(data) < 2:
            return
        method, declared, top = METHODS[data[0] % 5], TYPES[data[0] // 5 % 5], data[1]
        params = {"top": top} | ({"method": method} if method else {})
        with bounded_memory(data):
            reply = client.post("/api/rank", params=params, files={"file": ("query.jpg", data[2:], declared)})
        body = reply.json()
        if reply.status_code == 200:
            ranks = [m["rank"] for m in body["matches"]]
            assert body["query"] == "query.jpg" and method in (None, body["method"]), body
            assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= min(top, size), body
        elif reply.status_code == 400:
            detail = body["detail"]
            if declared.startswith("image/") or declared in ("application/octet-stream", ""):
                check_reason(detail)
            else:
                assert detail == f"not an image: uploaded as {declared}", detail
        else:
            assert reply.status_code == 422 and not 1 <= top <= 100, (reply.status_code, body)

    return fuzz_upload


def main() -> None:
    warnings.simplefilter("ignore")  # Pillow's notes on odd files are not failures (and slow the fuzzer down)
    target = sys.argv.pop(1)
    test = fuzz_decode if target == "decode" else upload_target(sys.argv.pop(1))
    atheris.Setup(sys.argv, test)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
