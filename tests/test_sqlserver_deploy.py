"""Issue 27: `image-similarity sqlserver deploy`, end to end on the emulated server (tests/support/tsql.py), called the
way PowerShell/Setup-ImageSimilarity.ps1 calls it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from support.tsql import Client, Server

from image_similarity.entrypoints import cli
from image_similarity.store import mssql

SCRIPT = Path(__file__).resolve().parents[1] / "PowerShell" / "Setup-ImageSimilarity.ps1"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"  # the emulation runs scripts here; a server must say 3.10


def deploy_arguments(values: dict[str, str]) -> list[str]:
    """The arguments the setup passes to `image-similarity sqlserver deploy`, read from its Invoke-Native call,
    with the script's variables replaced by `values`."""
    (call,) = re.findall(r"Invoke-Native \$Python @\(([^)]*'deploy'[^)]*)\)", SCRIPT.read_text())
    items = [item.strip() for item in call.split(",")]
    return [item[1:-1] if item.startswith("'") else re.sub(r"\$(\w+)", lambda m: values[m.group(1)], item.strip('"'))
            for item in items]


def test_deploy_runs_end_to_end_from_the_setups_calling_convention(monkeypatch, capsys, small_dir):
    sql = Server()
    monkeypatch.setattr(mssql, "open_connection", lambda url: Client(sql))
    args = deploy_arguments({"UserAt": "", "Server": "sql01", "Database": "Images", "Images": str(small_dir),
                             "Backbone": "efficientnet_lite0", "SqlDir": str(Path(__file__).parents[1] / "SQLR")})
    assert args[:5] == ["-m", "image_similarity.entrypoints.cli", "sqlserver", "deploy", "--db"]
    assert cli.main([*args[2:], "--python", PYTHON]) == 0
    out = capsys.readouterr().out.splitlines()
    steps = [line.split(":")[0] for line in out]
    assert steps[:4] == ["SQL Server version", "external scripts enabled",
                         f"Python {PYTHON} and image_similarity answer", "database Images"]
    assert [s for s in steps if s.startswith("SQLR/")][:4] == ["SQLR/02_Migrate.sql", "SQLR/02_Tables.sql",
                                                         "SQLR/03_AddImage.sql", "SQLR/03_IngestFromView.sql"]
    assert "skipped SQLR/12_Vectors.sql" in "\n".join(out) and out[-1] == "deployed: Images"
    assert f"images from {small_dir}: 36 files sent to dbo.AddImage" in out
    assert sql.conn.execute("SELECT COUNT(*) FROM features").fetchone() == (36,)
    assert sql.conn.execute("SELECT COUNT(*) FROM evaluations").fetchone() == (1,)


def test_deploy_ingests_the_dbas_view_with_ingest_from_view(monkeypatch, capsys, sample_dir):
    """Issue 29: `deploy --from-view` runs dbo.IngestFromView over the view image_source before the first run; the
    view's metadata column becomes the items' metadata."""
    sql = Server()
    monkeypatch.setattr(mssql, "open_connection", lambda url: Client(sql))
    photos = [(label, path) for label in ("dotted", "leopard", "striped")
              for path in sorted((sample_dir / label).iterdir())[:4]]
    sql.conn.execute("CREATE TABLE products (sku text, category text, photo blob)")
    sql.conn.executemany("INSERT INTO products VALUES (?, ?, ?)",
                         [(f"sku-{k:02d}", label, path.read_bytes()) for k, (label, path) in enumerate(photos)])
    sql.conn.execute("CREATE VIEW image_source AS SELECT sku AS item_key, category AS label, photo AS data, "
                     "json_object('title', 'Item ' || sku) AS metadata FROM products")
    assert cli.main(["sqlserver", "deploy", "--db", "mssql://sql01/Images", "--from-view", "--python", PYTHON]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "dbo.IngestFromView: 12 rows of dbo.image_source: 12 added, 0 already stored, 0 rejected" in out
    assert [line.split(":")[0] for line in out][-3:] == ["dbo.IngestFromView", "dbo.Initial_Run_Once", "deployed"]
    assert sql.conn.execute("SELECT COUNT(*) FROM features").fetchone() == (12,)
    assert sql.conn.execute("SELECT COUNT(DISTINCT item_key) FROM images").fetchone() == (12,)
    assert sql.conn.execute("SELECT metadata FROM images WHERE item_key = 'sku-03'").fetchone() == (
        '{"title":"Item sku-03"}',)


@pytest.mark.parametrize("damage,message", [
    ("old", "deploy stopped at SQL Server version: major version 15"),
    ("disabled", "deploy stopped at external scripts enabled: not in use"),
    ("python", "deploy stopped at the Python check: sp_execute_external_script runs Python"),
    ("script", "deploy stopped at SQLR/06_TrainModel.sql: lost_table not created"),
])
def test_deploy_stops_with_one_line_at_the_first_failure(monkeypatch, capsys, tmp_path, damage, message):
    sql = Server()
    monkeypatch.setattr(mssql, "open_connection", lambda url: Client(sql))
    sqlr = tmp_path / "SQLR"
    sqlr.mkdir()
    for path in (Path(__file__).parents[1] / "SQLR").glob("*.sql"):
        text = path.read_text()
        lost = "\n-- a server that did not create it: CREATE TABLE dbo.lost_table\n" if damage == "script" else ""
        (sqlr / path.name).write_text(text + lost if path.name.startswith("06_") else text)
    if damage == "old":
        sql.conn.create_function("SERVERPROPERTY", 1, lambda name: "15")
    if damage == "disabled":
        sql.conn.execute("UPDATE configurations SET value_in_use = 0")
    python = "3.10" if damage == "python" else PYTHON
    assert cli.main(["sqlserver", "deploy", "--db", "mssql://sql01/Images", "--sqlr", str(sqlr),
                     "--python", python]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"image-similarity: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("vector_type", [False, True])
def test_check_deploys_ranks_refines_runs_as_a_user_that_is_not_sysadmin_and_drops(monkeypatch, capsys, small_dir,
                                                                                   vector_type):
    """Issue 27, item 5: the command for the first real server, run here on the emulated one (CI runs it)."""
    sql = Server(vector_type=vector_type)
    monkeypatch.setattr(mssql, "open_connection", lambda url: Client(sql))
    seen = []
    real = sql.call
    monkeypatch.setattr(sql, "call", lambda procedure, /, **kw: seen.append((procedure, sql.user))
                        or real(procedure, **kw))
    assert cli.main(["sqlserver", "check", "--db", "mssql://sql01/ImageSimilarityCheck", "--images", str(small_dir),
                     "--per-class", "4", "--python", PYTHON]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^dbo\.RankCandidates: top 3: \w+/\S+ \(-?\d\.\d{3}\)", out, re.MULTILINE)
    assert ("dbo.RankCandidates by VECTOR_DISTANCE: top 3:" in out) == vector_type
    assert ("skipped the VECTOR path" in out) != vector_type
    assert re.search(r"^dbo\.RefineModel, 1 epoch: network efficientnet_lite0_refined_1$", out, re.MULTILINE)
    assert "--context sql as image_similarity_check (not sysadmin): RankCandidates gave 3 rows" in out
    assert out.splitlines()[-2:] == ["dropped database ImageSimilarityCheck", "checked: ImageSimilarityCheck"]
    assert ("RankCandidates", "image_similarity_check") in seen and sql.user is None
    assert sql.conn.execute("SELECT COUNT(*) FROM images").fetchone() == (12,)
