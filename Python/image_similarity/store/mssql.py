"""A SQL Server store: the tables SQLR/02_Tables.sql creates, reached with mssql-python or pyodbc.

URL: `mssql://[user@]host[:port]/database[?encrypt=yes&trust_server_certificate=no&login_timeout=15]`. With a
user, the password comes from the environment variable IMAGE_SIMILARITY_DB_PASSWORD (never from the URL, never
printed); without one, Windows authentication (Trusted_Connection). `login_timeout` bounds, in seconds, how long
the driver may spend reaching the server and logging in. On SQL Server 2025 with SQLR/12_Vectors.sql installed the
store has VECTOR_SEARCH: `nearest` ranks with VECTOR_DISTANCE over feature_vectors (l2, cosine) and method_vectors
(scores, learned: 'dot'), exactly (VECTOR_DISTANCE never uses a vector index).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from ..errors import BadInput
from .base import PROCEDURES, STORED_METHODS, VECTOR_SEARCH, StoreError
from .schema import SCHEMA, TIME
from .sql import Dialect, SQLStore

PASSWORD_ENV = "IMAGE_SIMILARITY_DB_PASSWORD"
ODBC_DRIVER = "ODBC Driver 18 for SQL Server"
OPTIONS = {"encrypt": "Encrypt", "trust_server_certificate": "TrustServerCertificate"}
LOGIN_TIMEOUT = 15  # seconds, ODBC's own default
MAX_PARAMETERS = 2000  # per statement; SQL Server allows 2100
MAX_ROWS = 1000  # per VALUES list, SQL Server's limit
VECTOR_DIMENSIONS = 1998
"""SQL Server 2025's VECTOR(n) holds float32 values up to n = 1998: shorter vectors are zero-padded to it (l2 and
cosine distances and inner products are unchanged), longer ones (ResNet-50/101 features: 2048) are not stored and
rank in Python."""
SCORES = {"l2": "-VECTOR_DISTANCE('euclidean', v.embedding, CAST(? AS VECTOR(1998)))",
          "cosine": "1 - VECTOR_DISTANCE('cosine', v.embedding, CAST(? AS VECTOR(1998)))",
          "scores": "-VECTOR_DISTANCE('dot', v.embedding, CAST(? AS VECTOR(1998)))",
          "learned": "-VECTOR_DISTANCE('dot', v.embedding, CAST(? AS VECTOR(1998)))"}
"""The engine's score of each method as T-SQL (as in RankByVector, SQLR/12_Vectors.sql)."""
ROWS = {False: "SELECT image_id, embedding FROM dbo.feature_vectors WHERE backbone = ?",
        True: "SELECT image_id, embedding FROM dbo.method_vectors WHERE model_version = ? AND method = ?"}
"""The vectors a method ranks (True: scores and learned), by their key values."""


def padded_json(vector: np.ndarray) -> str | None:
    """A float32 vector as VECTOR(1998) JSON, zero-padded; None when it is longer."""
    if len(vector) > VECTOR_DIMENSIONS:
        return None
    padded = np.zeros(VECTOR_DIMENSIONS, dtype=np.float32)
    padded[:len(vector)] = vector
    return json.dumps([float(x) for x in padded])


def _odbc_value(value: str) -> str:
    """A connection-string value, braced when it holds characters that would end or open one."""
    return "{" + value.replace("}", "}}") + "}" if any(c in value for c in ";{}=") or value != value.strip() else value


def connection_string(url: str, env: Mapping[str, str] = os.environ, driver: str | None = None) -> str:
    """The ODBC connection string for an mssql:// URL (`driver` named for pyodbc; mssql-python bundles its own)."""
    parts = urlsplit(url)
    if parts.scheme != "mssql" or not parts.hostname:
        raise StoreError("a SQL Server URL looks like mssql://[user@]host[:port]/database")
    if parts.password is not None:
        raise StoreError(f"do not put a password in the URL: set {PASSWORD_ENV}")
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise StoreError("the SQL Server URL names no database: mssql://host/database")
    fields = {"Server": parts.hostname + (f",{parts.port}" if parts.port else ""), "Database": database}
    if parts.username:
        if not env.get(PASSWORD_ENV):
            raise StoreError(f"SQL authentication as {unquote(parts.username)!r} needs the password in {PASSWORD_ENV}")
        fields.update(UID=unquote(parts.username), PWD=env[PASSWORD_ENV])
    else:
        fields["Trusted_Connection"] = "yes"
    for key, values in parse_qs(parts.query).items():
        if key == "login_timeout":
            continue  # a connect() argument, not a connection-string keyword: see login_timeout()
        if key not in OPTIONS or values[-1] not in ("yes", "no"):
            raise StoreError(f"unknown SQL Server URL option {key}={values[-1]}: use "
                             + ", ".join(f"{k}=yes|no" for k in OPTIONS) + ", login_timeout=SECONDS")
        fields[OPTIONS[key]] = values[-1]
    fields.setdefault("Encrypt", "yes")
    if driver:
        fields = {"Driver": driver, **fields}
    return ";".join(f"{k}={_odbc_value(v)}" for k, v in fields.items())


