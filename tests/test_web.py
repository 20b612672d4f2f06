"""The web service on the full pipeline's database: the API through an HTTP client, concurrent requests, the
`serve` command under a bounded load, and the page in headless Chromium."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from support.catalogues import copy_database
from support.liveserver import chromium, load_benchmark, serve_command, serving

from image_similarity.entrypoints.cli import main
from image_similarity.entrypoints.service import without
from image_similarity.entrypoints.web import MAX_UPLOAD_BYTES, create_app
from image_similarity.pipeline.rank import rank
from image_similarity.store import SQLiteStore


@pytest.fixture(scope="module")
def web_db(full_db, tmp_path_factory) -> Path:
    """A private copy of the full database (images, features, model, evaluation)."""
    return copy_database(full_db[0], tmp_path_factory.mktemp("web") / "web.sqlite")


@pytest.fixture(scope="module")
def store(web_db):
    with SQLiteStore(web_db) as store:
        yield store


@pytest.fixture(scope="module")
def app(store, featurizer):
    return create_app(store, featurizer)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def server(app):
    """The app served by uvicorn from a thread on a free loopback port; yields its URL."""
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def photos(sample_dir) -> list[Path]:
    """Two real photos per class."""
    return [p for label in ("dotted", "leopard", "striped") for p in sorted((sample_dir / label).iterdir())[5:7]]


@pytest.fixture(scope="module")
def expected(web_db, featurizer, photos) -> dict[str, list[tuple[int, str, str, float]]]:
    """What the engine itself answers for each photo: (id, label, name, score) of the top 10."""
    with SQLiteStore(web_db) as own:
        return {p.name: [(m.image_id, m.label, m.name, m.score)
                         for m in rank(own, p.read_bytes(), featurizer, save=False).matches] for p in photos}


def answer(response: httpx.Response) -> list[tuple[int, str, str, float]]:
    assert response.status_code == 200, response.text
    return [(m["id"], m["label"], m["name"], m["score"]) for m in response.json()["matches"]]


def same(got: list[tuple], want: list[tuple]) -> bool:
    return [g[:3] for g in got] == [w[:3] for w in want] and all(
        abs(g[3] - w[3]) < 1e-5 for g, w in zip(got, want))


def upload(client, data: bytes, name: str = "query.jpg", mime: str = "image/jpeg", **params) -> httpx.Response:
    return client.post("/api/rank", params=params, files={"file": (name, data, mime)})


def test_rank_equals_the_engine(client, photos, expected, full_db):
    for photo in photos:
        response = upload(client, photo.read_bytes(), photo.name)
        got = answer(response)
        assert len(got) == 10 and same(got, expected[photo.name])
        body = response.json()
        assert body["query"] == photo.name and body["method"] == full_db[1]["best_method"]
        assert body["matches"][0]["url"] == f"/api/images/{got[0][0]}"
    assert sum(label == photos[0].parent.name for _, label, _, _ in expected[photos[0].name]) >= 8


def test_top_and_method(client, photos, web_db, featurizer):
    data = photos[2].read_bytes()
    with SQLiteStore(web_db) as own:
        want = [(m.image_id, m.label, m.name, m.score) for m in rank(own, data, featurizer, top=3, method="l2",
                                                                     save=False).matches]
    assert same(answer(upload(client, data, top=3, method="l2")), want)
    assert upload(client, data, method="nearest").status_code == 422
    assert upload(client, data, top=0).status_code == 422


def test_one_snapshot_holds_a_searcher_only_for_each_method_asked(app, client, photos):
    """Each method's searcher is made on its first request and kept; a snapshot less an image starts with none."""
    snapshot = app.state.service.current
    before = set(snapshot.searchers)
    assert len(answer(upload(client, photos[0].read_bytes(), method="learned"))) == 10
    assert set(snapshot.searchers) == before | {"learned"} and snapshot.searchers["learned"].strategy == "exact"
    kept = snapshot.searchers["learned"]
    assert len(answer(upload(client, photos[1].read_bytes(), method="learned"))) == 10
    assert snapshot.searchers["learned"] is kept
    smaller = without(snapshot, int(kept.catalogue.ids[0]))
    assert smaller.searchers == {} and len(smaller.catalogue) == len(snapshot.catalogue) - 1
    assert int(kept.catalogue.ids[0]) not in smaller.searcher("cosine").catalogue.ids


