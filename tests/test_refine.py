"""Refine (issue 14): fine-tuning on a few real photos per class, stored as plain arrays, loaded strictly, resumed
after an interruption, and usable as a backbone through the CLI, Python, the web service, SQL Server's procedure
(emulated) and PostgreSQL's routine (live)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlglot
from fastapi.testclient import TestClient
from support import pgserver
from support.sqlserver import Recorder, procedures

from image_similarity.contexts import inproc
from image_similarity.entrypoints import cli
from image_similarity.entrypoints.web import create_app
from image_similarity.errors import NotReady
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.networks import load_refined
from image_similarity.pipeline.rank import rank
from image_similarity.pipeline.refine import Settings, refine
from image_similarity.pipeline.split import split
from image_similarity.store import SQLiteStore, connect
from image_similarity.store.mssql import MSSQLStore

FAST = Settings(image_size=64, batch_size=8)  # small crops keep the tests quick; the code path is the same
BASE = "efficientnet_lite0"


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def few_dir(photo_dirs) -> Path:
    """6 real photos per class."""
    return photo_dirs(6)


@pytest.fixture(scope="module")
def split_db(few_dir, tmp_path_factory) -> Path:
    """The few photos ingested and split, plus one image that no longer decodes; nothing refined."""
    path = tmp_path_factory.mktemp("refine") / "split.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, few_dir, progress=False)
        split(store, seed=0)
        train_id = min(i for i, s in store.split().items() if s == "train")
        with store.conn:  # bytes damaged after ingestion: refine must skip and record it
            store.conn.execute("UPDATE images SET data = substr(data, 1, 300) WHERE id = ?", (train_id,))
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def copy_of(path: Path, tmp_path: Path) -> Path:
    shutil.copy(path, tmp_path / path.name)
    return tmp_path / path.name


@pytest.fixture(scope="module")
def refined(split_db, tmp_path_factory) -> tuple[Path, str]:
    """Two uninterrupted epochs: (database, network name)."""
    path = copy_of(split_db, tmp_path_factory.mktemp("refined"))
    with SQLiteStore(path) as store:
        name = refine(store, BASE, epochs=2, progress=False, settings=FAST)
    return path, name


def weights(store, name: str) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(d, dt) for k, (dt, _, d) in store.network_arrays(name, "weights").items()}


def test_refine_stores_plain_arrays_that_load_strictly_and_change_the_features(refined):
    path, name = refined
    with SQLiteStore(path) as store:
        record = store.network(name)
        assert (name, record.base, record.version, record.status) == (f"{BASE}_refined_1", BASE, 1, "ready")
        assert [e["epoch"] for e in record.metrics["history"]] == [1, 2]
        subsets = store.split()
        n_train = sum(s == "train" for s in subsets.values())
        assert record.metrics["train_images"] + record.metrics["val_images"] == n_train - 1  # the damaged one
        assert record.metrics["val_images"] >= 2 and record.params["classes"] == ["dotted", "leopard", "striped"]
        assert any(stage == "refine" for _, _, stage, _ in store.rejected())
        assert store.network_arrays(name, "state") == {} == store.network_arrays(name, "optimizer")
        stored = store.network_arrays(name, "weights")
        assert {"head.weight", "head.bias"} <= set(stored) and stored["head.weight"][1] == "[3, 1280]"
        extractor = load_refined(store, name)  # strict: every key, shape and dtype
        assert extractor.spec.name == name and extractor.spec.dim == 1280
        assert record.params["flip_average"] and extractor.flip_average  # featurized with its mirror image
        featurize(store, backbone=BASE, progress=False)
        report = featurize(store, backbone=name, progress=False)
        assert report.added == len(subsets) - 1
        ids, frozen = store.features(BASE)
        ids_r, tuned = store.features(name)
        assert np.array_equal(ids, ids_r)
        last = frozen[:, :tuned.shape[1]]  # the base's last layer, L2-normalised (multi-stage features' first part)
        unit = tuned / np.linalg.norm(tuned, axis=1, keepdims=True)
        assert tuned.shape[1] == 1280 and np.abs(unit - last).mean() > 0.01 * np.abs(last).mean()
        assert refine(store, BASE, epochs=2, progress=False, settings=FAST) == name  # done: nothing new
        assert [n.name for n in store.networks()] == [name]


def test_an_interrupted_refine_resumes_after_its_last_finished_epoch(split_db, tmp_path):
    """At float32, so that the resumed and the uninterrupted run can be held to a tight tolerance (CPU kernels do not
    sum in a fixed order, and under bfloat16 autocast a last-bit difference may round a weight's copy the other way)."""
    (tmp_path / "whole").mkdir()
    with SQLiteStore(copy_of(split_db, tmp_path / "whole")) as store:
        whole = refine(store, BASE, epochs=2, progress=False, settings=FAST, precision="fp32")
        uninterrupted = store.network(whole)
        expected = weights(store, whole)

    def stop_after_first(epoch: int, metrics: dict) -> None:
        raise Interrupted

    ran: list[int] = []
    with SQLiteStore(copy_of(split_db, tmp_path)) as store:
        with pytest.raises(Interrupted):
            refine(store, BASE, epochs=2, progress=False, settings=FAST, precision="fp32", on_epoch=stop_after_first)
        (record,) = store.networks()
        assert record.status == "training" and len(record.metrics["history"]) == 1
        assert store.network_arrays(record.name, "state") and store.network_arrays(record.name, "optimizer")
        with pytest.raises(NotReady, match="still training"):
            Featurizer(record.name, store=store)
        name = refine(store, BASE, epochs=2, progress=False, settings=FAST, precision="fp32",
                      on_epoch=lambda e, m: ran.append(e))
        assert name == record.name and ran == [2]
        resumed = store.network(name)
        got = weights(store, name)
    assert resumed.status == "ready" and len(resumed.metrics["history"]) == 2
    assert resumed.metrics["precision"] == uninterrupted.metrics["precision"] == "fp32"
    for mine, theirs in zip(resumed.metrics["history"], uninterrupted.metrics["history"], strict=True):
        assert mine["epoch"] == theirs["epoch"] and mine["val_accuracy"] == theirs["val_accuracy"]
        np.testing.assert_allclose([mine["loss"], mine["val_loss"]], [theirs["loss"], theirs["val_loss"]], rtol=1e-5)
    assert got.keys() == expected.keys()
    for key in expected:  # as a whole per tensor: Adam turns last-bit noise in a near-zero gradient into a step
        assert np.linalg.norm(got[key] - expected[key]) <= 1e-4 * np.linalg.norm(expected[key]), key


@pytest.mark.parametrize("damage", ["truncated", "shape", "missing"])
def test_corrupt_stored_arrays_are_a_one_line_error(refined, tmp_path, capsys, damage):
    path = copy_of(refined[0], tmp_path)
    name = refined[1]
    with SQLiteStore(path) as store, store.conn:
        if damage == "truncated":
            store.conn.execute("UPDATE network_arrays SET data = substr(data, 1, 10) WHERE key = 'head.weight'")
        elif damage == "shape":
            store.conn.execute("UPDATE network_arrays SET shape = '[1280, 3]' WHERE key = 'head.weight'")
        else:
            store.conn.execute("DELETE FROM network_arrays WHERE key = 'head.bias'")
    assert cli.main(["featurize", "--db", str(path), "--backbone", name, "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"image-similarity: error: network {name}: stored ") and err.count("\n") == 1
    assert ("head.bias" if damage == "missing" else "head.weight") in err


def test_refined_backbone_ranks_through_the_cli_python_and_web_service(few_dir, tmp_path, capsys):
    db = str(tmp_path / "run.sqlite")
    assert cli.main(["run", str(few_dir), "--db", db, "--refine", "--epochs", "1", "-q",
                     "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    name = f"{BASE}_refined_1"
    assert f"refine: {name}" in out and out.count("accuracy: train") == 2
    frozen_plot, refined_plot = tmp_path / "plots" / "confusion.png", tmp_path / "plots" / name / "confusion.png"
    assert f"plot confusion: {frozen_plot}" in out and f"plot confusion: {refined_plot}" in out
    assert frozen_plot.stat().st_mtime_ns < refined_plot.stat().st_mtime_ns  # the frozen network's plot kept
    query = sorted((few_dir / "leopard").iterdir())[-1]
    assert cli.main(["rank", str(query), "--db", db, "--top", "3"]) == 0
    assert f"{name}, model version 2)" in capsys.readouterr().out
    assert cli.main(["neighbors", "--db", db, "--backbone", name, "--top", "2"]) == 0
    assert f"({name}" in capsys.readouterr().out
    with connect(db) as store:
        assert store.model().backbone == name and store.feature_counts()[BASE] == store.feature_counts()[name]
        featurizer = Featurizer(name, store=store)
        result = rank(store, query.read_bytes(), featurizer, top=3, save=False)
        assert result.backbone == name and len(result.matches) == 3
        with TestClient(create_app(store, featurizer)) as client:
            answer = client.post("/api/rank?top=3", files={"file": (query.name, query.read_bytes())}).json()
        assert answer["backbone"] == name and [m["id"] for m in answer["matches"]] == \
            [m.image_id for m in result.matches]


def test_sql_server_procedure_calls_the_engine_that_refines_hex_rows(split_db):
    text = procedures()["RefineModel"]
    assert re.findall(r"inproc\.(\w+)\(", text) == ["reported", "refine_model"]  # issue 15's conventions
    assert "CONVERT(varchar(max), i.data, 2)" in text and "SET @error = ERROR_MESSAGE();" in text
    with SQLiteStore(split_db) as store:
        train_ids = sorted(i for i, s in store.split().items() if s == "train")
        rows = [(im.id, im.name, im.label, store.image_bytes(im.id).hex()) for im in store.images()
                if im.id in train_ids]
    out, params, metrics, rejected = inproc.refine_model(pd.DataFrame(rows, columns=["id", "name", "label", "data"]),
                                                         BASE, 1, 0)
    assert list(out.columns) == ["key", "dtype", "shape", "data"] and {"head.weight", "head.bias"} <= set(out["key"])
    head = out.set_index("key").loc["head.weight"]
    assert head["shape"] == "[3, 1280]" and len(bytes.fromhex(head["data"])) == 3 * 1280 * 4
    assert len(json.loads(metrics)["history"]) == 1 and json.loads(params)["base"] == BASE
    assert [name for name, _, _ in json.loads(rejected)] == [rows[0][1]]  # the damaged training image


def test_refine_and_rank_inside_postgresql(pg_server, few_dir, tmp_path, capsys):
    url = pgserver.create_database(pg_server, "refine_sql")
    assert cli.main(["ingest", str(few_dir), "--db", url, "-q"]) == 0
    assert cli.main(["split", "--db", url, "--context", "sql"]) == 0
    assert cli.main(["refine", "--db", url, "--context", "sql", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    name = f"{BASE}_refined_1"
    assert "RefineModel ran inside PostgreSQL" in out and name in out
    assert cli.main(["run", str(few_dir), "--db", url, "--context", "sql", "--backbone", name, "-q"]) == 0
    query = sorted((few_dir / "dotted").iterdir())[-1]
    assert cli.main(["rank", str(query), "--db", url, "--context", "sql", "--top", "3"]) == 0
    listed = [int(line.split()[1]) for line in capsys.readouterr().out.splitlines()[-3:]]
    with connect(url) as store:
        assert store.network(name).status == "ready" and store.model().backbone == name
        expected = rank(store, query.read_bytes(), Featurizer(name, store=store), top=3, save=False)
        assert listed == [m.image_id for m in expected.matches]


def test_sql_server_store_sends_tsql_with_bound_values_for_networks():
    conn = Recorder([])
    store = MSSQLStore("mssql://sql01/Images", connection=conn)
    record = store.create_network(BASE, {"seed": 0})
    assert record.name == f"{BASE}_refined_7" and record.status == "training"
    store.put_network(record.name, "training", {"history": []}, {"state": {"a": np.ones(3, np.float32)}},
                      drop=("optimizer",))
    assert store.networks() == [] and store.network_arrays(record.name, "weights") == {}
    assert len(conn.sent) == 8
    for sql, params in conn.sent:
        sqlglot.parse_one(sql, read="tsql")  # raises on invalid T-SQL
        assert sql.count("?") == len(params), sql
