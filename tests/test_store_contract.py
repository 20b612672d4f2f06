"""One contract, every store: the same behaviours on SQLite, on a live PostgreSQL (skipped with the reason where
PostgreSQL 15 with pgvector is missing, failing under CI) and on SQL Server through the emulation of
tests/support/tsql.py (SQLR/02_Tables.sql's tables, every statement run as T-SQL); and SQLR/02_Tables.sql checked
against the schema declared once in store/schema.py."""
from __future__ import annotations

import hashlib
import math
import re
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import pgserver, tsql

from image_similarity.errors import NotFound, NotReady
from image_similarity.pipeline.ingest import ingest_view
from image_similarity.store import (
    PROCEDURES,
    VECTOR_SEARCH,
    EvaluationRecord,
    ModelRecord,
    NewImage,
    SQLiteStore,
    StoreError,
)
from image_similarity.store.mssql import MSSQLStore
from image_similarity.store.postgres import PostgresStore
from image_similarity.store.schema import (
    BYTES,
    FLOAT,
    ID,
    INT,
    JSON,
    SERVER_CASCADES_SKIPPED,
    TABLES,
    TEXT,
    TIME,
    VECTOR,
    key_of,
    references,
)

TABLES_SQL = Path(__file__).resolve().parents[1] / "SQLR" / "02_Tables.sql"
BACKBONE = "efficientnet_lite0"
STORES = ("sqlite", "postgresql", "sqlserver")


def sql_server() -> tsql.Server:
    server = tsql.Server()
    tsql.install(server, [TABLES_SQL])
    return server


@pytest.fixture(params=STORES)
def opener(request, tmp_path):
    """A function that opens (another connection to) one fresh database of the kind under test."""
    if request.param == "sqlite":
        yield lambda: SQLiteStore(tmp_path / "contract.sqlite")
    elif request.param == "postgresql":
        url = pgserver.create_database(request.getfixturevalue("pg_server"), pgserver.database_name(request.node.name),
                                       routines=False)
        yield lambda: PostgresStore(url)
    else:
        server = sql_server()
        yield lambda: MSSQLStore("mssql://emulated/ImageSimilarity", connection=tsql.Client(server))


@pytest.fixture
def store(opener):
    with opener() as opened:
        yield opened


def photos(sample_dir: Path, n: int) -> list[NewImage]:
    """The first n bundled photos of each class, as ingest would store them (hashes of the real bytes)."""
    images = []
    for label in ("dotted", "leopard", "striped"):
        for path in sorted((sample_dir / label).iterdir())[:n]:
            data = path.read_bytes()
            images.append(NewImage(f"{label}/{path.name}", label, data, "JPEG", 2, 1, "RGB",
                                   hashlib.sha256(data).hexdigest(), hashlib.sha256(data).hexdigest()))
    return images


