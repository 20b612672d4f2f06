"""The web service while the catalogue changes: catalogue writes with the operator's key, a new model and new
features picked up without a restart, and a load run while `featurize` and `train` write the same SQLite file
or PostgreSQL database (0 errors, 0 answers that differ from what their model version gives a photo alone).

The PostgreSQL test needs PostgreSQL 15 with PL/Python and pgvector (`.ci/run` installs them); without them it
is skipped with the reason, except in CI, where it fails.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from support import pgserver
from support.catalogues import whole_job
from support.liveserver import load_benchmark, serve_command, serving

from image_similarity.entrypoints import cli
from image_similarity.entrypoints.web import API_KEY_ENV, create_app
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest, ingest_one
from image_similarity.pipeline.rank import rank, rank_with
from image_similarity.pipeline.train import load_model, train
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.searchers import searcher
from image_similarity.store import SQLiteStore, connect

KEY = "k3y-for-tests-only-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def small_db(small_dir, featurizer, tmp_path_factory) -> Path:
    """The whole job on 36 real photos (12 per class). Do not modify it: copy it (`db`)."""
    path = tmp_path_factory.mktemp("small-web") / "small.sqlite"
    whole_job(path, small_dir, featurizer)
    return path


@pytest.fixture
def db(small_db, tmp_path) -> Path:
    """A private copy of the small database."""
    shutil.copy(small_db, tmp_path / "web.sqlite")
    return tmp_path / "web.sqlite"


@pytest.fixture(scope="module")
def new_photos(sample_dir) -> list[Path]:
    """Real photos that are not in the small database, one per class."""
    return [sorted((sample_dir / label).iterdir())[20] for label in ("dotted", "leopard", "striped")]


def ranked_ids(client, photo: Path, **params) -> list[int]:
    response = client.post("/api/rank", params={"top": 100, **params},
                           files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["matches"]]


def add(client, photo: Path, label: str, headers: dict | None = AUTH) -> httpx.Response:
    return client.post("/api/images", data={"label": label}, headers=headers,
                       files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})


def wait_for(condition, timeout: float = 120) -> None:
    """Poll until `condition()` is true (a deadline, not a timing: fails only if it never happens)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the service never got there"
        time.sleep(0.1)


def test_store_reads_one_snapshot_and_removes_whole_images(db):
    """What the service relies on: `reading()` sees one snapshot while another connection commits, the stamp
    moves with every change a ranking sees, and remove_image takes the features, split row and rankings along."""
    with SQLiteStore(db) as store, SQLiteStore(db) as writer:
        backbone = "efficientnet_lite0"
        stamp = store.catalogue_stamp(backbone)
        model = writer.model()
        with store.reading():
            assert store.catalogue_stamp(backbone) == stamp
            writer.put_model(replace(model, version=None))
            assert store.catalogue_stamp(backbone) == stamp and store.model().version == model.version
        moved = store.catalogue_stamp(backbone)
        assert moved[0] == stamp[0] + 1 and moved[1:] == stamp[1:]
        victim = store.images()[-1].id
        writer.put_ranking({"name": "q", "sha256": "0" * 64, "method": "l2", "backbone": backbone}, [(1, victim, 0.5)])
        assert writer.remove_image(victim) and not writer.remove_image(victim)
        assert store.catalogue_stamp(backbone)[2] == stamp[2] - 1
        assert victim not in store.features(backbone)[0] and victim not in store.split()
        assert store.conn.execute("SELECT count(*) FROM rankings WHERE image_id = ?", (victim,)).fetchone() == (0,)


def test_writes_need_the_operators_key(db, featurizer, new_photos, caplog):
    with SQLiteStore(db) as store:
        before = len(store.images())
        with TestClient(create_app(store, featurizer, featurize_added=False)) as closed:
            for response, status in ((add(closed, new_photos[0], "dotted", None), 401),
                                     (add(closed, new_photos[0], "dotted"), 403),
                                     (closed.delete("/api/images/1", headers=AUTH), 403)):
                detail = response.json()["detail"]
                assert response.status_code == status and detail.startswith("catalogue writes are off")
                assert "\n" not in detail
        caplog.set_level(logging.DEBUG)
        with TestClient(create_app(store, featurizer, api_key=KEY, featurize_added=False)) as client:
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": KEY}):
                response = add(client, new_photos[0], "dotted", headers)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert client.delete(f"/api/images/1?api_key={KEY}").status_code == 401  # never in a URL
            assert len(store.images()) == before and ranked_ids(client, new_photos[1])  # reads stay open
            assert add(client, new_photos[0], "dotted").status_code == 201
        assert len(store.images()) == before + 1
        with TestClient(create_app(store, featurizer, api_key=KEY, protect_reads=True)) as guarded:
            photo = {"file": (new_photos[1].name, new_photos[1].read_bytes(), "image/jpeg")}
            assert guarded.post("/api/rank", files=photo).status_code == 401
            assert guarded.get("/api/model").status_code == 401 and guarded.get("/api/images/1").status_code == 401
            assert guarded.post("/api/rank", files=photo, headers=AUTH).status_code == 200
            assert guarded.get("/api/health").status_code == 200
    assert not [r for r in caplog.records if r.name != "httpx" and KEY in r.getMessage()]  # httpx: this client


