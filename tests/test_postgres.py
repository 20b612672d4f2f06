"""PostgreSQL + PL/Python + pgvector, live: a throwaway server runs the job's steps inside its own processes.

Needs PostgreSQL 15 with PL/Python and pgvector (`.ci/run` installs them). Without them the tests are skipped
with the reason, except in CI, where they fail.
"""
from __future__ import annotations

import importlib.util
import os
import re
import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from support import pgserver

from image_similarity.contexts import plpython
from image_similarity.contexts.sql import POSTGRES_ROUTINES, PROCEDURES
from image_similarity.entrypoints import cli
from image_similarity.entrypoints.service import Service
from image_similarity.errors import BadInput
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.rank import rank
from image_similarity.pipeline.train import load_model
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.methods import METHODS, Method
from image_similarity.search.searchers import searcher, store_searcher
from image_similarity.search.stored import store_method_vectors
from image_similarity.store import SQLiteStore, StoreError, connect
from image_similarity.store.base import STORED_METHODS
from image_similarity.store.postgres import EF_SEARCH, EF_SEARCH_MAX, POSTGRES, PostgresStore, nearest_statement

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def contexts(pg_server, small_dir, tmp_path_factory) -> dict[str, str]:
    """`image-similarity run` on 36 real photos three ways: local on SQLite, local on PostgreSQL, and with
    --context sql on PostgreSQL (featurize, split, train and evaluate inside the server)."""
    urls = {"sqlite": str(tmp_path_factory.mktemp("ctx") / "local.sqlite"),
            "local": pgserver.create_database(pg_server, "ctx_local"),
            "sql": pgserver.create_database(pg_server, "ctx_sql")}
    for name, url in urls.items():
        context = "sql" if name == "sql" else "local"
        assert cli.main(["run", str(small_dir), "--db", url, "--context", context, "-q",
                         "--out", str(tmp_path_factory.mktemp("plots"))]) == 0
    return urls


def test_both_contexts_give_the_engines_results(contexts, small_dir, featurizer):
    stores = {name: connect(url) for name, url in contexts.items()}
    try:
        ids, features = stores["sqlite"].features("efficientnet_lite0")
        for name in ("local", "sql"):
            store = stores[name]
            assert [im.name for im in store.images()] == [im.name for im in stores["sqlite"].images()]
            found, X = store.features("efficientnet_lite0")
            assert np.array_equal(found, ids)
            np.testing.assert_allclose(X, features, atol=1e-4)  # the server's torch threads may sum differently
            recorded = store.feature_runtimes("efficientnet_lite0")  # the server's own choice, inside it (issue 28)
            assert sum(recorded.values()) == len(ids) and {r for r, _ in recorded} <= {"torch", "onnxruntime", "openvino"}
            assert store.split() == stores["sqlite"].split()
            model, reference = store.model(), stores["sqlite"].model()
            assert model.params["C"] == reference.params["C"]
            summary, expected = store.evaluation().summary, stores["sqlite"].evaluation().summary
            assert summary["test_accuracy"] == expected["test_accuracy"] > 0.6
            assert summary["best_method"] == expected["best_method"]
        query = sorted((small_dir / "leopard").iterdir())[0].read_bytes()
        answers = {}
        for name, store in stores.items():
            answers[name] = [m.image_id for m in rank(store, query, featurizer, method="scores", save=False).matches]
        assert answers["local"] == answers["sql"] == answers["sqlite"]
    finally:
        for store in stores.values():
            store.close()


def test_steps_run_inside_the_server_process(contexts):
    with psycopg.connect(contexts["sql"], autocommit=True) as conn:
        env = dict(conn.execute("SELECT * FROM image_similarity.environment()").fetchall())
        assert int(env["pid"]) == conn.info.backend_pid != os.getpid()
        assert Path(env["executable"]).name == "postgres"
        (added, skipped, _, pid), = conn.execute("CALL image_similarity.featurize_images()").fetchall()
        assert (added, skipped, pid) == (0, 0, conn.info.backend_pid)  # already featurized: nothing to do


