"""The two ways PostgresStore reaches PostgreSQL: psycopg 3 from a client, PL/Python's `plpy` inside the server.

Both take SQL written with `%s` placeholders and bound values, and return rows as tuples. SQL text is always
a constant of the store; values never become SQL text.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import StoreError, first_line

PLACEHOLDER = re.compile(r"%s")


class Psycopg:
    """A client connection (psycopg 3, autocommit; `transaction()` groups writes)."""

    in_server = False

    def __init__(self, url: str) -> None:
        import psycopg  # lazy: psycopg, an optional dependency (the postgres extra)

        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def query_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql, rows)

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    def results(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of a routine call; its error as a StoreError with the server's one-line reason."""
        import psycopg  # lazy: psycopg, an optional dependency (the postgres extra)

        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                columns = [d.name for d in cur.description] if cur.description else []
                return columns, [tuple(r) for r in cur.fetchall()] if columns else []
        except psycopg.Error as err:
            message = err.diag.message_primary or first_line(err)
            raise StoreError(message.removeprefix("plpy.Error: ")) from None

    def first(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def script(self, sql: str) -> None:
        """Run constant SQL of several statements, no values."""
        self.conn.execute(sql)

    def copy_absent(self, table: str, columns: str, data: bytes) -> None:
        """Add the rows of `data` (binary COPY input of `columns`) to `table` (both constants), each unless its key is
        taken: straight in by COPY, or where a row's key is taken (another writer was first), COPY into a temporary
        table and one INSERT ... ON CONFLICT DO NOTHING from it."""
        import psycopg  # lazy: psycopg, an optional dependency (the postgres extra)

        try:
            with self.conn.transaction(), self.conn.cursor() as cur, \
                    cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(data)
        except psycopg.errors.UniqueViolation:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS incoming_{table} (LIKE {table}) ON COMMIT DROP")
                with cur.copy(f"COPY incoming_{table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(data)
                cur.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM incoming_{table}"
                            f" ON CONFLICT DO NOTHING; TRUNCATE incoming_{table}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read-only transaction that sees one snapshot (REPEATABLE READ)."""
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    def close(self) -> None:
        self.conn.close()


def _plpy_type(value: Any) -> str:
    """The PostgreSQL type a Python value is bound as (NULLs are typed by casts in the SQL)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "float8"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytea"
    if isinstance(value, (list, tuple)):
        return "bigint[]" if value and all(isinstance(v, int) for v in value) else "float8[]"
    return "text"


class Plpy:
    """The server's own connection, inside a PL/Python function or procedure.

    In a procedure (`commits=True`) each `transaction()` ends with a COMMIT, so finished batches survive an
    interruption; in a function the whole call is one transaction, as PostgreSQL requires.
    """

    in_server = True

    def __init__(self, plpy: Any, commits: bool = False) -> None:
        self.plpy, self.commits = plpy, commits
        self.plans: dict[tuple[str, tuple[str, ...]], Any] = {}

    def _plan(self, sql: str, params: Sequence[Any]) -> Any:
        types = tuple(_plpy_type(p) for p in params)
        key = (sql, types)
        if key not in self.plans:
            numbered = iter(range(1, len(types) + 1))
            self.plans[key] = self.plpy.prepare(PLACEHOLDER.sub(lambda _: f"${next(numbered)}", sql), list(types))
        return self.plans[key]

    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        params = [bytes(p) if isinstance(p, (bytearray, memoryview)) else p for p in params]
        return self.plpy.execute(self._plan(sql, params), params)

    def results(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of a statement."""
        result = self._execute(sql, params)
        try:
            columns = result.colnames()
        except self.plpy.Error:  # a statement that returns no rows
            return [], []
        return columns or [], [tuple(row[c] for c in columns) for row in result] if columns else []

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.results(sql, params)[1]

    def query_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self.query(sql, row)

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._execute(sql, params).nrows()

    first = Psycopg.first

    def script(self, sql: str) -> None:
        """Run constant SQL of several statements, no values."""
        self.plpy.execute(sql)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        yield
        if self.commits:
            self.plpy.commit()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A function call is one transaction already."""
        yield

    def close(self) -> None:
        """The server's connection is not ours to close."""