def test_openapi_documents_the_writes(db, featurizer):
    with SQLiteStore(db) as store, TestClient(create_app(store, featurizer, api_key=KEY)) as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert "post" in paths["/api/images"] and "delete" in paths["/api/images/{image_id}"]
    assert "/api/catalogue" in paths
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for method, path in (("post", "/api/images"), ("delete", "/api/images/{image_id}")):
        assert paths[path][method]["security"] == [{"HTTPBearer": []}]
        assert {"401", "403"} <= set(paths[path][method]["responses"])
    form = paths["/api/images"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    # only the file is required: label, key and metadata are optional
    assert set(schema["components"]["schemas"][form.rsplit("/", 1)[1]]["required"]) == {"file"}


def test_add_featurize_rank_and_remove(db, featurizer, new_photos, sample_dir):
    """An added image is featurized in the background and ranked; a removed one never comes back."""
    query = sorted((sample_dir / "leopard").iterdir())[30]
    with SQLiteStore(db) as store, TestClient(create_app(store, featurizer, api_key=KEY,
                                                         reload_interval=0.1)) as client:
        response = add(client, new_photos[0], "dotted")
        assert response.status_code == 201
        added = response.json()
        assert added["name"] == f"dotted/{new_photos[0].name}" and added["featurized_in_background"]
        wait_for(lambda: client.get("/api/catalogue").json()["served"] == 37)
        status = client.get("/api/catalogue").json()
        assert status["images"] == status["featurized"] == 37 and status["waiting"] == 0
        assert added["id"] in ranked_ids(client, query)
        assert client.get(added["url"]).content == new_photos[0].read_bytes()
        again = add(client, new_photos[0], "dotted")  # the same bytes, name and label: nothing new
        assert again.status_code == 200 and again.json()["id"] == added["id"]

        for data, label, reason in [(b"not an image at all", "dotted", "not an image"),
                                    (new_photos[0].read_bytes(), "striped", "identical to stored image")]:
            response = client.post("/api/images", data={"label": label}, headers=AUTH,
                                   files={"file": ("bad.jpg", data, "image/jpeg")})
            assert response.status_code == 400 and response.json()["detail"].startswith(reason)
        assert ("dotted/bad.jpg", "dotted", "upload") in {r[:3] for r in store.rejected()}
        for label in ("a/b", "x" * 101, "tab\there"):  # no label (or an empty one) is an unlabelled item
            assert add(client, new_photos[1], label).status_code == 422

        victim = ranked_ids(client, query)[0]
        response = client.delete(f"/api/images/{victim}", headers=AUTH)
        assert response.status_code == 200 and response.json() == {"id": victim, "catalogue_size": 36}
        assert victim not in ranked_ids(client, query) and victim not in ranked_ids(client, query, method="l2")
        assert client.get(f"/api/images/{victim}").status_code == 404
        assert client.delete(f"/api/images/{victim}", headers=AUTH).status_code == 404
        wait_for(lambda: client.get("/api/catalogue").json()["served"] == 36)  # reloaded from the store
        time.sleep(0.3)  # a few more polls: still gone
        assert victim not in ranked_ids(client, query) and client.get("/api/health").json()["images"] == 36
        assert victim not in [im.id for im in store.images()] and victim not in store.features("efficientnet_lite0")[0]


def test_new_model_and_features_are_picked_up_without_a_restart(db, featurizer, new_photos, small_dir):
    query = min((small_dir / "striped").iterdir())
    with SQLiteStore(db) as store, TestClient(create_app(store, featurizer, reload_interval=0.1,
                                                         featurize_added=False)) as client:
        first = client.get("/api/model").json()
        with SQLiteStore(db) as writer:  # another connection, as another process would write
            new_id, reason = ingest_one(writer, "striped/new.jpg", "striped", new_photos[2])
            assert reason is None
            featurize(writer, featurizer, progress=False)
            wait_for(lambda: client.get("/api/health").json()["images"] == 37)
            assert new_id in ranked_ids(client, query)
            assert client.get("/api/model").json()["version"] == first["version"]
            version = train(writer, featurizer.backbone, C=(0.0123,)).version
            wait_for(lambda: client.get("/api/model").json()["version"] == version)
            response = client.post("/api/rank", files={"file": (query.name, query.read_bytes(), "image/jpeg")})
            body = response.json()
            # not evaluated yet: rank's default for a model, scores
            assert body["model_version"] == version == first["version"] + 1 and body["method"] == "scores"
            want = rank(writer, query.read_bytes(), featurizer, method="scores", save=False)
            assert want.model_version == version
            assert [m["id"] for m in body["matches"]] == [m.image_id for m in want.matches]


def test_a_model_on_another_backbone_is_not_served(db, featurizer, small_dir):
    """The last good snapshot keeps serving, and the status says why the new model is not used."""
    query = min((small_dir / "dotted").iterdir())
    with SQLiteStore(db) as store, TestClient(create_app(store, featurizer, reload_interval=0.1,
                                                         featurize_added=False)) as client:
        before = client.post("/api/rank", files={"file": (query.name, query.read_bytes(), "image/jpeg")}).json()
        with SQLiteStore(db) as writer:
            latest = writer.model()
            other = writer.put_model(replace(latest, backbone="mobilenet_v2", version=None))
        wait_for(lambda: client.get("/api/catalogue").json()["reload_error"])
        status = client.get("/api/catalogue").json()
        assert f"latest model (version {other}) uses mobilenet_v2 features" in status["reload_error"]
        assert status["model_version"] == latest.version == client.get("/api/model").json()["version"]
        after = client.post("/api/rank", files={"file": (query.name, query.read_bytes(), "image/jpeg")}).json()
        assert after == before


def test_serve_command_takes_the_key_from_a_file_and_never_prints_it(db, new_photos, tmp_path, capsys):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    with serve_command("--db", str(db), "--api-key-file", str(key_file), "--reload-interval", "0.2",
                       env=env) as (url, proc), httpx.Client(base_url=url, timeout=60) as client:
        assert add(client, new_photos[0], "dotted", {"Authorization": "Bearer nope"}).status_code == 401
        added = add(client, new_photos[0], "dotted").json()
        wait_for(lambda: client.get("/api/catalogue").json()["served"] == 37)  # featurized in the background
        assert client.delete(f"/api/images/{added['id']}", headers=AUTH).status_code == 200
        assert client.get("/api/health").json()["images"] == 36
    assert "POST /api/images HTTP/1.1\" 201" in proc.output and KEY not in proc.output  # the access log is on
    for args, reason in [(["--api-key-file", str(tmp_path / "missing")], "cannot read the API key file"),
                         (["--api-key-file", str(tmp_path / "empty")], "is empty"),
                         (["--protect-reads"], "--protect-reads needs an API key")]:
        (tmp_path / "empty").write_text("\n")
        capsys.readouterr()
        assert cli.main(["serve", "--db", str(db), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("image-similarity: error: ") and reason in err and "\n" not in err


def load_while_writing(app, db: str) -> None:
    """The load benchmark against `app` while ingest, featurize and train write `db`: 0 errors, both versions."""
    bench = load_benchmark()
    with serving(app) as url:
        idle, busy, output = bench.run_with_writers(url, db, bench.sample_photos(2), requests=48, threads=8)
    print(f"\n  idle:          {idle}\n  while writing: {busy}")
    assert idle.errors == [] and busy.errors == [], (idle.errors + busy.errors)[:5]
    assert "database is locked" not in output and len(busy.latencies) >= 48
    versions = {v for v, _ in busy.versions}
    assert len(versions) == 2, busy.versions  # answers from the old model and from the one trained meanwhile
    with connect(db) as store:
        assert len(store.images()) == 36 + 3 * bench.NEW_PER_CLASS and store.rejected() == []
        assert store.feature_counts()[bench.WRITER_BACKBONE] >= 36 and store.evaluation().model_version == max(versions)


def test_load_while_featurize_grows_the_served_catalogue(db, featurizer, tmp_path):
    """Featurize adds images of the served backbone in batches while the load runs and train writes: every answer
    equals the engine's answer on the catalogue it names (the model version, and the first N featurized images)."""
    bench, backbone = load_benchmark(), featurizer.backbone
    photos = {p.name: p.read_bytes() for p in bench.sample_photos(2)}

    def complete(reference: dict, keys: set) -> None:
        with SQLiteStore(db) as own:
            ids = sorted(own.features(backbone)[0].tolist())  # featurize adds in id order: a catalogue is a prefix
            for version, method, size, name in keys:
                catalogue = Catalogue.from_store(own, backbone, ids=ids[:size])
                result = rank_with(searcher(catalogue, method, load_model(own, version)), photos[name], featurizer)
                reference[(version, method, size, name)] = [m.image_id for m in result.matches]

    with SQLiteStore(db) as store:
        ingest(store, bench.mirrored_photos(tmp_path / "new"), progress=False)  # 12 images to featurize
        with serving(create_app(store, featurizer, reload_interval=0.1, featurize_added=False)) as url:
            idle, busy, _ = bench.run_with_writers(
                url, str(db), bench.sample_photos(2), requests=48, threads=8, complete=complete,
                start_writers=lambda folder: bench.Writers(str(db), folder, backbone, batch_size=4))
    print(f"\n  while the catalogue grows: {busy}")
    assert idle.errors == [] and busy.errors == [], (idle.errors + busy.errors)[:5]
    sizes = {r.json()["catalogue_size"] for _, r in busy.responses}
    assert min(sizes) == 36 and max(sizes) == 48 and len({v for v, _ in busy.versions}) == 2, (sizes, busy.versions)


def test_load_while_featurize_and_train_write_postgres(pg_server, small_dir, featurizer, tmp_path):
    url = pgserver.create_database(pg_server, "web_live")
    assert cli.main(["run", str(small_dir), "--db", url, "-q", "--out", str(tmp_path / "plots")]) == 0
    with connect(url) as store:
        load_while_writing(create_app(store, featurizer, reload_interval=0.2, db=url), url)
