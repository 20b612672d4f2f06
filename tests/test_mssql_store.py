"""The SQL Server store up to the driver: connection strings, credentials kept out of messages, and every
statement it sends is valid T-SQL with one bound value per placeholder."""
from __future__ import annotations

import builtins
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sqlglot
from support.sqlserver import Recorder

from image_similarity import store as stores
from image_similarity.contexts.sql import PROCEDURES, call
from image_similarity.entrypoints import cli
from image_similarity.errors import NotReady
from image_similarity.store import EvaluationRecord, ModelRecord, NewImage, StoreError, connect
from image_similarity.store.mssql import ODBC_DRIVER, PASSWORD_ENV, MSSQLStore, connection_string

SECRET = "s3cr;et}pw"


def test_connection_strings():
    env = {PASSWORD_ENV: SECRET}
    assert connection_string("mssql://sql01:1433/ImageSimilarity", env) == \
        "Server=sql01,1433;Database=ImageSimilarity;Trusted_Connection=yes;Encrypt=yes"
    text = connection_string("mssql://app@sql01/Images?trust_server_certificate=yes", env, driver=ODBC_DRIVER)
    assert text == ("Driver=ODBC Driver 18 for SQL Server;Server=sql01;Database=Images;UID=app;"
                    "PWD={s3cr;et}}pw};TrustServerCertificate=yes;Encrypt=yes")
    for url, message in [("mssql://app:pw@sql01/db", PASSWORD_ENV), ("mssql://sql01/", "no database"),
                         ("mssql://app@sql01/db", PASSWORD_ENV), ("mssql://sql01/db?timeout=3", "unknown")]:
        with pytest.raises(StoreError, match=message):
            connection_string(url, {})


def test_missing_driver_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_drivers(name, *args, **kwargs):
        if name in ("mssql_python", "pyodbc"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_drivers)
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    with pytest.raises(StoreError, match=r"pip install .image-similarity\[mssql\]") as err:
        connect("mssql://app@sql01/Images")
    assert SECRET not in str(err.value)


def test_every_statement_is_tsql_with_bound_values():
    image = NewImage("a/1.jpg", "a", b"\xff\xd8", "JPEG", 2, 1, "RGB", "ab" * 32, "0" * 64)
    model = ModelRecord("efficientnet_lite0", ["a", "b"], {"coef": np.ones((2, 3), np.float32)}, {"C": 1.0})
    conn = Recorder([])
    store = MSSQLStore("mssql://sql01/Images", connection=conn)
    assert store.url == "mssql://sql01/Images" and conn.autocommit is False
    assert store.add_image(image) == 7
    store.record_rejected("b.jpg", "a", "not an image", "ingest")
    store.put_features("efficientnet_lite0", [1, 2], np.ones((2, 3), np.float32))
    store.put_split({1: "train", 2: "test"}, 0, 0.25)
    assert store.put_model(model) == 7
    assert store.put_evaluation(EvaluationRecord(7, {"x": 1}, [("test", "accuracy", "", 0.9)],
                                                 [("test", "a", "a", 3)])) == 7
    assert store.put_ranking({"name": "q", "sha256": "cd" * 32, "method": "l2", "backbone": "b"},
                             [(1, 1, 0.5), (2, 2, 0.4)]) == 7
    for read in (store.images, store.rejected, store.split, store.feature_counts, store.evaluation,
                 lambda: store.features("b"), lambda: list(store.missing_features("b", 8))):
        read()
    with pytest.raises(NotReady, match="no trained model"):
        store.model()
    assert len(conn.sent) >= 20
    for sql, params in conn.sent:
        sqlglot.parse_one(sql, read="tsql")  # raises on invalid T-SQL
        assert sql.count("?") == len(params), sql
    inserted = [p for sql, p in conn.sent if sql.startswith("INSERT INTO dbo.model_arrays")]
    assert inserted[0][0] == 7 and inserted[0][4] == np.ones((2, 3), "<f4").tobytes()


def declared_parameters(procedure: str) -> set[str]:
    """Parameter names in the CREATE PROCEDURE header of SQLR/'s procedure."""
    for path in sorted((Path(__file__).resolve().parents[1] / "SQLR").glob("[0-9][0-9]_*.sql")):
        found = re.search(rf"CREATE OR ALTER PROCEDURE dbo\.{procedure}\n(.*?)\nAS\n", path.read_text(), re.DOTALL)
        if found:
            return set(re.findall(r"@(\w+)", found.group(1)))
    raise AssertionError(f"no procedure {procedure}")


