"""SQL Server for the tests: the scripts of SQLR/ installed on the emulation of tsql.py with a SQLite store's rows,
and a recording stand-in for a driver's connection."""
from __future__ import annotations

import re
from pathlib import Path

from .tsql import Server, install

SQLR = Path(__file__).resolve().parents[2] / "SQLR"
SCRIPTS = sorted(SQLR.glob("[0-9][0-9]_*.sql"))
COPIED = ("images (id, name, label, format, width, height, mode, size_bytes, sha256, dhash, data)",
          "features (image_id, backbone, dim, vector)")


def procedures() -> dict[str, str]:
    """Every CREATE OR ALTER PROCEDURE batch of every numbered script, by name (other helpers' files too)."""
    found = {}
    for path in SCRIPTS:
        for batch in re.split(r"(?im)^\s*GO\s*$", path.read_text()):
            name = re.search(r"CREATE OR ALTER PROCEDURE dbo\.(\w+)", batch)
            if name:
                found[name.group(1)] = batch
    return found


def server(db: Path, vector_type: bool = False, without_features: int = 0) -> Server:
    """An emulated server with SQLR/ installed and the images (and features of ids above `without_features`)
    of a SQLite store."""
    sql = Server(vector_type=vector_type)
    install(sql, SCRIPTS)
    sql.conn.execute("ATTACH DATABASE ? AS src", (str(db),))
    for table in COPIED:
        columns = table[table.index("("):]
        where = f" WHERE image_id > {without_features}" if table.startswith("features") else ""
        sql.conn.execute(f"INSERT INTO {table} SELECT {columns[1:-1]} FROM src.{table.split()[0]}{where}")
    return sql


def copy_model(sql: Server) -> None:
    """The split, the models and the evaluations of the attached SQLite store into the emulated server."""
    for table in ("splits", "models (version, backbone, classes, params)",
                  "model_arrays", "evaluations (id, model_version, summary)"):
        columns = table[table.index("(") + 1:-1] if "(" in table else "*"
        sql.conn.execute(f"INSERT INTO {table} SELECT {columns} FROM src.{table.split()[0]}")


class Recorder:
    """A DB-API connection and cursor that records statements and answers with `rows`."""

    def __init__(self, rows: list[tuple]) -> None:
        self.rows, self.sent, self.commits, self.autocommit = rows, [], 0, True
        self.description = [("featurized",), ("backbone",)] if rows else None

    def cursor(self):
        return self

    def execute(self, sql, *params):
        self.sent.append((sql, params))

    def executemany(self, sql, rows):
        self.sent += [(sql, tuple(r)) for r in rows]

    def fetchall(self):
        return self.rows

    def nextset(self):
        return False

    def fetchone(self):
        return (7,)

    def commit(self):
        self.commits += 1

    def rollback(self):
        pass

    def close(self):
        pass
