"""Schema migrations (issue 29): a database made by an older release is upgraded in place, in one transaction,
when a store opens it; `schema_version` records the version reached. Version 1 is every database made before that
table existed. SQL Server's are scripts a DBA runs (SQLR/02_Migrate.sql)."""
from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..errors import StoreError
from .schema import SCHEMA, SCHEMA_VERSION, Table, ddl, index_ddl

POSTGRES_TO_2 = (
    "ALTER TABLE images ALTER COLUMN label DROP NOT NULL",
    "ALTER TABLE images DROP CONSTRAINT IF EXISTS images_sha256_key",
    "ALTER TABLE images ADD COLUMN IF NOT EXISTS item_key text UNIQUE",
    "ALTER TABLE images ADD COLUMN IF NOT EXISTS metadata jsonb",
)
"""Version 1 to 2 on PostgreSQL: label nullable, sha256 no longer unique, the item's key and metadata."""


def version_to_upgrade(existed: bool, recorded: int | None) -> int:
    """The version of a database whose tables were just created where missing: `recorded` (the largest in
    schema_version), else 1 when the images table was there before, else the current one (a new database)."""
    if recorded is not None:
        if recorded > SCHEMA_VERSION:
            raise StoreError(f"the database has schema version {recorded}, newer than this release's "
                             f"{SCHEMA_VERSION}: upgrade image-similarity")
        return recorded
    return 1 if existed else SCHEMA_VERSION


def sqlite_to_2(conn: sqlite3.Connection, types: dict[str, str]) -> None:
    """Version 1 to 2 on SQLite, whose ALTER TABLE can neither drop NOT NULL nor a UNIQUE: the images table is
    rebuilt (ids kept, the tables that refer to it untouched) as SQLite's documented procedure does it. Runs
    inside the caller's transaction, with foreign keys off."""
    images = SCHEMA["images"]
    rebuilt = Table("images_v2", images.columns, images.primary_key, images.identity)
    old = [c.name for c in images.columns if c.name not in ("item_key", "metadata")]
    conn.execute(ddl(rebuilt, types, "PRIMARY KEY"))
    conn.execute(f"INSERT INTO images_v2 ({', '.join(old)}) SELECT {', '.join(old)} FROM images")
    conn.execute("DROP TABLE images")
    conn.execute("ALTER TABLE images_v2 RENAME TO images")
    conn.execute(index_ddl(images))
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise StoreError(f"migrating to schema version 2 would break {len(broken)} references: nothing was changed")


def upgrade(from_version: int, steps: dict[int, Callable[[], None]], record: Callable[[int], None]) -> None:
    """Run the steps from `from_version` up to SCHEMA_VERSION (step n makes version n), recording each."""
    for target in range(from_version + 1, SCHEMA_VERSION + 1):
        steps[target]()
        record(target)
