"""Small and lopsided catalogues (issue 25 item 2): one rule (pipeline/classes.py) for split, train, refine and
evaluate, the same through the CLI, the web service, SQL Server's procedures and PostgreSQL's routines.

The catalogue of the issue, made small: 8 dotted, 8 leopard and 1 striped real photo."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.catalogues import copy_database
from support.tsql import Server, SqlError, install

from image_similarity.entrypoints import cli
from image_similarity.entrypoints.web import create_app
from image_similarity.errors import BadInput
from image_similarity.pipeline.classes import MIN_TRAIN_PHOTOS, ClassCount, class_counts, learnable
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.refine import Settings, refine
from image_similarity.pipeline.split import split, split_images
from image_similarity.pipeline.train import load_model
from image_similarity.store import ImageRow, SQLiteStore, connect

SQLR = Path(__file__).resolve().parents[1] / "SQLR"
LEFT_OUT = "left out of train and refine (fewer than 2 distinct photos): striped (1 image)"


def photos(sample_dir: Path, root: Path, counts: dict[str, int]) -> Path:
    """A folder with the first `counts[label]` bundled photos of each class."""
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for path in sorted((sample_dir / label).iterdir())[:n]:
            shutil.copy(path, root / label / path.name)
    return root


@pytest.fixture(scope="module")
def lopsided(sample_dir, tmp_path_factory) -> Path:
    return photos(sample_dir, tmp_path_factory.mktemp("lopsided"), {"dotted": 8, "leopard": 8, "striped": 1})


@pytest.fixture(scope="module")
def featurized(lopsided, featurizer, tmp_path_factory) -> Path:
    """The lopsided photos ingested and featurized, nothing else."""
    path = tmp_path_factory.mktemp("db") / "lopsided.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, lopsided, progress=False)
        featurize(store, featurizer, progress=False)
    return path


@pytest.fixture
def db(featurized, tmp_path) -> str:
    return str(copy_database(featurized, tmp_path / "copy.sqlite"))


def test_the_rule_counts_near_duplicates_once_and_names_what_it_leaves_out():
    hashes = ["0" * 64, "0" * 63 + "1", "f" * 64, "0f" * 32, "f0" * 32]  # the first two are near duplicates
    counts = class_counts(["a", "a", "a", "b", "c"], hashes)
    assert counts == {"a": ClassCount(3, 2), "b": ClassCount(1, 1), "c": ClassCount(1, 1)}
    assert str(counts["a"]) == "3 images, 2 distinct" and str(counts["b"]) == "1 image"
    with pytest.raises(BadInput) as err:
        learnable(["a", "a", "a", "b", "c"], hashes, "train")
    assert str(err.value) == ("train needs 2 classes with at least 2 distinct photos each in the training split, "
                              "only a (3 images, 2 distinct) has that many; too few: b (1 image), c (1 image)")
    assert learnable(["a", "a", "b", "b", "c"], ["0" * 64, "f" * 64, "0f" * 32, "f0" * 32, "ff00" * 16], "x") == \
        (["a", "b"], {"c": ClassCount(1, 1)})


def test_split_keeps_a_small_class_learnable_before_it_measures_it():
    """Two photos of a class at test fraction 0.5 used to go one to each side: then no step could learn it."""
    rows = [ImageRow(i, f"{i}.jpg", label, "", h) for i, (label, h) in enumerate(
        [("a", "0" * 64), ("a", "f" * 64), ("a", "0f" * 32), ("a", "f0" * 32), ("b", "ff00" * 16), ("b", "00ff" * 16)])]
    for seed in range(5):
        subsets = split_images(rows, test_fraction=0.5, seed=seed)
        assert [subsets[r.id] for r in rows if r.label == "b"] == ["train"] * MIN_TRAIN_PHOTOS
        assert sum(subsets[r.id] == "test" for r in rows if r.label == "a") == 2


def test_cli_leaves_the_one_photo_class_out_and_says_so(db, lopsided, tmp_path, capsys):
    """The issue's failure: train crashed with scikit-learn's traceback ("Only 2 class/es in training fold")."""
    out = tmp_path / "plots"
    assert cli.main(["split", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"  {LEFT_OUT}"]
    assert cli.main(["train", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"  {LEFT_OUT}"]
    assert cli.main(["evaluate", "--db", db, "--out", str(out)]) == 0
    assert "  not measured: striped: not learnt (1 image)" in capsys.readouterr().out.splitlines()
    striped = next((lopsided / "striped").iterdir())
    assert cli.main(["rank", str(striped), "--db", db, "-q", "--method", "scores"]) == 0
    assert cli.main(["neighbors", "--db", db, "-q"]) == 0
    with connect(db) as store:
        model = load_model(store)
        assert model.classes == ["dotted", "leopard"] and model.params["n_train"] == 12
        assert model.params["left_out"] == {"striped": {"images": 1, "photos": 1}}
        summary = store.evaluation().summary
        assert summary["not_measured"] == {"striped": "not learnt (1 image)"}
        assert set(summary["per_class_test_accuracy"]) == {"dotted", "leopard"} and summary["n_test"] == 4
    assert cli.main(["train", "--db", db]) == 0  # a re-run: the same model, one version up
    with connect(db) as store:
        again = load_model(store)
        assert again.version == model.version + 1 and (again.coef == model.coef).all()


def test_cli_stops_with_one_line_when_one_class_is_left(sample_dir, featurizer, tmp_path, capsys):
    folder = photos(sample_dir, tmp_path / "two", {"dotted": 6, "striped": 1})
    db = str(tmp_path / "two.sqlite")
    with SQLiteStore(db) as store:
        ingest(store, folder, progress=False)
        featurize(store, featurizer, progress=False)
        split(store)
    assert cli.main(["train", "--db", db]) == 1
    assert capsys.readouterr().err == (
        "image-similarity: error: train needs 2 classes with at least 2 distinct photos each in the training split, "
        "only dotted (4 images) has that many; too few: striped (1 image)\n")
    assert cli.main(["refine", "--db", db, "-q", "--epochs", "1"]) == 1
    assert capsys.readouterr().err.startswith("image-similarity: error: refine needs 2 classes")


def test_evaluate_without_a_test_image_names_the_minimum(sample_dir, featurizer, tmp_path, capsys):
    """Two photos per class are learnt but not measured; evaluate used to say 'run split and featurize first'."""
    folder = photos(sample_dir, tmp_path / "pairs", {"dotted": 2, "leopard": 2})
    db = str(tmp_path / "pairs.sqlite")
    with SQLiteStore(db) as store:
        ingest(store, folder, progress=False)
        featurize(store, featurizer, progress=False)
    assert cli.main(["split", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  not measured by evaluate (no test image): dotted (2 images), leopard (2 images)"]
    assert cli.main(["train", "--db", db]) == 0
    assert cli.main(["evaluate", "--db", db, "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        "image-similarity: error: evaluate: no test image of the classes model version 1 learnt (dotted, leopard): "
        "a class needs 3 distinct photos to be learnt and measured; add photos and run split and train again\n")


def test_refine_learns_the_classes_train_learns(db):
    with SQLiteStore(db) as store:
        split(store)
        name = refine(store, epochs=1, progress=False, settings=Settings(image_size=64, batch_size=8))
        params = store.network(name).params
    assert params["classes"] == ["dotted", "leopard"] and params["training_images"] == 12
    assert params["left_out"] == {"striped": {"images": 1, "photos": 1}}


def test_web_service_shows_what_was_left_out(db, lopsided, featurizer, tmp_path):
    assert cli.main(["split", "--db", db]) == 0 and cli.main(["train", "--db", db]) == 0
    assert cli.main(["evaluate", "--db", db, "--out", str(tmp_path)]) == 0
    with SQLiteStore(db) as store, TestClient(create_app(store, featurizer)) as client:
        model = client.get("/api/model").json()
        assert model["classes"] == ["dotted", "leopard"]
        assert model["params"]["left_out"] == {"striped": {"images": 1, "photos": 1}}
        assert model["evaluation"]["not_measured"] == {"striped": "not learnt (1 image)"}
        striped = next((lopsided / "striped").iterdir())
        answer = client.post("/api/rank", files={"file": (striped.name, striped.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200 and len(answer.json()["matches"]) == 10


def sql_server(db: str) -> Server:
    """An emulated SQL Server (tests/support/tsql.py) with SQLR/ installed and the images and features of a SQLite store."""
    sql = Server()
    install(sql, sorted(SQLR.glob("[0-9][0-9]_*.sql")))
    sql.conn.execute("ATTACH DATABASE ? AS src", (db,))
    for table, columns in [("images", "id, name, label, format, width, height, mode, size_bytes, sha256, dhash, data"),
                           ("features", "image_id, backbone, dim, vector")]:
        sql.conn.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM src.{table}")
    return sql


def test_sql_server_procedures_apply_the_same_rule(db):
    sql = sql_server(db)
    sql.call("PrepareData")
    sql.call("TrainModel")
    (classes, params), = sql.conn.execute("SELECT classes, params FROM models").fetchall()
    assert json.loads(classes) == ["dotted", "leopard"]
    assert json.loads(params)["left_out"] == {"striped": {"images": 1, "photos": 1}}
    sql.call("EvaluateModel")
    (summary,), = sql.conn.execute("SELECT summary FROM evaluations").fetchall()
    assert json.loads(summary)["not_measured"] == {"striped": "not learnt (1 image)"}
    sql.conn.execute("DELETE FROM features WHERE image_id IN (SELECT id FROM images WHERE label = 'leopard')")
    sql.conn.execute("DELETE FROM images WHERE label = 'leopard'")
    sql.call("PrepareData")
    with pytest.raises(SqlError) as err:
        sql.call("TrainModel")
    assert str(err.value) == ("Msg 50035: TrainModel: train needs 2 classes with at least 2 distinct photos each in "
                              "the training split, only dotted (6 images) has that many; too few: striped (1 image)")


def test_postgres_routines_apply_the_same_rule(database, lopsided, tmp_path, capsys):
    url = database
    assert cli.main(["ingest", str(lopsided), "--db", url, "-q"]) == 0
    for step in ("featurize", "split", "train", "evaluate"):
        assert cli.main([step, "--db", url, "--context", "sql", "-q"]) == 0, step
    out = capsys.readouterr().out
    assert out.count(LEFT_OUT) == 2 and "  not measured: striped: not learnt (1 image)" in out.splitlines()
    with connect(url) as store:
        assert store.model().classes == ["dotted", "leopard"]
        for image in store.images():
            if image.label == "leopard":
                store.remove_image(image.id)
    assert cli.main(["split", "--db", url, "--context", "sql"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--db", url, "--context", "sql"]) == 1
    assert capsys.readouterr().err == (
        "image-similarity: error: image_similarity: train needs 2 classes with at least 2 distinct photos each in the "
        "training split, only dotted (6 images) has that many; too few: striped (1 image)\n")
