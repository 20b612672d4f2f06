"""Schema migrations (issue 29): a database made by the code before issue 29 (tests/support/schema_v1.py) is
upgraded in place when a store opens it, keeps its rows and references, and then takes unlabelled images, keys and
metadata; SQL Server's migration script leaves a new database alone. PostgreSQL tests skip with the reason where
PostgreSQL 15 with pgvector is missing (failing under CI)."""
from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from support import pgserver, schema_v1, tsql

from image_similarity.errors import StoreError
from image_similarity.store import NewImage, SQLiteStore
from image_similarity.store.mssql import MSSQLStore
from image_similarity.store.postgres import PostgresStore
from image_similarity.store.schema import SCHEMA_VERSION

SQLR = Path(__file__).resolve().parents[1] / "SQLR"


def new_image(data: bytes, key: str | None, label: str | None = None, metadata: dict | None = None) -> NewImage:
    sha = hashlib.sha256(data).hexdigest()
    return NewImage("x.jpg", label, data, "JPEG", 2, 1, "RGB", sha, sha, key, metadata)


@pytest.fixture(params=("sqlite", "postgresql"))
def old_database(request, tmp_path, sample_dir):
    """A function opening a store on a database the old code made and filled (schema version 1)."""
    if request.param == "sqlite":
        path = tmp_path / "v1.sqlite"
        with sqlite3.connect(path) as conn:
            conn.executescript(schema_v1.sqlite_script())
            schema_v1.fill(conn.execute, sample_dir)
        yield lambda: SQLiteStore(path)
    else:
        import psycopg

        url = pgserver.create_database(request.getfixturevalue("pg_server"), pgserver.database_name(request.node.name),
                                       routines=False)
        with psycopg.connect(url) as conn:
            conn.execute(schema_v1.postgres_script())
            schema_v1.fill(conn.execute, sample_dir, "%s")
        yield lambda: PostgresStore(url)


def versions(store) -> list[int]:
    return [int(v) for (v,) in store.db.query(store.d.sql("SELECT version FROM {schema_version} ORDER BY version"))]


def test_an_old_database_is_migrated_in_place_and_keeps_working(old_database, sample_dir):
    before = schema_v1.photos(sample_dir, 2)
    with old_database() as store:
        assert versions(store) == list(range(1, SCHEMA_VERSION + 1))
        rows = store.images()
        assert [(r.id, r.name, r.label, r.sha256, r.key, r.metadata) for r in rows] == \
            [(i, name, label, sha, None, None) for i, (name, label, _, sha) in enumerate(before, 1)]
        assert store.image_bytes(5) == before[4][2]
        assert store.features("efficientnet_lite0")[0].tolist() == [1, 2, 3, 4]
        assert store.neighbors(1, "efficientnet_lite0", "l2", 0) == [(1, 2, before[1][0], before[1][1], -0.5)]
        # what the migration makes possible: an unlabelled item with a key and metadata, the same bytes under two keys
        a = store.add_image(new_image(before[0][2], "sku-1", None, {"title": "Spotted scarf", "price": 9.5}))
        b = store.add_image(new_image(before[0][2], "sku-2"))
        assert a == 7 and b == 8 and store.find_key("sku-1") == store.images()[6]
        seventh = store.images()[6]
        assert seventh.label is None and seventh.metadata == {"title": "Spotted scarf", "price": 9.5}
        assert store.add_image(new_image(before[0][2], None)) is None  # keyless: identical bytes stored already
        # the references still cascade: removing image 2 takes its features and the neighbour row naming it
        assert store.remove_image(2) and store.features("efficientnet_lite0")[0].tolist() == [1, 3, 4]
        assert store.neighbors(1, "efficientnet_lite0", "l2", 0) == []
    with old_database() as store:  # opened again: nothing more to migrate
        assert versions(store) == list(range(1, SCHEMA_VERSION + 1)) and len(store.images()) == 7