def test_bad_uploads_are_400_with_a_one_line_reason(client, photos):
    jpeg = photos[0].read_bytes()
    for data, mime, reason in [
        (b"hello, not an image", "image/jpeg", "not an image"),
        (jpeg, "text/plain", "not an image: uploaded as text/plain"),
        (b"", "image/jpeg", "empty file"),
        (jpeg[: len(jpeg) // 2], "image/jpeg", "truncated image data"),
    ]:
        response = upload(client, data, mime=mime)
        detail = response.json()["detail"]
        assert response.status_code == 400 and detail.startswith(reason) and "\n" not in detail
    assert client.post("/api/rank").status_code == 422  # no file at all


def test_oversized_uploads_are_413(client, store, featurizer, photos):
    big = b"\xff" * (MAX_UPLOAD_BYTES + 1)
    response = upload(client, big)
    assert response.status_code == 413 and response.json()["detail"].startswith("upload too large")
    chunks = (b"x" * 2 ** 20 for _ in range(12))  # streamed, no Content-Length
    response = client.post("/api/rank", content=chunks, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    with TestClient(create_app(store, featurizer, max_upload_bytes=20_000)) as small:
        small_photo = min(photos, key=lambda p: p.stat().st_size)
        assert small_photo.stat().st_size < 20_000 and upload(small, small_photo.read_bytes()).status_code == 200
        response = upload(small, b"\xff" * 20_001)  # within the multipart allowance, over the file limit
        assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_catalogue_images(client, store):
    rows = store.images()
    png = next(im for im in rows if store.image_bytes(im.id).startswith(b"\x89PNG"))
    for row, mime in [(rows[0], "image/jpeg"), (png, "image/png")]:
        response = client.get(f"/api/images/{row.id}")
        assert response.status_code == 200 and response.headers["content-type"] == mime
        assert response.content == store.image_bytes(row.id)
    missing = max(im.id for im in rows) + 1
    response = client.get(f"/api/images/{missing}")
    assert response.status_code == 404 and response.json()["detail"] == f"no image with id {missing}"
    for bad in ("0", "abc", "1;DROP TABLE images", str(2 ** 70)):
        assert client.get(f"/api/images/{bad}").status_code in (404, 422)
    assert client.get(f"/api/images/{rows[0].id}").status_code == 200


def test_health_and_model(client, full_db):
    summary = full_db[1]
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "version": health["version"], "images": 557, "max_upload_bytes": MAX_UPLOAD_BYTES}
    model = client.get("/api/model").json()
    assert model["version"] == summary["model_version"] and model["backbone"] == "efficientnet_lite0"
    assert model["classes"] == ["dotted", "leopard", "striped"] and model["catalogue_size"] == 557
    assert model["method"] == summary["best_method"] and model["params"]["C"] == summary["C"]
    evaluation = model["evaluation"]
    assert evaluation["test_accuracy"] == summary["test_accuracy"] and evaluation["ranking"] == summary["ranking"]
    assert "plots" not in evaluation


def test_openapi_schema_and_page(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/rank", "/api/images/{image_id}", "/api/health", "/api/model"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/api/rank"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'type="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_concurrent_requests_are_answered_correctly(server, photos, expected):
    jobs = [photos[i % len(photos)] for i in range(24)]
    local = threading.local()

    def ask(photo: Path) -> list[tuple]:
        local.client = getattr(local, "client", None) or httpx.Client(base_url=server, timeout=60)
        got = answer(upload(local.client, photo.read_bytes(), photo.name))
        assert local.client.get(f"/api/images/{got[0][0]}").status_code == 200
        return got

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, jobs))
    assert all(same(got, expected[photo.name]) for got, photo in zip(results, jobs))


def test_serve_command_under_load(web_db, capsys):
    """`image-similarity serve` as a user starts it, then 50 rank requests from 4 threads (a report, not a timing)."""
    with serve_command("--db", str(web_db)) as (url, _):
        bench = load_benchmark()
        report = bench.run_load(url, bench.sample_photos(2), requests=50, threads=4)
        with capsys.disabled():
            print(f"\n  load: {report}")
        assert report.errors == [] and len(report.latencies) == 50


def test_serve_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--db", str(tmp_path / "empty.sqlite")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("image-similarity: error: empty catalogue") and "\n" not in err


def test_page_in_headless_chromium(server, photos, expected, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        driver.get(f"{server}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "model version" in d.find_element(By.ID, "model").text)
        photo = photos[0]
        driver.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#results img')];"
            "return imgs.length === 10 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .label")]
        assert labels == [f"{r}. {m[1]}" for r, m in enumerate(expected[photo.name], 1)]
        assert driver.execute_script("return document.getElementById('query-img').naturalWidth") > 0

        message = driver.find_element(By.ID, "message")
        for name, content, reason in [("notes.txt", b"not an image", "not an image"),
                                      ("huge.jpg", b"\0" * (MAX_UPLOAD_BYTES + 1), "too large")]:
            bad = tmp_path / name
            bad.write_bytes(content)
            driver.find_element(By.ID, "file").send_keys(str(bad))
            wait.until(lambda d, reason=reason: message.get_attribute("class") == "error" and reason in message.text)
            assert name in message.text and not driver.find_elements(By.CSS_SELECTOR, "#results img")
            driver.execute_script("document.getElementById('message').className = ''")