def test_sql_context_calls_only_declared_procedures_and_parameters():
    for procedure, names in PROCEDURES.items():
        assert set(names) <= declared_parameters(procedure), procedure
    for procedure, names in cli.SQL_STEPS.values():
        assert set(names) <= set(PROCEDURES[procedure])


def test_sql_context_binds_every_value(monkeypatch, sample_dir, tmp_path, capsys):
    conn = Recorder([(3, "efficientnet_lite0")])
    monkeypatch.setattr(stores, "connect", lambda db: MSSQLStore("mssql://sql01/Images", connection=conn))
    query = next((sample_dir / "striped").iterdir())
    assert cli.main(["rank", str(query), "--db", "mssql://sql01/Images", "--context", "sql", "--top", "5"]) == 0
    conn.rows = []  # split then reads the stored split back, to name the classes it leaves out: none here
    assert cli.main(["split", "--db", "mssql://sql01/Images", "--context", "sql", "--seed", "2"]) == 0
    # besides the procedures: the probe for VECTOR rows, and split's read of what it stored
    (rank_sql, rank_args), (split_sql, split_args) = [sent for sent in conn.sent if sent[0].startswith("EXEC ")]
    assert rank_sql == "EXEC dbo.RankCandidates @query = ?, @query_name = ?, @top = ?"
    assert rank_args == (query.read_bytes(), query.name, 5)
    assert split_sql == "EXEC dbo.PrepareData @test_fraction = ?, @seed = ?" and split_args == (0.25, 2)
    assert "featurized  backbone\n  3  efficientnet_lite0" in capsys.readouterr().out
    with stores.SQLiteStore(tmp_path / "x.sqlite") as local, pytest.raises(StoreError, match="needs --db postgresql"):
        call(local, "PrepareData", seed=0)


def test_add_image_is_one_atomic_check_and_insert():
    """Defect 8: add_image looked the hash up, then inserted: two sessions ingesting the same bytes collided."""
    image = NewImage("a/1.jpg", "a", b"\xff\xd8", "JPEG", 2, 1, "RGB", "ab" * 32, "0" * 64)
    conn = Recorder([])
    assert MSSQLStore("mssql://sql01/Images", connection=conn).add_image(image) == 7
    ((sql, params),) = conn.sent
    assert re.search(r"OUTPUT INSERTED\.id SELECT .* WHERE NOT EXISTS \(SELECT 1 FROM dbo\.images "
                     r"WITH \(UPDLOCK, HOLDLOCK\) WHERE sha256 = \?\)", sql)
    assert sql.count("?") == len(params) and params[-1] == image.sha256
    conn.fetchone = lambda: None  # the bytes were there already
    assert MSSQLStore("mssql://sql01/Images", connection=conn).add_image(image) is None


def test_many_rows_go_in_few_statements_within_the_parameter_limit():
    """Defect 8: executemany sent one statement per row."""
    conn = Recorder([])
    store = MSSQLStore("mssql://sql01/Images", connection=conn)
    store.put_features("efficientnet_lite0", list(range(1, 1201)), np.ones((1200, 3), np.float32))
    store.put_split({i: "train" for i in range(1, 2501)}, 0, 0.25)
    sizes = [len(params) for _, params in conn.sent]
    # at most 2000 parameters a statement: features (4 a row: 500 rows), their precisions (3 a row: 666 rows),
    # 1 DELETE, the split (4 a row)
    assert len(conn.sent) == 3 + 2 + 1 + 5 and max(sizes) <= 2100
    assert sum(sizes) == 1200 * 4 + 1200 * 3 + 2500 * 4
    for sql, params in conn.sent:
        sqlglot.parse_one(sql, read="tsql")
        assert sql.count("?") == len(params)


def test_undefined_figures_are_never_sent():
    """Defect 7: NaN (a class with no test image) as a float parameter, or as bare NaN in the summary JSON."""
    conn = Recorder([])
    store = MSSQLStore("mssql://sql01/Images", connection=conn)
    store.put_evaluation(EvaluationRecord(3, {"per_class": {"a": float("nan"), "b": 0.5}},
                                          [("test", "accuracy", "a", float("nan")), ("test", "accuracy", "b", 0.5)], []))
    values = [v for _, params in conn.sent for v in params]
    assert not any(isinstance(v, float) and math.isnan(v) for v in values)
    assert json.loads(conn.sent[0][1][1]) == {"per_class": {"a": None, "b": 0.5}}
    assert [p for sql, p in conn.sent if "evaluation_metrics" in sql] == [(7, "test", "accuracy", "b", 0.5)]
