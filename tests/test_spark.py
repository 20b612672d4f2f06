"""--context spark on a real local Spark (local[2], two attempts per task): the same vectors and neighbours as the
local steps, one row per image after tasks die mid-partition, nothing added by a re-run.

Needs Java 17 (`.ci/run` installs Debian's openjdk-17-jre-headless) and PySpark (the [spark] extra). Without Java
the tests are skipped with the reason, except in CI, where they fail.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import needs

from image_similarity.contexts import spark
from image_similarity.entrypoints import cli
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.neighbors import neighbors
from image_similarity.store import SQLiteStore, StoreError, connect

BACKBONE = "efficientnet_lite0"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session():
    needs.java()
    session = spark.session("local[2,2]", {"spark.ui.enabled": "false"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def local_db(small_dir, featurizer, tmp_path_factory):
    """36 real photos featurized by the local step, with their cosine neighbours."""
    path = tmp_path_factory.mktemp("spark") / "local.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, small_dir, progress=False)
        featurize(store, featurizer, progress=False)
        neighbors(store, BACKBONE, "cosine", k=4, memory=10 * 36 * 24, progress=False)
    return path


def rows(path, sql: str) -> list[tuple]:
    with SQLiteStore(path) as store:
        return store.conn.execute(sql).fetchall()


def test_featurize_equals_local_and_killed_tasks_leave_one_row_per_image(session, local_db, small_dir, tmp_path,
                                                                         featurizer):
    """The executors run the local step's runtime and precision (chosen here at this process's threads: an executor
    measures its own at a task's cores, which may choose another: both are recorded per vector)."""
    db = str(tmp_path / "spark.sqlite")
    with SQLiteStore(db) as store:
        ingest(store, small_dir, progress=False)
    session.sparkContext.environment[spark.FAULT_ENV] = "1"  # each first attempt dies after its first batch
    try:
        report = spark.featurize_on_spark(session, db, BACKBONE, batch_size=3, progress=False,
                                          precision=featurizer.precision, runtime=featurizer.runtime)
    finally:
        del session.sparkContext.environment[spark.FAULT_ENV]
    # 2 waves of 2 tasks (local[2]) of 9 images (3 batches): each first attempt stored 3 images, its retry the other 6
    assert report.added == 24 and report.skipped == []
    assert (report.runtime, report.precision, report.network_hash) == (
        featurizer.runtime, featurizer.precision, featurizer.network_hash)
    assert rows(db, "SELECT count(*), count(DISTINCT image_id) FROM features") == [(36, 36)]
    with SQLiteStore(db) as store, SQLiteStore(local_db) as local:
        ids, vectors = store.features(BACKBONE)
        local_ids, local_vectors = local.features(BACKBONE)
    assert ids.tolist() == local_ids.tolist()
    np.testing.assert_allclose(vectors, local_vectors, rtol=1e-4, atol=1e-4)
    assert spark.featurize_on_spark(session, db, BACKBONE, batch_size=3, progress=False,
                                    precision=featurizer.precision, runtime=featurizer.runtime).added == 0
    assert rows(db, "SELECT count(*) FROM features") == [(36,)]


def test_neighbors_equal_local_and_a_rerun_adds_nothing(session, local_db, tmp_path):
    db = str(tmp_path / "copy.sqlite")
    shutil.copy(local_db, db)
    expected = rows(db, "SELECT image_id, rank, neighbor_id, score FROM neighbors ORDER BY 1, 2")
    with SQLiteStore(db) as store, store.conn:
        store.conn.execute("DELETE FROM neighbors WHERE image_id > 10")
    report = spark.neighbors_on_spark(session, db, BACKBONE, "cosine", 4, memory=10 * 36 * 24, progress=False)
    assert (report.added, report.already_stored, report.block_rows) == (26, 10, 10)
    assert rows(db, "SELECT image_id, rank, neighbor_id, score FROM neighbors ORDER BY 1, 2") == expected
    again = spark.neighbors_on_spark(session, db, BACKBONE, "cosine", 4, progress=False)
    assert (again.added, again.already_stored) == (0, 36)
    assert len(rows(db, "SELECT * FROM neighbors")) == 4 * 36


def test_combinations_that_cannot_work_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(StoreError, match="SQLite file cannot be shared with the executors of spark://"):
        spark.check_store(str(tmp_path / "x.sqlite"), "spark://head:7077")
    spark.check_store("postgresql://head/images", "spark://head:7077")
    assert spark.parse_conf(["spark.task.cpus=4", "a=b=c"]) == {"spark.task.cpus": "4", "a": "b=c"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        spark.parse_conf(["spark.task.cpus"])
    assert cli.main(["split", "--context", "spark", "--db", str(tmp_path / "y.sqlite")]) == 1
    assert "--context spark runs featurize and neighbors, not split" in capsys.readouterr().err


def test_benchmark_reports_every_figure(session, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # importable by the benchmark's spawned child too
    bench = importlib.import_module("spark")
    result = {"featurize": bench.featurize_figures(session, 4, tmp_path),
              "neighbors": bench.neighbors_figures(session, 300, tmp_path)}
    assert result["featurize"]["max_abs_diff"] < 1e-4 and result["featurize"]["spark_ips"] > 0
    n = result["neighbors"]
    assert n["equal_ids"] and n["rows"] == 300 * bench.K and n["max_score_diff"] < 1e-6
    assert n["peak_rss_mib"] > 0 and n["bound_mib"] > 0 and n["local_s"] > 0 and n["spark_s"] > 0
    paper = bench.on_paper(result)
    assert paper["neighbors_h"][1] == pytest.approx(10 * paper["neighbors_h"][10])



def test_postgres_store_on_spark_equals_local(session, database, local_db, small_dir, featurizer):
    with connect(database) as store:
        ingest(store, small_dir, progress=False)
    assert spark.featurize_on_spark(session, database, BACKBONE, batch_size=12, progress=False,
                                    precision=featurizer.precision, runtime=featurizer.runtime).added == 36
    assert spark.neighbors_on_spark(session, database, BACKBONE, "cosine", 4, progress=False).added == 36
    with connect(database) as store, SQLiteStore(local_db) as local:
        np.testing.assert_allclose(store.features(BACKBONE)[1], local.features(BACKBONE)[1], rtol=1e-4, atol=1e-4)
        for image_id in (1, 18, 36):
            assert [r[1] for r in store.neighbors(image_id, BACKBONE, "cosine", 0)] == \
                [r[1] for r in local.neighbors(image_id, BACKBONE, "cosine", 0)]
