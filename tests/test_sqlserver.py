"""SQL Server scripts (SQLR/) without a SQL Server: a real T-SQL grammar, and an emulation of
sp_execute_external_script that runs each procedure's own input query and Python body against a SQLite copy of
the engine's tables and compares the result with the engine's."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlfluff
import sqlglot
from sqlfluff.api import APIParsingError
from sqlglot import exp

from image_similarity.dedup import dhash
from image_similarity.images import decode_image, inspect_image
from image_similarity.rank import rank
from image_similarity.split import split_images
from image_similarity.store import SQLiteStore
from image_similarity.store.base import decode_array
from image_similarity.train import load_model

SQLR = Path(__file__).resolve().parents[1] / "SQLR"
SCRIPTS = sorted(SQLR.glob("[0-9][0-9]_*.sql"))
PROCEDURES = ["FeaturizeImages", "PrepareData", "TrainModel", "EvaluateModel", "RankCandidates"]


def procedure(name: str) -> str:
    (path,) = [p for p in SCRIPTS if f"PROCEDURE dbo.{name}\n" in p.read_text()]
    return path.read_text()


def literal(text: str, argument: str) -> str | None:
    """The N'...' string passed as `argument` to sp_execute_external_script, unescaped."""
    found = re.search(rf"{argument}\s*=\s*N'((?:[^']|'')*)'", text)
    return found.group(1).replace("''", "'") if found else None


def declared(params: str) -> list[tuple[str, bool]]:
    """(name, is OUTPUT) of each parameter in an @params declaration."""
    return [(m.group(1), bool(m.group(2)))
            for m in re.finditer(r"@(\w+)\s+\w+(?:\s*\([^)]*\))?(\s+OUTPUT)?", params)]


def sqlite_query(tsql: str) -> str:
    """A T-SQL statement for SQLite: transpiled with sqlglot, the dbo schema dropped (one schema there)."""
    tree = sqlglot.parse_one(tsql, read="tsql")
    for table in tree.find_all(exp.Table):
        table.set("db", None)
    return tree.sql(dialect="sqlite")


def emulate(text: str, db: Path, values: dict) -> tuple[pd.DataFrame, dict]:
    """Run a procedure's external script as SQL Server would: (OutputDataSet, OUTPUT parameters)."""
    script, query, params = literal(text, "@script"), literal(text, "@input_data_1"), literal(text, "@params")
    assert script and "import image_similarity" in script.replace("from image_similarity import", "import image_similarity")
    names = declared(params or "")
    for name, output in names:  # every declared parameter is passed from the procedure's own variable
        assert re.search(rf"@{name}\s*=\s*@{name}" + (r"\s+OUTPUT" if output else r"\b"), text), name
    conn = sqlite3.connect(db)
    try:
        for statement in re.findall(r"(?:CREATE TABLE|INSERT INTO) #step\b[^;]*;", text):
            conn.execute(sqlite_query(statement), {k: v for k, v in values.items()})
        frame = pd.read_sql_query(sqlite_query(query), conn) if query else pd.DataFrame()
    finally:
        conn.close()
    scope = {"InputDataSet": frame, "OutputDataSet": pd.DataFrame()}
    scope.update({name: None if output else values[name] for name, output in names})
    exec(compile(script, "@script", "exec"), scope)  # noqa: S102 - emulating sp_execute_external_script
    return scope["OutputDataSet"], {name: scope[name] for name, output in names if output}


def model_values(store: SQLiteStore) -> dict:
    """What EvaluateModel and RankCandidates read from dbo.models for the latest version."""
    version, backbone, classes, params = store.conn.execute(
        "SELECT version, backbone, classes, params FROM models ORDER BY version DESC LIMIT 1").fetchone()
    return {"model_version": version, "backbone": backbone, "classes": classes, "model_params": params}


def test_every_script_parses_as_tsql():
    numbers = [int(p.name[:2]) for p in SCRIPTS]  # issue 17: 11_ may land before 10_
    assert numbers[:9] == list(range(1, 10)) and len(set(numbers)) == len(numbers)
    for path in SCRIPTS:
        sqlfluff.parse(path.read_text(), dialect="tsql")
    with pytest.raises(APIParsingError):  # the grammar is strict enough to catch a missing END
        sqlfluff.parse(procedure("RankCandidates").replace("END;\nGO", "GO"), dialect="tsql")


def test_each_procedure_calls_one_engine_function_with_typed_validated_parameters():
    for name in PROCEDURES:
        text = procedure(name)
        assert "@language = N'Python'" in text and "THROW 5" in text and "BEGIN TRANSACTION" in text
        calls = re.findall(r"inproc\.(\w+)\(", literal(text, "@script"))
        assert len(calls) == 1, name
    order = re.findall(r"EXEC dbo\.(\w+)", procedure("Initial_Run_Once"))
    assert order == ["FeaturizeImages", "PrepareData", "TrainModel", "EvaluateModel"]


