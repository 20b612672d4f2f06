"""Schema migrations (issue 29): a database made by an older release is upgraded in place, in one transaction,
when a store opens it; `schema_version` records the version reached. Version 1 is every database made before that
table existed. SQL Server's are scripts a DBA runs (SQLR/02_Migrate.sql)."""
from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable

from ..errors import StoreError
from .schema import SCHEMA, SCHEMA_VERSION, ddl, index_ddl

POSTGRES_TO_2 = (
    "ALTER TABLE images ALTER COLUMN label DROP NOT NULL",
    "ALTER TABLE images DROP CONSTRAINT IF EXISTS images_sha256_key",
    "ALTER TABLE images ADD COLUMN IF NOT EXISTS item_key text UNIQUE",
    "ALTER TABLE images ADD COLUMN IF NOT EXISTS metadata jsonb",
)
"""Version 1 to 2 on PostgreSQL: label nullable, sha256 no longer unique, the item's key and metadata."""
POSTGRES_TO_3 = (
    "ALTER TABLE feature_runtimes DROP CONSTRAINT IF EXISTS feature_runtimes_runtime_check",
    "ALTER TABLE feature_runtimes ADD CONSTRAINT feature_runtimes_runtime_check CHECK (runtime IN ("
    + ", ".join(repr(v) for v in SCHEMA["feature_runtimes"].column("runtime").choices) + "))",
)
"""Version 2 to 3 on PostgreSQL: feature_runtimes.runtime may be "openvino" (the name is PostgreSQL's own for a
column's CHECK)."""


def version_to_upgrade(existed: bool, recorded: int | None) -> int:
    """The version of a database whose tables were just created where missing: `recorded` (the largest in
    schema_version), else 1 when the images table was there before, else the current one (a new database)."""
    if recorded is not None:
        if recorded > SCHEMA_VERSION:
            raise StoreError(f"the database has schema version {recorded}, newer than this release's "
                             f"{SCHEMA_VERSION}: upgrade image-similarity")
        return recorded
    return 1 if existed else SCHEMA_VERSION


def sqlite_rebuild(conn: sqlite3.Connection, types: dict[str, str], name: str, kept: list[str], version: int) -> None:
    """Rebuild table `name` as the schema declares it now, copying its `kept` columns (ids kept, the tables that refer
    to it untouched), as SQLite's documented procedure does it: its ALTER TABLE can neither drop a NOT NULL, a UNIQUE
    nor change a CHECK. Runs inside the caller's transaction, with foreign keys off."""
    table = SCHEMA[name]
    conn.execute(ddl(dataclasses.replace(table, name=f"{name}_new"), types, "PRIMARY KEY"))
    conn.execute(f"INSERT INTO {name}_new ({', '.join(kept)}) SELECT {', '.join(kept)} FROM {name}")
    conn.execute(f"DROP TABLE {name}")
    conn.execute(f"ALTER TABLE {name}_new RENAME TO {name}")
    conn.execute(index_ddl(table))
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise StoreError(f"migrating to schema version {version} would break {len(broken)} references: "
                         "nothing was changed")


def sqlite_to_2(conn: sqlite3.Connection, types: dict[str, str]) -> None:
    """Version 1 to 2 on SQLite: images.label nullable, sha256 no longer unique, the item's key and metadata."""
    kept = [c.name for c in SCHEMA["images"].columns if c.name not in ("item_key", "metadata")]
    sqlite_rebuild(conn, types, "images", kept, 2)


def sqlite_to_3(conn: sqlite3.Connection, types: dict[str, str]) -> None:
    """Version 2 to 3 on SQLite: feature_runtimes.runtime may be "openvino"."""
    sqlite_rebuild(conn, types, "feature_runtimes", [c.name for c in SCHEMA["feature_runtimes"].columns], 3)


def upgrade(from_version: int, steps: dict[int, Callable[[], None]], record: Callable[[int], None]) -> None:
    """Run the steps from `from_version` up to SCHEMA_VERSION (step n makes version n), recording each."""
    for target in range(from_version + 1, SCHEMA_VERSION + 1):
        steps[target]()
        record(target)
