"""Fuzzing the upload endpoint (POST /api/rank) on the stored bundled catalogue (557 photos, a trained model):
property-based (hypothesis) and coverage-guided (atheris) inputs from the real photos and the bad files tests
make, with random names, declared types, `top` and `method`; then schemathesis against /openapi.json of a running
`image-similarity serve`. Every answer is a documented one: 200 with a ranking, 400 with a one-line reason, 413,
or 422 for a parameter out of range; never a 5xx, and every response matches the schema."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.catalogues import copy_database
from support.fuzzing import EXAMPLES, HANG_SECONDS, check_reason, run_atheris
from support.strategies import damaged

from image_similarity.entrypoints.web import create_app
from image_similarity.search.methods import METHODS
from image_similarity.store import SQLiteStore

TYPES = ["image/jpeg", "image/png", "image/webp", "application/octet-stream", "text/plain", "application/json", ""]


@pytest.fixture(scope="module")
def catalogue(full_db, tmp_path_factory) -> Path:
    """A private copy of the full database: 557 real photos, their features, a trained and evaluated model."""
    return copy_database(full_db[0], tmp_path_factory.mktemp("fuzz-web") / "catalogue.sqlite")


@pytest.fixture(scope="module")
def client(catalogue, featurizer):
    with SQLiteStore(catalogue) as store, TestClient(create_app(store, featurizer)) as client:
        yield client


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged TIFF/EXIF tags
@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=HANG_SECONDS),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.one_of(damaged(), st.binary(max_size=2048)), name=st.text(max_size=40),
       declared=st.sampled_from(TYPES), top=st.integers(-2, 120), method=st.sampled_from([None, *METHODS, "x"]))
def test_upload_answers_are_documented(client, data, name, declared, top, method):
    params = {"top": top} | ({"method": method} if method else {})
    reply = client.post("/api/rank", params=params, files={"file": (name, data, declared)})
    body = reply.json()
    if not 1 <= top <= 100 or method == "x":
        assert reply.status_code == 422, body
    elif not name:  # a part without a file name is a form field, not a file: no file was sent
        assert reply.status_code == 422 and body["detail"][0]["loc"] == ["body", "file"], body
    elif reply.status_code == 200:
        ranks = [m["rank"] for m in body["matches"]]
        assert method in (None, body["method"]) and body["model_version"] == 1, body
        assert ranks == list(range(1, len(ranks) + 1)) and 0 < len(ranks) <= top, body
    else:
        assert reply.status_code == 400, body
        if declared.startswith("image/") or declared in ("application/octet-stream", ""):
            check_reason(body["detail"])
        else:
            assert body["detail"] == f"not an image: uploaded as {declared}", body


def test_coverage_guided_upload(tmp_path, catalogue, capsys):
    stats = run_atheris(tmp_path, ["upload", str(catalogue)], rss_limit_mb=4096, prefix=b"\x00\x0a")
    with capsys.disabled():
        print(f"\n  atheris upload: {stats['number_of_executed_units']} inputs, 0 crashes,"
              f" {stats['new_units_added']} new coverage inputs, peak RSS {stats['peak_rss_mb']} MB")


@pytest.fixture
def served(catalogue, tmp_path):
    """`image-similarity serve` on the catalogue, on a free loopback port: its URL."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "image_similarity.entrypoints.cli", "serve", "--db", str(catalogue),
                             "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_schemathesis_against_serve(served, tmp_path, capsys):
    """Every check schemathesis has but `positive_data_acceptance`: the schema cannot say that the uploaded
    bytes must be an image, so schema-valid bytes that are not one are rightly refused with 400."""
    done = subprocess.run(
        [shutil.which("schemathesis", path=Path(sys.executable).parent) or "schemathesis", "run",
         f"{served}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", str(EXAMPLES), "--workers", "1"],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("Test cases:"):].splitlines()[1].strip()
    assert summary.endswith(" passed") and summary.split()[0] == summary.split()[2], summary
    with capsys.disabled():
        print(f"\n  schemathesis: {summary}")