def login_timeout(url: str) -> int:
    """Seconds the driver may spend reaching the server and logging in: the URL's login_timeout, default 15."""
    values = parse_qs(urlsplit(url).query).get("login_timeout")
    if not values:
        return LOGIN_TIMEOUT
    if not values[-1].isdigit() or not 1 <= int(values[-1]) <= 3600:
        raise StoreError(f"login_timeout={values[-1]}: give a whole number of seconds from 1 to 3600")
    return int(values[-1])


def open_connection(url: str) -> Any:
    """A DB-API connection: mssql-python when installed, else pyodbc with ODBC Driver 18."""
    try:
        import mssql_python

        return mssql_python.connect(connection_string(url), timeout=login_timeout(url))
    except ImportError:
        pass
    try:
        import pyodbc
    except ImportError:
        raise StoreError("no SQL Server driver: pip install 'image-similarity[mssql]' (mssql-python),"
                         " or pyodbc with ODBC Driver 18") from None
    return pyodbc.connect(connection_string(url, driver=ODBC_DRIVER), timeout=login_timeout(url))


def _failure(err: Exception, secret: str | None) -> str:
    """The driver's reason on one line, with the password (raw or as the connection string spells it) blanked."""
    text = " ".join(str(err).split()) or type(err).__name__
    if secret:
        for form in (_odbc_value(secret), secret):  # the braced spelling first, as it holds the raw one
            text = text.replace(form, "***")
    return text