def test_prepare_data_matches_the_engine_split(full_copy):
    out, _ = emulate(procedure("PrepareData"), full_copy, {"test_fraction": 0.25, "seed": 0})
    with SQLiteStore(full_copy) as store:
        expected = split_images(store.images(), 0.25, 0)
        assert dict(zip(out["image_id"], out["subset"])) == expected == store.split()


def test_train_model_matches_the_stored_model(full_copy):
    out, outputs = emulate(procedure("TrainModel"), full_copy,
                           {"backbone": "efficientnet_lite0", "c_grid": "", "seed": 0})
    with SQLiteStore(full_copy) as store:
        model = store.model()
    assert json.loads(outputs["classes"]) == model.classes
    assert json.loads(outputs["model_params"]) == model.params
    arrays = {r.name: decode_array(r.dtype, r.shape, r.data) for r in out.itertuples()}
    assert sorted(arrays) == sorted(model.arrays)
    for name, array in model.arrays.items():  # LinearSVC's coordinate descent is shuffled unseeded
        np.testing.assert_allclose(arrays[name], array, rtol=1e-3, atol=1e-3)


def test_evaluate_model_matches_the_stored_evaluation(full_copy):
    with SQLiteStore(full_copy) as store:
        values = model_values(store)
        stored = store.evaluation()
    out, outputs = emulate(procedure("EvaluateModel"), full_copy, {**values, "seed": 0})
    assert json.loads(outputs["summary"]) == stored.summary
    metrics = out[out["table_name"] == "evaluation_metrics"]
    assert [tuple(r) for r in metrics[["scope", "metric", "class", "value"]].itertuples(index=False)] == \
        [tuple(r) for r in stored.metrics]
    confusion = out[out["table_name"] == "evaluation_confusion"]
    assert [(s, t, p, int(v)) for s, t, p, v in confusion[["scope", "metric", "class", "value"]].itertuples(index=False)] \
        == [tuple(r) for r in stored.confusion]


def test_rank_candidates_top10_equals_the_engine(full_copy, featurizer):
    with SQLiteStore(full_copy) as store:
        values = model_values(store)
        test_id = min(i for i, s in store.split().items() if s == "test")
        query = store.image_bytes(test_id)
        best = store.evaluation().summary["best_method"]
        expected = rank(store, query, featurizer, model=load_model(store), save=False)
    out, outputs = emulate(procedure("RankCandidates"), full_copy,
                           {**values, "query": query, "top": 10, "method": "", "best_method": best})
    assert outputs["used_method"] == expected.method == best
    assert len(out) == 10 and test_id not in set(out["image_id"])
    assert out["image_id"].tolist() == [m.image_id for m in expected.matches]
    assert out["name"].tolist() == [m.name for m in expected.matches]
    np.testing.assert_allclose(out["score"], [m.score for m in expected.matches], rtol=1e-5, atol=1e-5)


def test_featurize_images_fills_missing_vectors_and_reports_bad_bytes(full_copy):
    with SQLiteStore(full_copy) as store:
        _, before = store.features("efficientnet_lite0", [1, 2, 3])
        store.conn.execute("PRAGMA foreign_keys = OFF")
        with store.conn:
            store.conn.execute("DELETE FROM features WHERE image_id IN (1, 2, 3)")
            store.conn.execute("UPDATE images SET data = substr(data, 1, 200) WHERE id = 3")
    out, _ = emulate(procedure("FeaturizeImages"), full_copy, {"backbone": "efficientnet_lite0", "batch_size": 2})
    assert out["image_id"].tolist() == [1, 2, 3]
    good = out[out["reason"].isna()]
    vectors = np.stack([np.frombuffer(v, "<f4") for v in good["vector"]])
    np.testing.assert_allclose(vectors, before[:2], rtol=1e-4, atol=1e-4)
    assert good["dim"].tolist() == [1280, 1280]
    assert out.loc[2, "vector"] is None and out.loc[2, "reason"]


def test_add_image_inspects_with_the_engine(sample_dir):
    data = next((sample_dir / "dotted").iterdir()).read_bytes()
    out, _ = emulate(procedure("AddImage"), Path(":memory:"), {"data": data})
    info, _ = inspect_image(data)
    assert out.iloc[0].tolist() == [info.format, info.width, info.height, info.mode, info.sha256,
                                    dhash(decode_image(data)), None]
    bad, _ = emulate(procedure("AddImage"), Path(":memory:"), {"data": b"not an image"})
    assert bad.loc[0, "sha256"] is None and bad.loc[0, "reason"]


@pytest.mark.parametrize("old,new", [("inproc.prepare_data(", "inproc.prepare_dat("),
                                     ("i.dhash FROM", "i.dhsh FROM"),
                                     ("test_fraction, seed)", "seed, test_fraction)")])
def test_a_typo_in_a_procedure_fails(full_copy, old, new):
    text = procedure("PrepareData")
    assert old in text
    with pytest.raises((AttributeError, pd.errors.DatabaseError, ValueError)):
        emulate(text.replace(old, new), full_copy, {"test_fraction": 0.25, "seed": 0})
