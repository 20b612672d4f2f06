"""The `sql` compute context: run a step as its SQL Server stored procedure (SQLR/), so the work happens
inside the server. Procedure and parameter names are fixed here; every value is bound, never spliced."""
from __future__ import annotations

from typing import Any

from .store import Store, StoreError

PROCEDURES: dict[str, tuple[str, ...]] = {
    "FeaturizeImages": ("backbone", "batch_size"),
    "PrepareData": ("test_fraction", "seed"),
    "TrainModel": ("backbone", "c_grid", "seed"),
    "EvaluateModel": ("model_version", "seed"),
    "RankCandidates": ("query", "query_name", "top", "method", "model_version"),
    "Initial_Run_Once": ("backbone", "test_fraction", "seed"),
}
"""Each procedure the client calls, with the parameters it may pass (a subset of what SQLR/ declares)."""


def exec_statement(procedure: str, names: list[str]) -> str:
    """`EXEC dbo.P @a = ?, ...` for a known procedure and its known parameters."""
    allowed = PROCEDURES.get(procedure)
    if allowed is None or not set(names) <= set(allowed):
        raise ValueError(f"unknown procedure or parameter: {procedure} {names}")
    return f"EXEC dbo.{procedure} " + ", ".join(f"@{n} = ?" for n in names)


def call(store: Store, procedure: str, **values: Any) -> tuple[list[str], list[tuple]]:
    """Run a procedure on the store's SQL Server; (column names, rows) of its last result set.

    Values that are None are left out, so the procedure's default applies.
    """
    conn = getattr(store, "conn", None)
    if not store.url.startswith("mssql://") or conn is None:
        raise StoreError("--context sql runs the stored procedures: it needs --db mssql://host/database")
    given = {k: v for k, v in values.items() if v is not None}
    cur = conn.cursor()
    try:
        cur.execute(exec_statement(procedure, list(given)), *given.values())
        columns, rows = [], []
        while True:
            if cur.description:
                columns, rows = [d[0] for d in cur.description], [tuple(r) for r in cur.fetchall()]
            if not cur.nextset():
                break
        conn.commit()
    except Exception:
        conn.rollback()
        raise
    return columns, rows