class TSQL(Dialect):
    """SQL Server: `dbo.` tables, `[key]`, TOP, OUTPUT INSERTED, and insert-if-absent as one statement whose
    key-range lock (UPDLOCK, HOLDLOCK) makes check-and-insert atomic."""

    prefix = "dbo."
    now = "SYSUTCDATETIME()"
    lock = " WITH (UPDLOCK, HOLDLOCK)"
    source_column = ("SELECT 1 FROM INFORMATION_SCHEMA.COLUMNS WHERE TABLE_SCHEMA = 'dbo'"
                     " AND TABLE_NAME = 'image_source' AND COLUMN_NAME = ?")

    def quote(self, name: str) -> str:
        return "[key]" if name == "key" else name

    def time_text(self, column: str) -> str:
        return f"CONVERT(nvarchar(33), {column}, 126)"

    def limit(self, sql: str, params: Sequence[Any], n: int) -> tuple[str, list]:
        return sql.replace("SELECT ", "SELECT TOP (?) ", 1), [n, *params]

    def _output(self, table: str, column: str | None) -> str:
        if column is None:
            return ""
        inserted = f"INSERTED.{column}"
        return f" OUTPUT {self.time_text(inserted) if SCHEMA[table].column(column).type == TIME else inserted}"

    def insert(self, table: str, columns: Sequence[str], returning: str | None = None, tail: str = "") -> str:
        names, values = self.row(table, columns)
        return self.sql(f"INSERT INTO {{{table}}} ({', '.join(names)}){self._output(table, returning)}"
                        f" VALUES ({', '.join(values)})")

    def insert_absent(self, table: str, row: dict[str, Any], keys: Sequence[str],
                      returning: str | None = None) -> tuple[str, list]:
        names, values = self.row(table, list(row))
        taken = " AND ".join(f"{k} = ?" for k in keys)
        return self.sql(f"INSERT INTO {{{table}}} ({', '.join(names)}){self._output(table, returning)}"
                        f" SELECT {', '.join(values)}"
                        f" WHERE NOT EXISTS (SELECT 1 FROM {{{table}}}{{lock}} WHERE {taken})"), \
            [*row.values(), *(row[k] for k in keys)]

    def insert_absent_rows(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        names, values = self.row(table, columns)
        bound = names[:len(columns)]
        chosen = ", ".join([*(f"v.{n}" for n in bound), *values[len(columns):]])
        taken = " AND ".join(f"o.{k} = v.{k}" for k in keys)
        return self.sql(f"INSERT INTO {{{table}}} ({', '.join(names)}) SELECT {chosen} FROM (VALUES {{{{rows}}}}) AS v"
                        f" ({', '.join(bound)}) WHERE NOT EXISTS (SELECT 1 FROM {{{table}}} AS o{{lock}} WHERE {taken})")

    def upsert(self, table: str, row: dict[str, Any], keys: Sequence[str], touch: str) -> list[tuple[str, list]]:
        where = " AND ".join(f"{k} = ?" for k in keys)
        return [(self.sql(f"UPDATE {{{table}}} SET {touch} = {{now}} WHERE {where}"), [row[k] for k in keys]),
                self.insert_absent(table, row, keys)]

    def among(self, column: str) -> str:
        return f"{column} IN (SELECT id FROM OPENJSON(?) WITH (id int '$'))"


class Session:
    """A DB-API connection with autocommit off (mssql-python, pyodbc): statements outside `transaction()` end
    their own; many rows go as few multi-row statements (see `_multirow`), not one round trip per row."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.depth = conn, 0
        conn.autocommit = False

    def _run(self, sql: str, params: Sequence[Any]) -> Any:
        cur = self.conn.cursor()
        cur.execute(sql, *params) if params else cur.execute(sql)
        return cur

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.transaction():
            cur = self._run(sql, params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def first(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        with self.transaction():
            row = self._run(sql, params).fetchone()
        return tuple(row) if row else None

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.transaction():
            return self._run(sql, params).rowcount

    def query_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        per_statement = max(1, min(MAX_ROWS, MAX_PARAMETERS // len(rows[0]))) if _multirows(sql) else 1
        with self.transaction():
            for start in range(0, len(rows), per_statement):
                chunk = rows[start:start + per_statement]
                self._run(_multirow(sql, len(chunk[0]), len(chunk)), [a for row in chunk for a in row])

    def results(self, sql: str, params: Sequence[Any]) -> tuple[list[str], list[tuple]]:
        """(column names, rows) of the last result set of a procedure call."""
        with self.transaction():
            cur = self._run(sql, params)
            columns, rows = [], []
            while True:
                if cur.description:
                    columns, rows = [d[0] for d in cur.description], [tuple(r) for r in cur.fetchall()]
                if not cur.nextset():
                    return columns, rows

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        except BaseException:
            if self.depth == 1:
                self.conn.rollback()
            raise
        else:
            if self.depth == 1:
                self.conn.commit()
        finally:
            self.depth -= 1

    def snapshot(self) -> nullcontext[None]:
        """Reads statement by statement: a snapshot would need ALLOW_SNAPSHOT_ISOLATION on the database."""
        return nullcontext()

    def close(self) -> None:
        self.conn.close()


class MSSQLStore(SQLStore):
    """Store in a SQL Server database whose tables SQLR/02_Tables.sql created. Every write is one transaction."""

    d = TSQL()
    server = "SQL Server"

    def __init__(self, url: str, connection: Any = None) -> None:
        parts = urlsplit(url)
        self.url = f"mssql://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"  # no user
        failure = None
        try:
            self.conn = connection if connection is not None else open_connection(url)
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - driver errors: report the server, never the connection string
            failure = _failure(err, os.environ.get(PASSWORD_ENV))
        if failure is not None:  # raised here, outside `except`, so no driver exception rides along as __context__
            raise StoreError(f"cannot connect to SQL Server at {parts.hostname}:{parts.port or 1433}"
                             f" (database {unquote(parts.path.lstrip('/'))!r}): {failure}")
        self.db = Session(self.conn)

    @cached_property
    def capabilities(self) -> frozenset[str]:
        """PROCEDURES; VECTOR_SEARCH where SQLR/12_Vectors.sql made its tables (SQL Server 2025), asked once."""
        vectors = self.db.first("SELECT OBJECT_ID(N'dbo.method_vectors', N'U');")
        return frozenset({PROCEDURES} | ({VECTOR_SEARCH} if vectors and vectors[0] is not None else set()))

    def nearest(self, backbone: str, vector: np.ndarray, method: str, top: int, exclude: Sequence[int] = (),
                approximate: bool | None = None, model_version: int = 0,
                ef_search: int | None = None) -> list[tuple[int, float]]:
        """(image id, score) of the `top` best matches by VECTOR_DISTANCE, exactly (`approximate` True is refused:
        the DiskANN index is a preview feature this store does not query; so `ef_search` has nothing to set)."""
        if VECTOR_SEARCH not in self.capabilities:
            return super().nearest(backbone, vector, method, top, exclude, approximate, model_version, ef_search)
        if method not in SCORES:
            raise BadInput(f"the database ranks by {', '.join(SCORES)}, not {method!r}")
        if approximate:
            raise StoreError("SQL Server ranks exactly (VECTOR_DISTANCE): use --index exact or auto")
        query = padded_json(np.asarray(vector, dtype=np.float32))
        if query is None:
            raise BadInput(f"{method} vectors of {len(vector)} values: VECTOR holds {VECTOR_DIMENSIONS} at most")
        key = (int(model_version), method) if method in STORED_METHODS else (backbone,)
        rows = self.db.query(f"SELECT TOP (?) v.image_id, {SCORES[method]} AS score FROM"
                             f" ({ROWS[method in STORED_METHODS]}) AS v WHERE v.image_id NOT IN"
                             " (SELECT id FROM OPENJSON(?) WITH (id int '$')) ORDER BY score DESC, v.image_id",
                             (int(top), query, *key, json.dumps([int(i) for i in exclude])))
        return [(int(i), float(score)) for i, score in rows]

    def searchable(self, backbone: str, method: str, model_version: int = 0) -> bool:
        if VECTOR_SEARCH not in self.capabilities:
            return False
        key = (int(model_version), method) if method in STORED_METHODS else (backbone,)
        stored, featurized = self.db.first(f"SELECT (SELECT COUNT(*) FROM ({ROWS[method in STORED_METHODS]}) AS v),"
                                           " (SELECT COUNT(*) FROM dbo.features WHERE backbone = ?)", (*key, backbone))
        return stored == featurized > 0

    def put_method_vectors(self, model_version: int, method: str, ids: Sequence[int], rows: np.ndarray) -> None:
        values = [(int(model_version), method, int(i), padded_json(r))
                  for i, r in zip(ids, np.asarray(rows, np.float32))]
        self.db.query_many("INSERT INTO dbo.method_vectors (model_version, method, image_id, embedding)"
                           " SELECT v.model_version, v.method, v.image_id, CAST(v.embedding AS VECTOR(1998))"
                           " FROM (VALUES {rows}) AS v (model_version, method, image_id, embedding) WHERE NOT EXISTS"
                           " (SELECT 1 FROM dbo.method_vectors AS o WITH (UPDLOCK, HOLDLOCK) WHERE o.model_version ="
                           " v.model_version AND o.method = v.method AND o.image_id = v.image_id)",
                           [v for v in values if v[3] is not None])

    def method_vector_ids(self, model_version: int, method: str) -> set[int]:
        return {int(i) for (i,) in self.db.query("SELECT image_id FROM dbo.method_vectors WHERE model_version = ?"
                                                 " AND method = ?", (int(model_version), method))}

    def run_procedure(self, procedure: str, values: dict[str, Any]) -> tuple[list[str], list[tuple]]:
        """EXEC dbo.procedure @name = ?, ... with every value bound (names are plain identifiers)."""
        if not all(re.fullmatch(r"[A-Za-z_]\w*", name) for name in [procedure, *values]):
            raise StoreError(f"not a procedure or parameter name: {procedure} {list(values)}")
        statement = f"EXEC dbo.{procedure} " + ", ".join(f"@{name} = ?" for name in values)
        return self.db.results(statement, list(values.values()))


def _multirows(sql: str) -> bool:
    """Whether `sql` takes many rows at once: a `{rows}` list or an INSERT ... VALUES row (else one row a statement)."""
    return "{rows}" in sql or " VALUES " in sql


def _multirow(sql: str, columns: int, rows: int) -> str:
    """`sql` for `rows` rows: its `{rows}` (or the row after VALUES) repeated as one VALUES list."""
    if not _multirows(sql):
        return sql
    if "{rows}" in sql:
        return sql.replace("{rows}", ", ".join(["(" + ", ".join("?" * columns) + ")"] * rows))
    head, _, row = sql.partition(" VALUES ")
    return f"{head} VALUES {', '.join([row] * rows)}"