def test_sql_context_cli_rank_is_the_servers(contexts, small_dir, featurizer, capsys):
    query = sorted((small_dir / "striped").iterdir())[3]
    assert cli.main(["rank", str(query), "--db", contexts["sql"], "--context", "sql", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("RankCandidates ran inside PostgreSQL")
    listed = [int(line.split()[1]) for line in out.splitlines()[2:]]
    with connect(contexts["sql"]) as store:
        expected = rank(store, query.read_bytes(), featurizer, top=5, save=False)
        assert listed == [m.image_id for m in expected.matches] and len(listed) == 5
        stored = store.db.query("SELECT r.image_id FROM rankings r JOIN queries q ON q.id = r.query_id"
                                " WHERE q.query_name = %s ORDER BY r.rank", (query.name,))
        assert [i for (i,) in stored] == listed  # the server wrote the ranking it returned


@pytest.fixture(scope="module")
def full_pg(pg_server, full_db) -> str:
    """The 557 photos and their features copied from the full SQLite run into PostgreSQL."""
    url = pgserver.create_database(pg_server, "full_copy")
    with SQLiteStore(full_db[0]) as src, PostgresStore(url) as dst:
        for row in src.conn.execute("SELECT id, name, label, format, width, height, mode, size_bytes, sha256,"
                                    " dhash, data FROM images ORDER BY id"):
            dst.db.query("INSERT INTO images (id, name, label, format, width, height, mode, size_bytes, sha256,"
                         " dhash, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", row)
        ids, X = src.features("efficientnet_lite0")
        dst.put_features("efficientnet_lite0", ids, X)
    return url


def test_sql_ranking_equals_the_engines_exact_ranking(full_pg):
    with PostgresStore(full_pg) as store:
        ids, X = store.features("efficientnet_lite0")
        rows = store.images()
        catalogue = Catalogue(ids, [r.name for r in rows], [r.label for r in rows], [r.sha256 for r in rows],
                              [r.dhash for r in rows], X)
        for q in range(0, len(ids), 37):
            exclude = np.zeros(len(ids), dtype=bool)
            exclude[q] = True
            for method in ("l2", "cosine"):
                engine = searcher(catalogue, method, index="exact").search(X[q], 10, exclude)
                found = store.nearest("efficientnet_lite0", X[q], method, 10, [int(ids[q])])
                assert [i for i, _ in found] == [m.image_id for m in engine]
                np.testing.assert_allclose([s for _, s in found], [m.score for m in engine], rtol=1e-4, atol=1e-5)


def recall_at_10(store: PostgresStore, backbone: str, X: np.ndarray, method: str, queries: range) -> float:
    hits = 0
    for q in queries:
        exact = {i for i, _ in store.nearest(backbone, X[q], method, 10, approximate=False)}
        hits += len(exact & {i for i, _ in store.nearest(backbone, X[q], method, 10, approximate=True)})
    return hits / (10 * len(queries))


def test_hnsw_index_recall_on_real_features(full_pg):
    with PostgresStore(full_pg) as store:
        ids, X = store.features("efficientnet_lite0")
        for method in ("l2", "cosine"):
            assert not store.has_index("efficientnet_lite0", method)
            name = store.create_index("efficientnet_lite0", method)
            assert store.has_index("efficientnet_lite0", method)
            with store.db.transaction():
                store.through_index(10)  # as `nearest` plans it
                plan = store.db.query("EXPLAIN " + nearest_statement(1584, method, True),
                                      (X[0].tolist(), "efficientnet_lite0", [int(ids[0])], 10))
            assert f"Index Scan using {name}" in "\n".join(r[0] for r in plan)
            assert recall_at_10(store, "efficientnet_lite0", X, method, range(0, 557, 11)) >= 0.95


def test_hnsw_on_halfvec_above_2000_dimensions(full_pg):
    """ResNet-50's 2048 dimensions exceed HNSW's `vector` limit: the index is on halfvec. Clustered features."""
    rng = np.random.default_rng(0)
    with PostgresStore(full_pg) as store:
        ids = np.array([im.id for im in store.images()])
        centres = rng.normal(size=(20, 2048)).astype(np.float32)
        X = centres[rng.integers(0, 20, len(ids))] + 0.3 * rng.normal(size=(len(ids), 2048)).astype(np.float32)
        store.put_features("resnet50", ids, X)
        store.create_index("resnet50", "l2")
        definition = store.db.query("SELECT indexdef FROM pg_indexes WHERE indexname = 'features_resnet50_l2_hnsw'")
        assert "halfvec(2048)" in definition[0][0]
        assert recall_at_10(store, "resnet50", X, "l2", range(0, len(ids), 13)) >= 0.9


def test_hnsw_on_a_refined_network(full_pg):
    """A refined network's features are indexed like its base's (issue 14); an unknown name is a one-line error."""
    with PostgresStore(full_pg) as store:
        ids, X = store.features("efficientnet_lite0")
        refined = store.create_network("efficientnet_lite0", {"epochs": 1}).name
        X = X[:, :1280]  # a refined network's features have its base's last layer's size
        store.put_features(refined, ids, X[::-1].copy())
        name = store.create_index(refined, "cosine")
        assert name == f"features_{refined}_cosine_hnsw" and store.has_index(refined, "cosine")
        definition = store.db.query("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (name,))[0][0]
        assert "vector(1280)" in definition and f"'{refined}'" in definition
        assert recall_at_10(store, refined, X[::-1], "cosine", range(0, len(ids), 29)) >= 0.9
        with pytest.raises(BadInput, match="unknown backbone 'efficientnet_lite0_refined_99'"):
            store.create_index("efficientnet_lite0_refined_99", "l2")


def test_the_database_ranks_scores_and_learned_as_the_engine(full_pg, full_db, featurizer):
    """Issue 30: the model's rows of scores and learned are stored as vectors and ranked by pgvector's inner
    product: the exact scan gives the engine's exact top 10 and scores, the HNSW index most of it; featurize adds
    the rows of new images; the rows go with their model version."""
    with SQLiteStore(full_db[0]) as src, PostgresStore(full_pg) as store:
        version = store.put_model(src.model())
        model = load_model(store, version)
        assert not store.searchable("efficientnet_lite0", "scores", version)
        assert store_method_vectors(store, model) == 2 * 557 and store_method_vectors(store, model) == 0
        ids, X = store.features("efficientnet_lite0")
        catalogue = Catalogue.from_store(store, "efficientnet_lite0")
        served = Service(store, featurizer, interval=0, featurize_added=False).current  # the web service's
        for method in ("scores", "learned"):
            db = store_searcher(store, "efficientnet_lite0", method, model, index="exact")
            assert db.strategy == served.searcher(method).strategy == "database"
            engine = searcher(catalogue, method, model, index="exact")
            for q in range(0, len(ids), 37):
                exclude = np.zeros(len(ids), dtype=bool)
                exclude[q] = True
                deeper = engine.search(X[q], 20, exclude)
                want, exact = deeper[:10], {m.image_id: m.score for m in deeper}
                for got in (db.search(X[q], 10, exclude), served.searcher(method).search(X[q], 10, exclude)):
                    np.testing.assert_allclose([m.score for m in got], [m.score for m in want], rtol=0, atol=2e-6)
                    # the same images in the same order, but for images whose exact scores tie within pgvector's
                    # float32 rounding (2e-6), which may trade places (seen with AVX2 kernels)
                    for mine, theirs in zip(got, want):
                        assert mine.image_id == theirs.image_id or abs(
                            exact.get(mine.image_id, -np.inf) - theirs.score) <= 2e-6, (method, q)
            name = store.create_index("efficientnet_lite0", method, version)
            with store.db.transaction():
                store.through_index(10)  # as `nearest` plans it
                plan = store.db.query("EXPLAIN " + nearest_statement(int(db.method.matrix(X[:1]).shape[1]), method,
                                                                     True),
                                      (db.method.vectors(X[:1])[0].tolist(), version, method, [], 10))
            assert f"Index Scan using {name}" in "\n".join(r[0] for r in plan)
            approximate = store_searcher(store, "efficientnet_lite0", method, model, index="hnsw")
            hits = sum(len({m.image_id for m in approximate.search(X[q], 10)} & {m.image_id for m in
                                                                                 db.search(X[q], 10)})
                       for q in range(0, len(ids), 11))
            assert hits / (10 * len(range(0, len(ids), 11))) >= 0.9, method
        gone = [int(i) for i in ids[:3]]
        store.db.query("DELETE FROM method_vectors WHERE image_id = ANY(%s)", (gone,))
        assert not store.searchable("efficientnet_lite0", "scores", version)  # then rank reads them into memory
        assert store_searcher(store, "efficientnet_lite0", "scores", model).strategy == "exact"
        store.db.query("DELETE FROM features WHERE image_id = ANY(%s)", (gone,))
        assert featurize(store, featurizer, progress=False).added == 3
        assert store.method_vector_ids(version, "learned") >= set(gone)
        assert store.searchable("efficientnet_lite0", "learned", version)
        store.db.query("DELETE FROM models WHERE version = %s", (version,))
        assert store.db.query("SELECT COUNT(*) FROM method_vectors") == [(0,)]


def test_vectors_are_written_bit_for_bit_and_rows_already_there_kept(full_pg, full_db):
    """Features and rows of scores and learned go in by binary COPY: read back, every float32 is the one written,
    to the bit (odd values too); a row already stored is kept, and only missing ones are added."""
    with SQLiteStore(full_db[0]) as src, PostgresStore(full_pg) as store:
        ids, X = src.features("efficientnet_lite0")
        stored_ids, stored = store.features("efficientnet_lite0")  # full_pg wrote them by put_features
        assert np.array_equal(stored_ids, ids) and np.array_equal(stored.view(np.uint32), X.view(np.uint32))
        model = load_model(store, store.put_model(src.model()))

        def rows(version: int, method: str) -> tuple[list[int], np.ndarray]:
            found = store.db.query("SELECT image_id, vector_dims(embedding), vector_send(embedding) FROM"
                                   " method_vectors WHERE model_version = %s AND method = %s ORDER BY image_id",
                                   (version, method))
            return [int(r[0]) for r in found], POSTGRES.vectors([r[2] for r in found], int(found[0][1]))

        assert store_method_vectors(store, model) == 2 * len(ids)
        for method in STORED_METHODS:
            want = Method(method, model).matrix(X)
            got_ids, got = rows(model.version, method)
            assert got_ids == ids.tolist() and np.array_equal(got.view(np.uint32), want.view(np.uint32)), method
        odd = np.array([[-0.0, np.float32(1e-45), np.finfo(np.float32).max, -np.finfo(np.float32).tiny],
                        [1 / 3, -2.5e-38, 7.0, np.nextafter(np.float32(1), np.float32(2))]], np.float32)
        version = store.put_model(src.model())
        store.put_method_vectors(version, "learned", ids[:2], odd)
        store.put_method_vectors(version, "learned", ids[1:3], odd[::-1] + 1)  # ids[1] is kept, ids[2] added
        got_ids, got = rows(version, "learned")
        assert got_ids == ids[:3].tolist()
        assert np.array_equal(got.view(np.uint32), np.vstack([odd, odd[:1] + 1]).view(np.uint32))


def test_hnsw_searches_look_at_ef_search_candidates(full_pg, tmp_path, capsys):
    """An HNSW search looks at max(EF_SEARCH, 40 x top) candidates, at most 1000, or as many as asked (from top to
    1000): the hnsw.ef_search the server has in the search's transaction, from the store, a searcher and the CLI."""
    with PostgresStore(full_pg) as store:
        ids, X = store.features("efficientnet_lite0")
        store.create_index("efficientnet_lite0", "cosine")

        def seen(search) -> str:
            with store.db.transaction():  # the search's transaction is a savepoint of this one: its settings stay
                search()
                return store.db.query("SHOW hnsw.ef_search")[0][0]

        def nearest(top: int, **options):
            return lambda: store.nearest("efficientnet_lite0", X[0], "cosine", top, [int(ids[0])], **options)

        assert seen(nearest(10, approximate=True)) == str(EF_SEARCH)
        assert seen(nearest(30, approximate=True)) == str(EF_SEARCH_MAX)
        assert seen(nearest(10, approximate=True, ef_search=123)) == "123"
        assert seen(nearest(10, approximate=False, ef_search=123)) == "40"  # a scan sets nothing: pgvector's own
        hnsw = store_searcher(store, "efficientnet_lite0", "cosine", index="hnsw", ef_search=77)
        assert hnsw.strategy == "database" and seen(lambda: hnsw.search(X[0], 10)) == "77"
        assert len(hnsw.search(X[0], 10)) == 10
        for wrong in (9, EF_SEARCH_MAX + 1):
            with pytest.raises(BadInput, match=f"from top \\(10\\) to {EF_SEARCH_MAX}, got {wrong}"):
                store.nearest("efficientnet_lite0", X[0], "cosine", 10, approximate=True, ef_search=wrong)
        query = tmp_path / "query.jpg"
        query.write_bytes(store.db.query("SELECT data FROM images ORDER BY id LIMIT 1")[0][0])
    rank_hnsw = ["rank", str(query), "--db", full_pg, "--method", "cosine", "--index", "hnsw", "--json"]
    assert cli.main([*rank_hnsw, "--ef-search", "5"]) == 1
    assert "ef_search must be from top (10) to 1000, got 5" in capsys.readouterr().err
    assert cli.main([*rank_hnsw, "--ef-search", "50"]) == 0 and '"method": "cosine"' in capsys.readouterr().out


def test_the_database_search_benchmark_measures_every_method(pg_server, full_db):
    """benchmarks/database_search.py at a small generated size: the database's exact scan answers as the engine for
    every method at both sizes, and the HNSW figures are there."""
    spec = importlib.util.spec_from_file_location("database_search", REPO / "benchmarks" / "database_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(full_db[0], pgserver.create_database(pg_server, "benchmark"), 1500, 4)
    assert list(result["sizes"]) == ["557", "2057"] and result["queries"] == 4
    for size, figures in result["sizes"].items():
        assert set(figures) == set(METHODS) and all(row["db_exact_equals_memory"] for row in figures.values())
        assert all(row["memory_ms"] > 0 and row["db_exact_ms"] > 0 for row in figures.values())
        indexed = {m for m, row in figures.items() if "recall@10" in row}
        assert indexed == (set(METHODS) if size == "557" else {"scores", "learned"})
        assert all(0 < figures[m][f"recall@10{ef}"] <= 1 for m in indexed
                   for ef in ("", *(f"_ef{ef}" for ef in bench.EF_SEARCH)))
        assert figures["scores"]["row_bytes"] > 4 * 1584 > 4 * figures["learned"]["row_bytes"]
        space = result["bytes_per_image"][size]  # features and both methods' rows: each more than 1584 float32s
        assert space["features"] > 4 * 1584 and space["method_vectors"] > 4 * 1584 and space["method_vectors_pkey"] > 0
    assert result["load_images_per_s"] == 1500 / result["generate_s"]


def test_bad_query_empty_catalogue_and_missing_model_are_one_line_errors(database, small_dir, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    good = sorted((small_dir / "dotted").iterdir())[0]
    assert cli.main(["rank", str(good), "--db", database, "--context", "sql"]) == 1
    assert "empty catalogue" in capsys.readouterr().err
    assert cli.main(["ingest", str(small_dir), "--db", database, "-q"]) == 0
    capsys.readouterr()
    for argv, message in [(["evaluate"], "no trained model"), (["train"], "no train/test split"),
                          (["rank", str(text)], "not an image")]:
        assert cli.main([*argv, "--db", database, "--context", "sql"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("image-similarity: error: image_similarity: ") and err.count("\n") == 1, err
        assert message in err
    with connect(database) as store:
        assert len(store.images()) == 36 and store.feature_counts() == {} and store.db.query(
            "SELECT count(*) FROM models") == [(0,)]


def _featurize_in_server(url: str, batch_size: int, result: dict, key: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        result[key + "_pid"] = conn.info.backend_pid
        try:
            result[key] = conn.execute("CALL image_similarity.featurize_images(batch_size => %s)",
                                       (batch_size,)).fetchone()
        except psycopg.Error as err:
            result[key] = err


def _features_rows(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT image_id) FROM features").fetchone()


def test_dropped_connection_mid_featurize_loses_nothing_and_resumes(database, small_dir, featurizer):
    with PostgresStore(database) as store:
        ingest(store, small_dir, progress=False)
    result: dict = {}
    worker = threading.Thread(target=_featurize_in_server, args=(database, 4, result, "first"))
    worker.start()
    assert pgserver.wait_until(lambda: _features_rows(database)[0] >= 8)
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (result["first_pid"],))
    worker.join()
    assert isinstance(result["first"], psycopg.Error)  # the call died with its connection
    done, _ = _features_rows(database)
    assert 8 <= done < 36 and done % 4 == 0  # whole batches were committed, nothing half-written
    _featurize_in_server(database, 4, result, "again")
    assert result["again"][0] == 36 - done
    with PostgresStore(database) as store:
        ids, X = store.features("efficientnet_lite0")
        assert len(ids) == len(set(ids)) == 36
        expected = featurizer.forward(np.stack([featurizer.prepare(store.image_bytes(int(ids[5])))]))
        np.testing.assert_allclose(X[5], expected[0], atol=1e-4)


def test_two_clients_featurizing_at_once(database, small_dir):
    with PostgresStore(database) as store:
        ingest(store, small_dir, progress=False)
    result: dict = {}
    workers = [threading.Thread(target=_featurize_in_server, args=(database, 4, result, key)) for key in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not isinstance(result["a"], Exception) and not isinstance(result["b"], Exception)
    assert _features_rows(database) == (36, 36)


def test_client_featurize_then_server_agrees(database, small_dir, featurizer):
    """The client's store writes vectors the server reads back bit for bit (pgvector keeps float32)."""
    with PostgresStore(database) as store:
        ingest(store, small_dir, progress=False)
        featurize(store, featurizer, batch_size=16, progress=False)
        ids, X = store.features(featurizer.backbone)
        assert ingest(store, small_dir, progress=False).added == 0  # re-running is safe
    with psycopg.connect(database) as conn:
        text = conn.execute("SELECT embedding::text FROM features WHERE image_id = %s", (int(ids[0]),)).fetchone()[0]
    assert np.array_equal(np.array(text.strip("[]").split(","), dtype=np.float32), X[0])


def test_password_in_url_is_refused_and_a_dead_server_is_one_line():
    with pytest.raises(StoreError, match="PGPASSWORD"):
        PostgresStore("postgresql://me:secret@127.0.0.1:1/db")
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL at 127.0.0.1:1"):
        PostgresStore("postgresql://me@127.0.0.1:1/db")


def test_routines_are_one_call_into_the_package():
    sql = (pgserver.REPO / "SQLR" / "postgres" / "02_Routines.sql").read_text()
    routines = re.findall(r"CREATE OR REPLACE (?:FUNCTION|PROCEDURE) image_similarity\.(\w+)\((.*?)\)\n.*?"
                          r"AS \$\$\n(.*?)\$\$;", sql, re.DOTALL)
    assert len(routines) == 10  # 8 steps, compute_neighbors (issue 17), refine_model (issue 14)
    inputs = {}
    for name, params, body in routines:
        declared = [p.split() for p in params.split(",") if p.strip()]
        inputs[name] = [p[0] for p in declared if p[0] not in ("OUT", "INOUT")]
        assert body == (f"from image_similarity.contexts import plpython\n"
                        f"return plpython.{name}({', '.join(['plpy', *inputs[name]])})\n"), name
        assert callable(getattr(plpython, name))
    for procedure, statement in POSTGRES_ROUTINES.items():
        routine = re.search(r"image_similarity\.(\w+)", statement).group(1)
        assert set(PROCEDURES[procedure]) <= set(inputs[routine]), procedure


def test_add_image_in_sql_validates_and_records(database, small_dir):
    photo = min((small_dir / "striped").iterdir())
    with psycopg.connect(database, autocommit=True) as conn:
        add = "SELECT * FROM image_similarity.add_image(%s, %s, %s)"
        image_id, reason = conn.execute(add, ("striped/a.jpg", "striped", photo.read_bytes())).fetchone()
        assert image_id == 1 and reason is None
        assert conn.execute(add, ("striped/a.jpg", "striped", photo.read_bytes())).fetchone() == (None, None)
        image_id, reason = conn.execute(add, ("x'); DROP TABLE images; --", "dotted", b"GIF89a nope")).fetchone()
        assert image_id is None and "not an image" in reason
        assert conn.execute("SELECT name, stage FROM rejected_files").fetchall() == [
            ("x'); DROP TABLE images; --", "ingest")]
        assert conn.execute("SELECT count(*) FROM images").fetchone() == (1,)
