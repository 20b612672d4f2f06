"""The `sql` compute context: run a step as its stored procedure, so the work happens inside the database
server: SQL Server's procedures (SQLR/) or PostgreSQL's PL/Python routines (SQLR/postgres/). Routine and
parameter names come from the step definitions (pipeline/steps.py); every value is bound, never spliced."""
from __future__ import annotations

import json
from typing import Any

from ..pipeline.steps import STEPS
from ..store import Store, StoreError

PROCEDURES: dict[str, tuple[str, ...]] = {s.procedure: s.parameters for s in STEPS.values() if s.procedure}
"""Each procedure the client calls, with the parameters it may pass (a subset of what SQLR/ declares)."""

POSTGRES_ROUTINES: dict[str, str] = {s.procedure: s.routine for s in STEPS.values() if s.procedure}
"""The PostgreSQL routine (SQLR/postgres/02_Routines.sql) of each procedure; same parameter names."""


def exec_statement(procedure: str, names: list[str]) -> str:
    """`EXEC dbo.P @a = ?, ...` for a known procedure and its known parameters."""
    allowed = PROCEDURES.get(procedure)
    if allowed is None or not set(names) <= set(allowed):
        raise ValueError(f"unknown procedure or parameter: {procedure} {names}")
    return f"EXEC dbo.{procedure} " + ", ".join(f"@{n} = ?" for n in names)


def postgres_statement(procedure: str, names: list[str]) -> str:
    """`SELECT * FROM image_similarity.f(a => %s, ...)` (or CALL) for a known routine and known parameters."""
    allowed = PROCEDURES.get(procedure)
    if allowed is None or not set(names) <= set(allowed):
        raise ValueError(f"unknown procedure or parameter: {procedure} {names}")
    return POSTGRES_ROUTINES[procedure].format(", ".join(f"{n} => %s" for n in names))


def call(store: Store, procedure: str, **values: Any) -> tuple[list[str], list[tuple]]:
    """Run a procedure on the store's server; (column names, rows) of its last result set.

    Values that are None are left out, so the procedure's default applies.
    """
    given = {k: v for k, v in values.items() if v is not None}
    if store.url.startswith("postgresql://"):
        return _call_postgres(store, procedure, given)
    conn = getattr(store, "conn", None)
    if not store.url.startswith("mssql://") or conn is None:
        raise StoreError("--context sql runs the stored procedures: it needs --db postgresql://... or mssql://...")
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


def _call_postgres(store: Store, procedure: str, given: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    import psycopg

    if isinstance(given.get("c_grid"), str):  # the SQL Server procedure takes JSON, PostgreSQL an array
        given["c_grid"] = [float(c) for c in json.loads(given["c_grid"])]
    conn = store.db.conn
    try:
        with conn.cursor() as cur:
            cur.execute(postgres_statement(procedure, list(given)), list(given.values()))
            columns = [d.name for d in cur.description] if cur.description else []
            return columns, [tuple(r) for r in cur.fetchall()] if columns else []
    except psycopg.Error as err:
        message = err.diag.message_primary or str(err).strip().splitlines()[0]
        raise StoreError(message.removeprefix("plpy.Error: ")) from None