@pytest.mark.parametrize("kind", ("sqlite", "postgresql"))
def test_a_version_2_database_takes_openvino_vectors_and_keeps_what_it_recorded(kind, request, tmp_path, sample_dir):
    if kind == "sqlite":
        path = tmp_path / "v2.sqlite"
        with sqlite3.connect(path) as conn:
            conn.executescript(schema_v1.sqlite_script(2))
            schema_v1.fill(conn.execute, sample_dir)
            conn.execute("INSERT INTO feature_runtimes VALUES (1, 'efficientnet_lite0', 'onnxruntime', 'abc')")
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                conn.execute("INSERT INTO feature_runtimes VALUES (2, 'efficientnet_lite0', 'openvino', 'abc')")
        opened = lambda: SQLiteStore(path)  # noqa: E731
    else:
        import psycopg

        url = pgserver.create_database(request.getfixturevalue("pg_server"), pgserver.database_name(request.node.name),
                                       routines=False)
        with psycopg.connect(url) as conn:
            conn.execute(schema_v1.postgres_script(2))
            schema_v1.fill(conn.execute, sample_dir, "%s")
            conn.execute("INSERT INTO feature_runtimes VALUES (1, 'efficientnet_lite0', 'onnxruntime', 'abc')")
        opened = lambda: PostgresStore(url)  # noqa: E731
    with opened() as store:
        assert versions(store) == [2, 3] == [2, SCHEMA_VERSION]
        assert store.feature_runtimes("efficientnet_lite0") == {("onnxruntime", "abc"): 1}
        store.put_features("efficientnet_lite0", [5], np.ones((1, 3), np.float32), "fp32", ("openvino", "abc"))
        assert store.feature_runtimes("efficientnet_lite0") == {("onnxruntime", "abc"): 1, ("openvino", "abc"): 1}
        assert store.remove_image(1)  # the rebuilt table's reference still cascades
        assert store.feature_runtimes("efficientnet_lite0") == {("openvino", "abc"): 1}
    with opened() as store:
        assert versions(store) == [2, 3]


def test_a_key_is_unique_and_a_new_database_starts_at_the_current_version(tmp_path, sample_dir):
    data, other = (p[2] for p in schema_v1.photos(sample_dir, 1)[:2])
    with SQLiteStore(tmp_path / "new.sqlite") as store:
        assert versions(store) == [SCHEMA_VERSION]
        store.add_image(new_image(data, "k"))
        second = store.add_image(new_image(other, None))
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed: images.item_key"):
            store.db.query("UPDATE images SET item_key = 'k' WHERE id = ?", (second,))
    with sqlite3.connect(tmp_path / "new.sqlite") as conn:
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 'now')", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this release's"):
        SQLiteStore(tmp_path / "new.sqlite")


def test_the_sql_server_migration_leaves_a_new_or_migrated_database_alone(sample_dir):
    server = tsql.Server()
    scripts = sorted(SQLR.glob("[0-9][0-9]_*.sql"))
    assert [s.name for s in scripts[:3]] == ["01_CreateDatabase.sql", "02_Migrate.sql", "02_Tables.sql"]
    tsql.install(server, scripts[1:3])
    tsql.install(server, scripts[1:3])  # re-run: nothing changes
    with MSSQLStore("mssql://emulated/ImageSimilarity", connection=tsql.Client(server)) as store:
        assert versions(store) == [SCHEMA_VERSION]
        data = schema_v1.photos(sample_dir, 1)[0][2]
        assert [store.add_image(new_image(data, k)) for k in (None, None, "a", "b", "a")] == [1, None, 2, 3, None]


