"""The in-database steps on SQL Server's Python runtime (Python 3.10, numpy 1.22.0, pandas 2.0.3, no torch:
docs/sqlserver-setup.md), on features the main environment's network computed.

.ci/sqlserver-profile writes those (support/runtime_reference.py, main virtualenv) and runs this file in the
profile's virtualenv with IMAGE_SIMILARITY_REFERENCE naming the folder; elsewhere the fixture writes them itself.
The emulated server (support/tsql.py) runs SQLR/'s procedures, whose scripts run the engine in this process: the
split, training, evaluation, ranking and neighbours below are this runtime's arithmetic, compared with the main
environment's. Only the query's forward pass is the main environment's (torch is not in the profile).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from support.catalogues import copy_database
from support.runtime_reference import METHODS, NEIGHBORS, QUERY, STORE, build
from support.sqlserver import copy_model, server
from support.tsql import Client

from image_similarity import store as stores
from image_similarity.contexts import inproc
from image_similarity.entrypoints import cli
from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.rank import rank
from image_similarity.pipeline.train import train
from image_similarity.store import SQLiteStore
from image_similarity.store.base import decode_array, strict_json
from image_similarity.store.mssql import MSSQLStore

REFERENCE_ENV = "IMAGE_SIMILARITY_REFERENCE"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = os.environ.get(REFERENCE_ENV)
    return Path(folder) if folder else build(tmp_path_factory.mktemp("reference"))


@pytest.fixture
def query(reference, monkeypatch) -> dict:
    """The query's features as the main environment's network computed them, given to the procedures in place of
    a forward pass; the rest of RankCandidates is this runtime's."""
    query = json.loads((reference / QUERY).read_text())
    vector = np.asarray(query["vector"], dtype=np.float32)

    class Computed:
        backbone = query["backbone"]

        def features(self, images) -> np.ndarray:
            return np.repeat(vector[None], len(images), axis=0)

    query["featurizer"] = Computed()
    monkeypatch.setattr(inproc, "featurizer", lambda backbone, network=None: query["featurizer"])
    with SQLiteStore(reference / STORE) as store:
        query["data"] = store.image_bytes(query["id"])
    return query


def analyst(sql, monkeypatch) -> None:
    """The CLI's mssql:// store, on the emulated server, as a database user that is not sysadmin (the setup's role)."""
    sql.run_batch("CREATE USER analyst WITHOUT LOGIN; ALTER ROLE image_similarity_user ADD MEMBER analyst;")
    monkeypatch.setattr(stores, "connect", lambda db: MSSQLStore("mssql://sql01/Images",
                                                                 connection=Client(sql, user="analyst")))


def test_split_train_evaluate_rank_through_the_sql_context_as_the_engine(reference, query, monkeypatch, tmp_path):
    """PrepareData, TrainModel, EvaluateModel and RankCandidates, called by `--context sql` as a user that is not
    sysadmin, on the stored features: the main environment's split, then the model, figures and top 10 that the
    engine computes from it on this runtime (scikit-learn's shuffled folds differ between its versions, so the
    cross-validated C may too: docs/sqlserver-setup.md)."""
    sql = server(reference / STORE)
    analyst(sql, monkeypatch)
    (tmp_path / "query.jpg").write_bytes(query["data"])
    for step in (["split"], ["train"], ["evaluate"], ["rank", str(tmp_path / "query.jpg")]):
        assert cli.main([*step, "--db", "mssql://sql01/Images", "--context", "sql"]) == 0, step
    with SQLiteStore(copy_database(reference / STORE, tmp_path / "here.sqlite")) as store:
        assert dict(sql.conn.execute("SELECT image_id, subset FROM splits").fetchall()) == store.split()
        model = train(store, query["backbone"])
        evaluate(store, model)
        expected = store.evaluation()
        ranked = rank(store, query["data"], query["featurizer"], model=model, save=False)
    (params,) = sql.conn.execute("SELECT params FROM models").fetchone()
    assert json.loads(params) == model.params
    arrays = model.to_record().arrays
    for name, dtype, shape, data in sql.conn.execute("SELECT name, dtype, shape, data FROM model_arrays"):
        np.testing.assert_array_equal(decode_array(dtype, shape, data), arrays.pop(name))
    assert not arrays
    (summary,) = sql.conn.execute("SELECT summary FROM evaluations").fetchone()
    summary = {**json.loads(summary), "model_version": model.version}  # the local copy's is its second model
    assert summary == json.loads(strict_json(expected.summary))  # an undefined figure is null
    metrics = sql.conn.execute("SELECT scope, metric, class, value FROM evaluation_metrics").fetchall()
    assert [m[:3] for m in metrics] == [tuple(m[:3]) for m in expected.metrics if m[3] == m[3]]
    np.testing.assert_allclose([m[3] for m in metrics], [m[3] for m in expected.metrics if m[3] == m[3]])
    got = sql.conn.execute("SELECT image_id FROM rankings ORDER BY rank").fetchall()
    assert [i for (i,) in got] == [m.image_id for m in ranked.matches]


@pytest.mark.parametrize("method", METHODS)
def test_rank_candidates_gives_the_engines_top_10(reference, query, method):
    sql = server(reference / STORE)
    copy_model(sql)
    (ranked,), _ = sql.call("RankCandidates", query=query["data"], method=method, query_name="q")
    want = query["rankings"][method]
    assert ranked["image_id"].tolist() == want["ids"] and query["id"] not in want["ids"]
    np.testing.assert_allclose(ranked["score"], want["scores"], rtol=1e-5, atol=1e-5)
    assert sql.conn.execute("SELECT method FROM queries").fetchone() == (want["method"],)


def test_evaluate_model_and_compute_neighbors_give_the_engines_figures_on_its_model(reference):
    """The main environment's model copied in: EvaluateModel's figures and ComputeNeighbors' neighbours are the
    main environment's, within float rounding."""
    sql = server(reference / STORE)
    copy_model(sql)
    with SQLiteStore(reference / STORE) as store:
        expected = store.evaluation()
        neighbours = store.conn.execute("SELECT method, image_id, rank, neighbor_id, model_version, score FROM "
                                        "neighbors ORDER BY image_id, rank").fetchall()
    sql.call("EvaluateModel")
    (summary,) = sql.conn.execute("SELECT summary FROM evaluations ORDER BY id DESC").fetchone()
    want = json.loads(strict_json(expected.summary))
    assert json.loads(summary).keys() == want.keys() and json.loads(summary)["best_method"] == want["best_method"]
    metrics = sql.conn.execute("SELECT scope, metric, class, value FROM evaluation_metrics WHERE evaluation_id = 2"
                               ).fetchall()
    defined = [m for m in expected.metrics if m[3] == m[3]]
    assert [m[:3] for m in metrics] == [tuple(m[:3]) for m in defined]
    np.testing.assert_allclose([m[3] for m in metrics], [m[3] for m in defined], atol=1e-6)  # float32 sums
    sql.call("ComputeNeighbors", method=neighbours[0][0], top=NEIGHBORS)
    got = sql.conn.execute("SELECT method, image_id, rank, neighbor_id, model_version, score FROM neighbors"
                           " ORDER BY image_id, rank").fetchall()
    assert [r[:5] for r in got] == [r[:5] for r in neighbours] and len(got) == NEIGHBORS * 36
    np.testing.assert_allclose([r[5] for r in got], [r[5] for r in neighbours], rtol=1e-6)
