"""The `sql` compute context: run a step as its stored procedure, so the work happens inside the database
server: SQL Server's procedures (SQLR/) or PostgreSQL's PL/Python routines (SQLR/postgres/). Procedure and
parameter names come from the step definitions (pipeline/steps.py); every value is bound, never spliced."""
from __future__ import annotations

from typing import Any

from ..errors import BadInput
from ..pipeline.steps import STEPS
from ..store import Store, StoreError
from ..store.base import PROCEDURES as STORED_PROCEDURES
from ..store.postgres import ROUTINES as POSTGRES_ROUTINES

PROCEDURES: dict[str, tuple[str, ...]] = {s.procedure: s.parameters for s in STEPS.values() if s.procedure}
"""Each procedure the client calls, with the parameters it may pass (a subset of what SQLR/ declares; the
PostgreSQL routines, POSTGRES_ROUTINES, take the same names)."""

__all__ = ["POSTGRES_ROUTINES", "PROCEDURES", "call"]


def call(store: Store, procedure: str, **values: Any) -> tuple[list[str], list[tuple]]:
    """Run a procedure on the store's server; (column names, rows) of its last result set.

    Values that are None are left out, so the procedure's default applies.
    """
    if STORED_PROCEDURES not in store.capabilities:
        raise StoreError("--context sql runs the stored procedures: it needs --db postgresql://... or mssql://...")
    given = {k: v for k, v in values.items() if v is not None}
    if procedure not in PROCEDURES or not set(given) <= set(PROCEDURES[procedure]):
        raise BadInput(f"unknown procedure or parameter: {procedure} {list(given)}")
    return store.run_procedure(procedure, given)