def test_the_sql_server_setup_upgrades_a_database_the_old_setup_made(sample_dir):
    server = tsql.Server()
    scripts = sorted(SQLR.glob("[0-9][0-9]_*.sql"))[1:]  # as the setup runs them (entrypoints/sqlserver.py)
    server.run_script(schema_v1.sqlserver_script((SQLR / "02_Tables.sql").read_text()))
    cur = tsql.Client(server).cursor()
    schema_v1.fill(lambda sql, params=(): cur.execute(sql, *params), sample_dir)
    cur.execute("INSERT INTO dbo.models (backbone, classes, params) VALUES ('efficientnet_lite0', ?, '{}')",
                '["dotted", "leopard", "striped"]')
    cur.execute("INSERT INTO dbo.model_arrays (version, name, dtype, shape, data) VALUES (1, 'w', 'float32', '[3]', ?)",
                bytes(12))
    with pytest.raises(tsql.SqlError, match="NOT NULL constraint failed: images.label"):  # the old schema
        cur.execute("INSERT INTO dbo.images (name, label, format, width, height, mode, size_bytes, sha256, dhash, data)"
                    " VALUES ('u', NULL, 'JPEG', 1, 1, 'RGB', 1, 'a', 'a', 0x00)")
    tables = [t for (t,) in server.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                " AND name NOT LIKE 'sqlite%' AND name NOT LIKE 'tsql%'")]
    before = {t: server.conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables}

    tsql.install(server, scripts)
    upgraded = {t: server.conn.execute(f"SELECT * FROM {t}").fetchall() for t in before}
    assert upgraded["images"] == [row + (None, None) for row in before["images"]]  # item_key, metadata added
    assert {t: rows for t, rows in upgraded.items() if t != "images"} == \
        {t: rows for t, rows in before.items() if t != "images"} and len(upgraded["features"]) == 4
    assert [v for (v,) in server.conn.execute("SELECT version FROM schema_version ORDER BY version")] == \
        list(range(1, SCHEMA_VERSION + 1))
    assert "feature_runtimes" in server.tables  # what later releases added is created beside

    def schema() -> list[tuple]:
        return server.conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    migrated, rows = schema(), {t: server.conn.execute(f"SELECT * FROM {t}").fetchall() for t in server.tables}
    tsql.install(server, scripts)  # re-run: a no-op
    assert schema() == migrated and rows == {t: server.conn.execute(f"SELECT * FROM {t}").fetchall()
                                             for t in server.tables}
    fresh = tsql.Server()
    tsql.install(fresh, scripts)  # the tables, indexes and constraints of a new database, schema_version's included
    assert migrated == fresh.conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    tables_only = tsql.Server()
    tsql.install(tables_only, [SQLR / "02_Tables.sql"])  # 02_Migrate.sql's schema_version is 02_Tables.sql's
    definition = "SELECT sql FROM sqlite_master WHERE name = 'schema_version'"
    assert tables_only.conn.execute(definition).fetchall() == fresh.conn.execute(definition).fetchall()

    photos = schema_v1.photos(sample_dir, 3)
    first, new = photos[0], photos[2]  # photos[2]: a dotted photo the old database does not hold
    _, out = server.call("AddImage", name="new.jpg", label=None, data=new[2], image_id=None)
    assert out["image_id"] == 7 and server.conn.execute("SELECT label FROM images WHERE id = 7").fetchone() == (None,)
    _, out = server.call("AddImage", name="again.jpg", label="dotted", data=first[2], image_id=None, item_key="sku-1",
                         metadata='{"title": "Spotted scarf"}')
    assert out["image_id"] == 8  # identical bytes under another name: a new item with its key
    _, out = server.call("AddImage", name="again2.jpg", data=first[2], image_id=None, item_key="sku-2")
    assert out["image_id"] == 9
    with MSSQLStore("mssql://emulated/ImageSimilarity", connection=tsql.Client(server)) as store:
        assert versions(store) == list(range(1, SCHEMA_VERSION + 1))
        assert store.find_key("sku-1").metadata == {"title": "Spotted scarf"} and store.image_bytes(1) == first[2]
        with pytest.raises(tsql.SqlError, match="UNIQUE constraint failed: images.item_key"):
            store.db.query("UPDATE dbo.images SET item_key = 'sku-1' WHERE id = 9")


def test_the_sql_server_setup_upgrades_a_version_2_database(sample_dir):
    """To 3 (issue 28's OpenVINO): the runtime's CHECK, which SQL Server named itself, is found in
    sys.check_constraints and replaced by the named one that takes 'openvino'; the rows are kept."""
    server = tsql.Server()
    scripts = sorted(SQLR.glob("[0-9][0-9]_*.sql"))[1:]
    server.run_script(schema_v1.sqlserver_script((SQLR / "02_Tables.sql").read_text(), 2))
    cur = tsql.Client(server).cursor()
    schema_v1.fill(lambda sql, params=(): cur.execute(sql, *params), sample_dir)
    insert = "INSERT INTO dbo.feature_runtimes (image_id, backbone, runtime, network_hash) VALUES (?, ?, ?, 'abc')"
    cur.execute(insert, 1, "efficientnet_lite0", "onnxruntime")
    with pytest.raises(tsql.SqlError, match="CHECK constraint failed"):
        cur.execute(insert, 2, "efficientnet_lite0", "openvino")
    tsql.install(server, scripts)
    cur.execute(insert, 2, "efficientnet_lite0", "openvino")
    with pytest.raises(tsql.SqlError, match="CHECK constraint failed"):
        cur.execute(insert, 3, "efficientnet_lite0", "cuda")
    assert server.conn.execute("SELECT image_id, runtime FROM feature_runtimes ORDER BY image_id").fetchall() == [
        (1, "onnxruntime"), (2, "openvino")]
    assert [v for (v,) in server.conn.execute("SELECT version FROM schema_version ORDER BY version")] == [2, 3]
    assert server.conn.execute("SELECT name, parent_column_id FROM check_constraints WHERE name LIKE '%runtime%'"
                               ).fetchall() == [("ck_feature_runtimes_runtime", 0)]
    migrated = server.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'feature_runtimes'").fetchall()
    tsql.install(server, scripts)  # re-run: a no-op
    assert server.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'feature_runtimes'").fetchall() == migrated
