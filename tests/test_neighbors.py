"""neighbors: the top k of every catalogue image equals rank's exact search, in any block size, resumable; read
back in one query by the store, the web service, and computed by the SQL Server and PostgreSQL routines."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest
import sqlglot
from fastapi.testclient import TestClient
from support import sqlserver
from support.sqlserver import Recorder
from support.tsql import SqlError

from image_similarity.entrypoints import cli
from image_similarity.entrypoints.web import create_app
from image_similarity.errors import NotReady
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.neighbors import neighbors
from image_similarity.pipeline.train import load_model
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.methods import METHODS
from image_similarity.search.searchers import searcher
from image_similarity.store import SQLiteStore, connect
from image_similarity.store.mssql import MSSQLStore

BACKBONE = "efficientnet_lite0"


def stored(store: SQLiteStore, method: str) -> list[tuple]:
    return store.conn.execute("SELECT image_id, rank, neighbor_id, score, model_version FROM neighbors"
                              " WHERE method = ? ORDER BY image_id, rank", (method,)).fetchall()


@pytest.mark.parametrize("method", METHODS)
def test_every_images_neighbours_are_ranks_exact_search(full_copy, method):
    with SQLiteStore(full_copy) as store:
        model = load_model(store)
        report = neighbors(store, BACKBONE, method, k=5, memory=2 ** 20, progress=False)
        catalogue = Catalogue.from_store(store, BACKBONE)
        ranks = searcher(catalogue, method, model, index="exact")  # rank's exact search
        assert (report.images, report.added, report.block_rows) == (557, 557, 2 ** 20 // (557 * 24))
        rows = stored(store, method)
    assert len(rows) == 5 * 557 and {r[4] for r in rows} == {model.version if method in ("scores", "learned") else 0}
    by_image = {}
    for image_id, _, neighbor, score, _ in rows:
        by_image.setdefault(image_id, []).append((neighbor, score))
    for position in range(0, 557, 7):
        twins = catalogue.duplicates_of(catalogue.sha256[position], catalogue.dhashes[position])
        everyone = ranks.search(catalogue.features[position], len(catalogue), twins)
        expected, exact = everyone[:5], {m.image_id: m.score for m in everyone}
        got = by_image[int(catalogue.ids[position])]
        # the same top 5 as rank's search; images whose scores tie within float32 rounding may trade places
        # (learned on 3 classes is a 2-dimensional embedding, where such ties are common)
        np.testing.assert_allclose([s for _, s in got], [m.score for m in expected], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([s for _, s in got], [exact[n] for n, _ in got], rtol=1e-5, atol=1e-5)
        untied = [m.image_id for m in expected if sum(abs(m.score - o.score) < 1e-5 for o in everyone) == 1]
        assert set(untied) <= {n for n, _ in got} and len({n for n, _ in got}) == 5
        assert not twins[np.isin(catalogue.ids, [n for n, _ in got])].any()


def test_interrupted_run_resumes_and_a_rerun_adds_nothing(full_copy, monkeypatch):
    with SQLiteStore(full_copy) as store:
        whole = neighbors(store, BACKBONE, "cosine", k=3, progress=False)
        expected = stored(store, "cosine")
        store.delete_neighbors(BACKBONE, "cosine", 0)
        real, calls = store.put_neighbors, []

        def dying(*args):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            real(*args)

        monkeypatch.setattr(store, "put_neighbors", dying)
        memory = 100 * 557 * 24  # 100 rows per block
        with pytest.raises(KeyboardInterrupt):
            neighbors(store, BACKBONE, "cosine", k=3, memory=memory, progress=False)
        assert len(store.neighbor_ids(BACKBONE, "cosine", 0)) == 200
        monkeypatch.setattr(store, "put_neighbors", real)
        resumed = neighbors(store, BACKBONE, "cosine", k=3, memory=memory, progress=False)
        assert (resumed.added, resumed.already_stored, whole.added) == (357, 200, 557)
        assert stored(store, "cosine") == expected
        assert neighbors(store, BACKBONE, "cosine", k=3, progress=False).added == 0
        assert stored(store, "cosine") == expected
        assert neighbors(store, BACKBONE, "cosine", k=3, refresh=True, progress=False).added == 557
        assert stored(store, "cosine") == expected


@pytest.mark.parametrize("method", METHODS)
def test_tables_are_the_same_whatever_the_block_size(full_copy, method):
    """One row per block, 7, 100 and all 557 in one: the same neighbours, order and scores, bit for bit (the
    float32 product that screens them rounds differently for each block size on some CPUs, e.g. AVX2 kernels)."""
    tables = []
    with SQLiteStore(full_copy) as store:
        for rows in (1, 7, 100, 557):
            neighbors(store, BACKBONE, method, k=4, memory=rows * 557 * 24, refresh=True, progress=False)
            tables.append(stored(store, method))
    assert len(tables[0]) == 4 * 557 and all(table == tables[0] for table in tables[1:])


def test_cli_web_and_errors(full_copy, featurizer, capsys):
    assert cli.main(["neighbors", "--db", str(full_copy), "--method", "l2", "--top", "4", "-q"]) == 0
    assert "top 4 by l2 (efficientnet_lite0) for 557 images, 0 already stored" in capsys.readouterr().out
    assert cli.main(["neighbors", "--db", str(full_copy), "--method", "l2", "--top", "4", "-q"]) == 0
    assert "for 0 images, 557 already stored" in capsys.readouterr().out
    assert cli.main(["neighbors", "--db", str(full_copy), "--top", "0"]) == 1
    assert "--top must be at least 1" in capsys.readouterr().err
    with SQLiteStore(full_copy) as store:
        expected = store.neighbors(9, BACKBONE, "l2", 0)
        client = TestClient(create_app(store, featurizer))
        body = client.get("/api/images/9/neighbors?method=l2").json()
        assert [(m["rank"], m["id"], m["name"]) for m in body["matches"]] == [r[:3] for r in expected]
        assert body["matches"][0]["url"] == f"/api/images/{expected[0][1]}" and body["method"] == "l2"
        missing = client.get("/api/images/9/neighbors?method=cosine")
        assert missing.status_code == 404 and "image-similarity neighbors" in missing.json()["detail"]
    with pytest.raises(NotReady, match="needs a model"), SQLiteStore(full_copy.parent / "new.sqlite") as empty:
        neighbors(empty, BACKBONE, "learned", progress=False)


def test_sql_server_procedure_equals_the_engine(full_copy):
    with SQLiteStore(full_copy) as store:
        best = store.evaluation().summary["best_method"]
        neighbors(store, BACKBONE, best, k=4, progress=False)
        expected = stored(store, best)
    sql = sqlserver.server(full_copy)
    sqlserver.copy_model(sql)
    sql.conn.executemany(  # half the images already done: the procedure computes only the others
        "INSERT INTO neighbors (image_id, backbone, method, model_version, rank, neighbor_id, score)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)", [(i, BACKBONE, best, v, r, n, s) for i, r, n, s, v in expected if i <= 300])
    before = sql.external_calls
    sql.call("ComputeNeighbors", method=best, top=4)
    got = sql.conn.execute("SELECT image_id, rank, neighbor_id, score, model_version FROM neighbors WHERE method = ?"
                           " ORDER BY image_id, rank", (best,)).fetchall()
    assert sql.external_calls == before + 1 and [r[:3] + r[4:] for r in got] == [r[:3] + r[4:] for r in expected]
    np.testing.assert_allclose([r[3] for r in got], [r[3] for r in expected], rtol=1e-6)
    sql.call("ComputeNeighbors", method=best, top=4)  # everything stored: nothing added
    assert sql.conn.execute("SELECT COUNT(*) FROM neighbors").fetchone()[0] == len(expected)
    with pytest.raises(SqlError, match="ComputeNeighbors: .*run TrainModel first"):
        sqlserver.server(full_copy).call("ComputeNeighbors", method="learned")


def test_postgres_routine_equals_the_engine(database, small_dir, featurizer, tmp_path):
    with connect(database) as pg, SQLiteStore(tmp_path / "local.sqlite") as local:
        for store in (pg, local):
            ingest(store, small_dir, progress=False)
            featurize(store, featurizer, progress=False)
        neighbors(local, BACKBONE, "cosine", k=3, progress=False)
        with psycopg.connect(database, autocommit=True) as conn:
            call = "CALL image_similarity.compute_neighbors(method => 'cosine', top => 3)"
            assert conn.execute(call).fetchone()[:2] == (36, "cosine")
            assert conn.execute(call).fetchone()[:2] == (0, "cosine")
        for image_id in (1, 20, 36):
            remote, near = pg.neighbors(image_id, BACKBONE, "cosine", 0), local.neighbors(image_id, BACKBONE,
                                                                                          "cosine", 0)
            assert [r[:4] for r in remote] == [r[:4] for r in near]
            np.testing.assert_allclose([r[4] for r in remote], [r[4] for r in near], atol=1e-5)


def test_sql_server_store_statements_are_tsql_with_bound_values():
    conn = Recorder([])
    store = MSSQLStore("mssql://sql01/Images", connection=conn)
    store.put_neighbors(BACKBONE, "learned", 3, [(1, 1, 2, 0.5), (1, 2, 3, 0.25)])
    assert store.neighbor_ids(BACKBONE, "cosine", 0) == set() and store.neighbors(1, BACKBONE, "cosine", 0) == []
    store.delete_neighbors(BACKBONE, "cosine", 0)
    list(store.missing_features(BACKBONE, 8, (5, 9)))
    assert len(conn.sent) == 5  # the two neighbour rows in one multi-row statement
    for sql, params in conn.sent:
        sqlglot.parse_one(sql, read="tsql")
        assert sql.count("?") == len(params), sql
    assert conn.sent[0][1] == (1, BACKBONE, "learned", 3, 1, 2, 0.5, 1, BACKBONE, "learned", 3, 2, 3, 0.25)
    assert conn.sent[-1][1] == (8, 4, 9, BACKBONE)