def vectors(n: int, dim: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_images_are_added_once_and_rejections_recorded_once(store, sample_dir):
    images = photos(sample_dir, 2)
    ids = [store.add_image(im) for im in images]
    assert ids == sorted(ids) and len(set(ids)) == 6
    assert store.add_image(images[0]) is None  # the same bytes again
    assert store.find_sha256(images[3].sha256).id == ids[3] and store.find_sha256("0" * 64) is None
    assert [(r.id, r.name, r.label) for r in store.images()] == [(i, im.name, im.label) for i, im in zip(ids, images)]
    assert store.image_bytes(ids[4]) == images[4].data
    with pytest.raises(NotFound, match=f"no image with id {ids[-1] + 1}"):
        store.image_bytes(ids[-1] + 1)
    for _ in range(2):
        store.record_rejected("x/bad.jpg", "x", "not an image", "ingest")
    store.record_rejected("x/bad.jpg", "x", "not an image", "featurize")
    assert store.rejected() == [("x/bad.jpg", "x", "ingest", "not an image"),
                                ("x/bad.jpg", "x", "featurize", "not an image")]


def test_features_are_kept_exactly_and_read_by_id(store, sample_dir):
    ids = [store.add_image(im) for im in photos(sample_dir, 3)]
    stamp = store.catalogue_stamp(BACKBONE)
    assert stamp == (0, 0, 0, 0)
    batches = list(store.missing_features(BACKBONE, 4))
    assert [[i for i, _ in b] for b in batches] == [ids[:4], ids[4:8], ids[8:]]
    assert batches[0][1][1] == store.image_bytes(ids[1])
    assert [i for b in store.missing_features(BACKBONE, 2, (ids[2], ids[4])) for i, _ in b] == ids[2:5]
    X = vectors(9)
    store.put_features(BACKBONE, ids[:5], X[:5], "bf16", ("torch", "a" * 16))
    store.put_features(BACKBONE, ids[3:], X[3:] + 1, "fp32", ("openvino", "a" * 16))  # the first two rows are
    # there: kept as they were, with what computed them
    assert [i for b in store.missing_features(BACKBONE, 4) for i, _ in b] == []
    found, matrix = store.features(BACKBONE)
    assert found.tolist() == ids and matrix.dtype == np.float32
    assert np.array_equal(matrix, np.concatenate([X[:5], X[5:] + 1]))
    some, subset = store.features(BACKBONE, [ids[7], ids[1], ids[4], 10 ** 6])
    assert some.tolist() == [ids[1], ids[4], ids[7]] and np.array_equal(subset, matrix[[1, 4, 7]])
    assert store.features(BACKBONE, [])[0].size == 0 and store.features("resnet50")[1].shape == (0, 0)
    assert store.feature_counts() == {BACKBONE: 9}
    assert store.feature_dim(BACKBONE) == X.shape[1] and store.feature_dim("resnet50") is None
    assert store.feature_precisions(BACKBONE) == {"bf16": 5, "fp32": 4}
    assert store.feature_runtimes(BACKBONE) == {("torch", "a" * 16): 5, ("openvino", "a" * 16): 4}
    assert store.catalogue_stamp(BACKBONE) == (0, 0, 9, ids[-1])


def test_split_models_evaluations_and_rankings(store, sample_dir):
    ids = [store.add_image(im) for im in photos(sample_dir, 1)]
    store.put_split({ids[0]: "train", ids[1]: "test"}, 1, 0.5)
    store.put_split({ids[1]: "train", ids[2]: "test"}, 2, 0.5)  # replaces the first split
    assert store.split() == {ids[1]: "train", ids[2]: "test"}
    with pytest.raises(NotReady, match="no trained model: run 'image-similarity train' first"):
        store.model()
    arrays = {"coef": vectors(3, 4), "intercept": np.arange(3, dtype=np.float64), "classes": np.array([1, 2], ">i4")}
    first = store.put_model(ModelRecord(BACKBONE, ["dotted", "leopard", "striped"], arrays, {"C": 0.5}))
    second = store.put_model(ModelRecord("resnet50", ["a"], {"w": np.ones(2, np.float32)}, {"C": 1.0}))
    assert second > first and store.model().version == second and store.model().backbone == "resnet50"
    model = store.model(first)
    assert model.classes == ["dotted", "leopard", "striped"] and model.params == {"C": 0.5} and model.created_at
    assert set(model.arrays) == set(arrays)
    for name, array in arrays.items():
        assert np.array_equal(model.arrays[name], array) and model.arrays[name].dtype == array.dtype.newbyteorder("<")
    with pytest.raises(NotReady, match=f"no model version {second + 1}"):
        store.model(second + 1)
    assert store.evaluation() is None
    record = EvaluationRecord(first, {"per_class": {"dotted": math.nan, "leopard": 0.5}, "n": 3},
                              [("test", "accuracy", "dotted", math.nan), ("test", "accuracy", "leopard", 0.5)],
                              [("test", "dotted", "leopard", 2)])
    eid = store.put_evaluation(record)
    later = store.put_evaluation(EvaluationRecord(second, {"n": 1}, [], []))
    got = store.evaluation(first)
    assert got.id == eid and later > eid and store.evaluation().id == later and got.created_at
    assert got.summary == {"per_class": {"dotted": None, "leopard": 0.5}, "n": 3}  # undefined figures are null
    assert got.metrics == [("test", "accuracy", "leopard", 0.5)] and got.confusion == [("test", "dotted", "leopard", 2)]
    assert store.catalogue_stamp(BACKBONE)[:2] == (second, later)
    query = {"name": "q.jpg", "sha256": "c" * 64, "method": "l2", "backbone": BACKBONE}
    qid = store.put_ranking(query, [(1, ids[2], 0.5), (2, ids[0], 0.25)])
    assert store.put_ranking({**query, "model_version": first}, []) > qid


def test_remove_image_takes_what_names_it(store, sample_dir):
    ids = [store.add_image(im) for im in photos(sample_dir, 1)]
    store.put_features(BACKBONE, ids, vectors(3), "fp32", ("torch", "b" * 16))
    store.put_split({i: "train" for i in ids}, 0, 0.0)
    store.put_neighbors(BACKBONE, "l2", 0, [(ids[0], 1, ids[1], -1.0), (ids[1], 1, ids[0], -1.0),
                                            (ids[2], 1, ids[1], -2.0)])
    store.put_ranking({"name": "q", "sha256": "c" * 64, "method": "l2", "backbone": BACKBONE}, [(1, ids[1], -1.0)])
    before = store.catalogue_stamp(BACKBONE)
    assert store.remove_image(ids[1]) and not store.remove_image(ids[1])
    assert [r.id for r in store.images()] == [ids[0], ids[2]] and store.feature_counts() == {BACKBONE: 2}
    assert store.split() == {ids[0]: "train", ids[2]: "train"} and store.feature_precisions(BACKBONE) == {"fp32": 2}
    assert store.feature_runtimes(BACKBONE) == {("torch", "b" * 16): 2}
    assert store.neighbor_ids(BACKBONE, "l2", 0) == set() and store.neighbors(ids[0], BACKBONE, "l2", 0) == []
    assert store.catalogue_stamp(BACKBONE) != before


def test_items_with_keys_share_bytes_and_a_key_with_new_bytes_replaces_its_image(store, sample_dir):
    """Issue 29: keys are unique, identical bytes may serve several keys, labels may be missing; a key ingested
    again with other bytes replaces its row (a new id) and what was computed from the old one, in one transaction."""
    first, second, third = (replace(im, label=None if i else im.label, key=f"sku-{i}", metadata={"title": f"t{i}"})
                            for i, im in enumerate(photos(sample_dir, 1)))
    ids = [store.add_image(im) for im in (first, second, replace(second, key="sku-x", metadata=None))]
    assert len(set(ids)) == 3 and store.add_image(second) is None  # the same key and bytes: nothing changes
    assert store.add_image(replace(second, key=None)) is None  # keyless: these bytes are stored
    assert [(r.label, r.key, r.metadata) for r in store.images()] == [
        ("dotted", "sku-0", {"title": "t0"}), (None, "sku-1", {"title": "t1"}), (None, "sku-x", None)]
    store.put_features(BACKBONE, ids, vectors(3))
    store.put_neighbors(BACKBONE, "l2", 0, [(ids[0], 1, ids[1], -1.0), (ids[1], 1, ids[0], -1.0)])
    store.put_ranking({"name": "q", "sha256": "c" * 64, "method": "l2", "backbone": BACKBONE}, [(1, ids[1], -1.0)])
    new = store.add_image(replace(third, key="sku-1"))  # sku-1 gets the third photo
    assert new > ids[2] and store.find_key("sku-1").id == new and store.find_key("sku-1").sha256 == third.sha256
    assert [r.id for r in store.images()] == [ids[0], ids[2], new] and store.features(BACKBONE)[0].tolist() == [
        ids[0], ids[2]]
    assert store.neighbor_ids(BACKBONE, "l2", 0) == set() and store.find_key("nothing") is None


def test_a_view_over_the_users_own_table_is_read_by_key(store, sample_dir):
    """Issue 29: the view image_source (item_key, label, data) a DBA makes over their table, read in key order and
    in batches; a store without it says so in one line."""
    with pytest.raises(StoreError, match=r"^cannot read the view image_source \(item_key, label, data\): "):
        next(store.source_rows())
    rows = [(f"sku-{i}", im.label if i % 2 else None, im.data) for i, im in enumerate(photos(sample_dir, 1))]
    prefix = "dbo." if store.server == "SQL Server" else ""
    text, binary = {"SQLite": ("TEXT", "BLOB"), "PostgreSQL": ("text", "bytea")}.get(store.server,
                                                                                    ("nvarchar(40)", "varbinary(max)"))
    store.db.query(f"CREATE TABLE {prefix}products (sku {text} NOT NULL, category {text} NULL,"
                   f" photo {binary} NOT NULL)")
    store.db.query(f"CREATE VIEW {prefix}image_source AS SELECT sku AS item_key, category AS label, photo AS data"
                   f" FROM {prefix}products")
    store.db.query_many(store.d.sql(f"INSERT INTO {prefix}products (sku, category, photo) VALUES (?, ?, ?)"),
                        rows[::-1])
    assert [row for batch in store.source_rows(batch_size=2) for row in batch] == [row + (None,) for row in rows]


def test_the_views_metadata_column_becomes_the_items_metadata(store, sample_dir):
    """Issue 29: a view image_source with the optional metadata column (JSON text of an object, found in the
    catalogue): each item gets it; a row whose metadata is not JSON, or not an object, is refused and recorded."""
    prefix = "dbo." if store.server == "SQL Server" else ""
    text, binary = {"SQLite": ("TEXT", "BLOB"), "PostgreSQL": ("text", "bytea")}.get(store.server,
                                                                                    ("nvarchar(400)", "varbinary(max)"))
    store.db.query(f"CREATE TABLE {prefix}products (sku {text} NOT NULL, photo {binary} NOT NULL, attrs {text})")
    store.db.query(f"CREATE VIEW {prefix}image_source AS SELECT sku AS item_key, NULL AS label, photo AS data,"
                   f" attrs AS metadata FROM {prefix}products")
    attributes = ['{"title": "Spotted scarf", "price": 9.5}', None, '{"title": "bad"', '["not", "an object"]']
    rows = [(f"sku-{i}", im.data, a) for i, (im, a) in enumerate(zip(photos(sample_dir, 2), attributes))]
    store.db.query_many(store.d.sql(f"INSERT INTO {prefix}products (sku, photo, attrs) VALUES (?, ?, ?)"), rows)
    report = ingest_view(store, progress=False)
    assert (report.added, report.already_stored, report.unlabelled) == (2, 0, 2)
    assert [(im.key, im.metadata) for im in store.images()] == [
        ("sku-0", {"title": "Spotted scarf", "price": 9.5}), ("sku-1", None)]
    assert report.skipped == [("image_source/sku-2", "metadata: not JSON: Expecting ',' delimiter"),
                              ("image_source/sku-3", "metadata: not a JSON object")]
    assert [r[0] for r in store.rejected()] == ["image_source/sku-2", "image_source/sku-3"]
    assert ingest_view(store, progress=False).already_stored == 2  # re-run: nothing new


def test_relabel_image_changes_only_the_label(store, sample_dir):
    ids = [store.add_image(im) for im in photos(sample_dir, 1)]
    store.put_features(BACKBONE, ids, vectors(3), "fp32", ("torch", "b" * 16))
    store.put_split({i: "train" for i in ids}, 0, 0.0)
    before = store.catalogue_stamp(BACKBONE)
    assert store.relabel_image(ids[0], "striped") and not store.relabel_image(ids[-1] + 1, "striped")
    assert [(r.id, r.label) for r in store.images()] == list(zip(ids, ["striped", "leopard", "striped"]))
    assert store.find_sha256(store.images()[0].sha256).label == "striped"
    assert store.split() == {i: "train" for i in ids} and store.feature_counts() == {BACKBONE: 3}
    assert store.catalogue_stamp(BACKBONE) == before


def test_neighbors_and_networks(store, sample_dir):
    ids = [store.add_image(im) for im in photos(sample_dir, 1)]
    rows = [(ids[0], 1, ids[2], 0.75), (ids[0], 2, ids[1], 0.5), (ids[1], 1, ids[0], 0.25)]
    store.put_neighbors(BACKBONE, "cosine", 0, rows)
    store.put_neighbors(BACKBONE, "cosine", 0, [(ids[0], 1, ids[1], 0.0)])  # rows already stored are kept
    store.put_neighbors(BACKBONE, "learned", 3, rows[:1])
    assert store.neighbor_ids(BACKBONE, "cosine", 0) == {ids[0], ids[1]}
    names = {r.id: (r.name, r.label) for r in store.images()}
    assert store.neighbors(ids[0], BACKBONE, "cosine", 0) == [(1, ids[2], *names[ids[2]], 0.75),
                                                              (2, ids[1], *names[ids[1]], 0.5)]
    store.delete_neighbors(BACKBONE, "cosine", 0)
    assert store.neighbor_ids(BACKBONE, "cosine", 0) == set() and store.neighbor_ids(BACKBONE, "learned", 3) == {ids[0]}
    first = store.create_network(BACKBONE, {"seed": 1})
    second = store.create_network(BACKBONE, {"seed": 2})
    assert (first.name, first.version, first.status, second.version) == (f"{BACKBONE}_refined_1", 1, "training", 2)
    weights = {"head.weight": vectors(2, 3), "head.bias": np.zeros(2, np.float32)}
    store.put_network(first.name, "training", {"epoch": 1}, {"weights": weights, "state": {"step": np.ones(1)}})
    store.put_network(first.name, "ready", {"epoch": 2}, {"weights": {"head.bias": np.ones(2, np.float32)}},
                      drop=("state",))
    assert [(n.name, n.status, n.params, n.metrics) for n in store.networks()] == [
        (first.name, "ready", {"seed": 1}, {"epoch": 2}), (second.name, "training", {"seed": 2}, {})]
    assert store.network(first.name).created_at and store.network_arrays(first.name, "state") == {}
    ((key, (dtype, shape, data)),) = store.network_arrays(first.name, "weights").items()
    assert (key, dtype, shape, data) == ("head.bias", "<f4", "[2]", np.ones(2, "<f4").tobytes())
    with pytest.raises(NotReady, match="no network named"):
        store.network("nope")


def test_capabilities_say_what_the_store_does_in_the_database(store, sample_dir):
    expected = {SQLiteStore: set(), PostgresStore: {VECTOR_SEARCH, PROCEDURES}, MSSQLStore: {PROCEDURES}}
    assert store.capabilities == expected[type(store)]
    ids = [store.add_image(im) for im in photos(sample_dir, 2)]
    X = vectors(6, seed=3)
    store.put_features(BACKBONE, ids, X)
    if VECTOR_SEARCH not in store.capabilities:
        with pytest.raises(StoreError, match="no vector search"):
            store.nearest(BACKBONE, X[0], "l2", 3)
    else:
        distances = np.linalg.norm(X - X[0], axis=1)
        order = [i for i in np.argsort(distances) if i != 1][:3]
        found = store.nearest(BACKBONE, X[0], "l2", 3, exclude=[ids[1]], approximate=False)
        assert [i for i, _ in found] == [ids[k] for k in order]
        np.testing.assert_allclose([s for _, s in found], -distances[order], rtol=1e-5)
    if PROCEDURES not in store.capabilities:
        with pytest.raises(StoreError, match="runs no stored procedures"):
            store.run_procedure("PrepareData", {"seed": 0})
    with pytest.raises(StoreError):
        store.run_procedure("PrepareData; DROP TABLE images", {"seed": 0})


def test_reading_sees_one_snapshot_where_the_database_keeps_them(opener, sample_dir):
    images = photos(sample_dir, 1)
    with opener() as reader, opener() as writer:
        writer.add_image(images[0])
        with reader.reading():
            before = reader.images()
            writer.add_image(images[1])
            during = reader.images()
        assert len(reader.images()) == 2 and len(before) == 1
        assert len(during) == (2 if isinstance(reader, MSSQLStore) else 1)  # SQL Server reads statement by statement


# ---------------------------------------------------------------- SQLR/02_Tables.sql against store/schema.py
FAMILIES = {"integer": {ID, INT}, "nvarchar": {TEXT, JSON}, "varchar": {TEXT}, "char": {TEXT}, "float": {FLOAT},
            "varbinary": {BYTES, VECTOR}, "datetime2": {TIME}}
"""The abstract types each T-SQL type may hold (JSON in nvarchar(max), bytes and vectors in varbinary(max))."""


def declared(conn: sqlite3.Connection, table: str) -> dict:
    """What a table declares, as SQLite reads it: columns (name, NOT NULL), primary key, uniques (a unique index
    filtered on `column IS NOT NULL` counts as the column's UNIQUE, as does the unique index the SQL Server
    emulation makes a UNIQUE constraint), foreign keys (columns, table, referenced columns, ON DELETE), and
    CHECK (column IN (...)) lists."""
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()
    emulated = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tsql_constraints'").fetchone()
    constraints = {n for (n,) in conn.execute("SELECT name FROM tsql_constraints")} if emulated else set()
    keys = {}
    for fk in conn.execute(f"PRAGMA foreign_key_list({table})").fetchall():
        keys.setdefault(fk[0], []).append(fk)
    uniques = set()
    for index in conn.execute(f"PRAGMA index_list({table})").fetchall():
        columns = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({index[1]})").fetchall())
        (where,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index[1],)).fetchone() or (None,)
        # SQL Server's UNIQUE allows one NULL: a nullable unique column is a unique index filtered on IS NOT NULL
        filtered = index[4] and len(columns) == 1 and re.search(
            rf"WHERE (NOT {columns[0]} IS|{columns[0]} IS NOT) NULL$", where)
        if index[2] and (index[3] == "u" or index[1] in constraints or filtered):
            uniques.add(columns)
    (text,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    return {"columns": [(r[1].strip('"'), bool(r[3] or r[5])) for r in info],
            "primary_key": tuple(r[1].strip('"') for r in sorted(info, key=lambda r: r[5]) if r[5]),
            "unique": uniques,
            "references": {(tuple(r[3] for r in fk), fk[0][2], tuple(r[4] for r in fk), fk[0][6])
                           for fk in keys.values()},
            "checks": {(c, tuple(re.findall(r"'(\w+)'", v))) for c, v in re.findall(r"CHECK \((\w+) IN \(([^)]*)\)\)", text)}}


def expected(table, skipped: set = frozenset()) -> dict:
    """What store/schema.py declares for a table, in the terms of `declared`."""
    return {"columns": [(c.name, not c.nullable) for c in table.columns], "primary_key": table.primary_key,
            "unique": {*table.unique, *((c.name,) for c in table.columns if c.unique)},
            "references": {(f.columns, f.table, key_of(f.table),
                            "CASCADE" if f.cascade and (table.name, f.columns[0]) not in skipped else "NO ACTION")
                           for f in references(table)},
            "checks": {(c.name, c.choices) for c in table.columns if c.choices}}


def test_sql_server_tables_script_matches_the_declared_schema():
    server = sql_server()
    assert set(server.tables) == {t.name for t in TABLES}
    for table in TABLES:
        assert declared(server.conn, table.name) == expected(table, SERVER_CASCADES_SKIPPED), table.name
        for column in table.columns:
            sql_type = server.tables[table.name][column.name]
            assert column.type in FAMILIES[sql_type.split("(")[0]], (table.name, column.name, sql_type)
            assert (sql_type.endswith("(max)") or column.type not in (JSON, BYTES, VECTOR)), (table.name, column.name)


def test_sqlite_tables_are_the_declared_schema(tmp_path):
    with SQLiteStore(tmp_path / "schema.sqlite") as store:
        for table in TABLES:
            assert declared(store.conn, table.name) == expected(table), table.name


def test_sql_server_store_runs_the_procedures(sample_dir):
    """The SQL context's path on SQL Server: EXEC with bound values through the store, the last result set back,
    the procedure's error as the driver raises it."""
    from image_similarity.contexts.sql import call

    server = tsql.Server()
    tsql.install(server, sorted(TABLES_SQL.parent.glob("[0-9][0-9]_*.sql")))
    with MSSQLStore("mssql://emulated/ImageSimilarity", connection=tsql.Client(server)) as store:
        with pytest.raises(tsql.SqlError, match="no images stored"):
            call(store, "PrepareData", seed=0)
        ids = [store.add_image(im) for im in photos(sample_dir, 4)]
        columns, rows = call(store, "PrepareData", test_fraction=0.25, seed=3)
        subsets = list(store.split().values())
        assert columns == ["subset", "images"] and dict(rows) == {"test": subsets.count("test"), "train": 9}
        assert sorted(store.split()) == ids and subsets.count("test") == 3
