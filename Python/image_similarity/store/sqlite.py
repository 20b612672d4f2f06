"""The embedded default store: one SQLite file, no server."""
from __future__ import annotations

import itertools
import os
import signal
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import StoreError
from .migrations import sqlite_to_2, sqlite_to_3, upgrade, version_to_upgrade
from .schema import BYTES, FLOAT, ID, INT, JSON, SCHEMA_VERSION, TABLES, TEXT, TIME, VECTOR, ddl, index_ddl
from .sql import Dialect, SQLStore

TYPES = {ID: "INTEGER", INT: "INTEGER", TEXT: "TEXT", FLOAT: "REAL", BYTES: "BLOB", JSON: "TEXT", TIME: "TEXT",
         VECTOR: "BLOB"}
SCHEMA = "".join(ddl(table, TYPES, "PRIMARY KEY") + index_ddl(table) for table in TABLES)

CRASH_AFTER_ENV = "IMAGE_SIMILARITY_CRASH_AFTER"
"""For the crash-safety tests (tests/test_crash_safety.py): a number N makes the process kill itself with SIGKILL
inside its Nth write transaction, after the transaction's statements and before its commit."""


class SQLite(Dialect):
    now = "strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now')"  # the text datetime.isoformat gives, in UTC


class SQLiteConnection:
    """A sqlite3 connection as the store uses it (writes in `transaction()`, reads in `snapshot()`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.crash_after = int(os.environ.get(CRASH_AFTER_ENV) or 0)
        self.writes = itertools.count(1)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def query_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def first(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Committed whole, or rolled back whole (also by a crash: see CRASH_AFTER_ENV)."""
        with self.conn:
            yield
            if self.crash_after and next(self.writes) == self.crash_after:
                os.kill(os.getpid(), signal.SIGKILL)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: in WAL mode it sees one snapshot and never blocks writers."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


class SQLiteStore(SQLStore):
    """Store backed by a SQLite file (WAL journal, foreign keys on)."""

    server = "SQLite"
    d = SQLite()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        if self.path.parent and not self.path.parent.exists():
            raise StoreError(f"folder does not exist: {self.path.parent}")
        try:
            self.conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.conn.execute("PRAGMA journal_mode = WAL")
            existed = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'"
                                        ).fetchone() is not None
            with self.conn:
                self.conn.executescript(SCHEMA)
            self._migrate(existed)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open {self.path} as a SQLite database: {err}") from None
        self.db = SQLiteConnection(self.conn)

    def _migrate(self, existed: bool) -> None:
        """Bring a database made by an older release to the current schema version (store/migrations.py), in one
        transaction that holds the write lock, so that two processes opening it migrate it once."""
        def recorded() -> int | None:
            return self.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

        def record(version: int) -> None:
            self.conn.execute(f"INSERT INTO schema_version (version, applied_at) VALUES (?, {SQLite.now})", (version,))

        if recorded() is not None and version_to_upgrade(existed, recorded()) == SCHEMA_VERSION:
            return
        self.conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set before BEGIN
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                found = recorded()
                version = version_to_upgrade(existed, found)
                if found is None:
                    record(version)
                upgrade(version, {2: lambda: sqlite_to_2(self.conn, TYPES), 3: lambda: sqlite_to_3(self.conn, TYPES)},
                        record)
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")
