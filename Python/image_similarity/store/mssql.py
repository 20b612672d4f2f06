"""A SQL Server store: the tables SQLR/02_Tables.sql creates, reached with mssql-python or pyodbc.

URL: `mssql://[user@]host[:port]/database[?encrypt=yes&trust_server_certificate=no&login_timeout=15]`. With a
user, the password comes from the environment variable IMAGE_SIMILARITY_DB_PASSWORD (never from the URL, never
printed); without one, Windows authentication (Trusted_Connection). `login_timeout` bounds, in seconds, how long
the driver may spend reaching the server and logging in.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from ..errors import NotFound, NotReady
from .base import (
    EvaluationRecord,
    ImageRow,
    ModelRecord,
    NetworkRecord,
    NewImage,
    Store,
    StoreError,
    decode_array,
    encode_array,
    finite,
    network_name,
    strict_json,
)

PASSWORD_ENV = "IMAGE_SIMILARITY_DB_PASSWORD"
ODBC_DRIVER = "ODBC Driver 18 for SQL Server"
OPTIONS = {"encrypt": "Encrypt", "trust_server_certificate": "TrustServerCertificate"}
LOGIN_TIMEOUT = 15  # seconds, ODBC's own default
MAX_PARAMETERS = 2000  # per statement; SQL Server allows 2100
MAX_ROWS = 1000  # per VALUES list, SQL Server's limit


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


class MSSQLStore(Store):
    """Store in a SQL Server database whose tables SQLR/02_Tables.sql created. Every write is one transaction."""

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
        self.conn.autocommit = False

    def _all(self, sql: str, *args: Any) -> list[tuple]:
        cur = self.conn.cursor()
        cur.execute(sql, *args) if args else cur.execute(sql)
        rows = [tuple(r) for r in cur.fetchall()]
        self.conn.commit()
        return rows

    def _write(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]], returning: str | None = None) -> Any:
        """Run (sql, rows) pairs in one transaction. With `returning`, the first statement inserts one row and
        outputs that identity column, whose value replaces `_ID` in the later rows; it is returned. Many rows
        go as few multi-row statements (see `_multirow`), not one round trip per row."""
        cur = self.conn.cursor()
        try:
            value = None
            for n, (sql, rows) in enumerate(statements):
                rows = [[value if a is _ID else a for a in row] for row in rows]
                if n == 0 and returning:
                    cur.execute(sql.replace(" VALUES ", f" OUTPUT INSERTED.{returning} VALUES ", 1), *rows[0])
                    value = cur.fetchone()[0]
                elif rows and rows[0]:
                    per_statement = max(1, min(MAX_ROWS, MAX_PARAMETERS // len(rows[0]))) if _multirows(sql) else 1
                    for start in range(0, len(rows), per_statement):
                        chunk = rows[start:start + per_statement]
                        cur.execute(_multirow(sql, len(chunk[0]), len(chunk)), *[a for row in chunk for a in row])
                elif rows:
                    cur.execute(sql)
            self.conn.commit()
            return value
        except Exception:
            self.conn.rollback()
            raise

    def close(self) -> None:
        self.conn.close()

    # images
    def add_image(self, image: NewImage) -> int | None:
        """One statement: the key-range lock (UPDLOCK, HOLDLOCK) makes check-and-insert atomic, so concurrent
        ingest of the same bytes adds one row and never fails on the unique key."""
        cur = self.conn.cursor()
        try:
            cur.execute(
                "INSERT INTO dbo.images (name, label, format, width, height, mode, size_bytes, sha256, dhash, data)"
                " OUTPUT INSERTED.id SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS"
                " (SELECT 1 FROM dbo.images WITH (UPDLOCK, HOLDLOCK) WHERE sha256 = ?)",
                image.name, image.label, image.format, image.width, image.height, image.mode, len(image.data),
                image.sha256, image.dhash, image.data, image.sha256)
            row = cur.fetchone()
            self.conn.commit()
        except Exception:
            self.conn.rollback()
            raise
        return int(row[0]) if row else None

    def find_sha256(self, sha256: str) -> ImageRow | None:
        rows = self._all("SELECT id, name, label, sha256, dhash FROM dbo.images WHERE sha256 = ?", sha256)
        return ImageRow(*rows[0]) if rows else None

    def record_rejected(self, name: str, label: str, reason: str, stage: str) -> None:
        self._write([(
            ("MERGE dbo.rejected_files AS r USING (SELECT ? AS name, ? AS label, ? AS stage, ? AS reason) AS s"
             " ON r.name = s.name AND r.stage = s.stage AND r.reason = s.reason"
             " WHEN MATCHED THEN UPDATE SET seen_at = SYSUTCDATETIME()"
             " WHEN NOT MATCHED THEN INSERT (name, label, stage, reason) VALUES (s.name, s.label, s.stage, s.reason);"),
            [(name, label, stage, reason)])])

    def rejected(self) -> list[tuple[str, str, str, str]]:
        return self._all("SELECT name, label, stage, reason FROM dbo.rejected_files ORDER BY id")

    def images(self) -> list[ImageRow]:
        return [ImageRow(*r) for r in self._all("SELECT id, name, label, sha256, dhash FROM dbo.images ORDER BY id")]

    def image_bytes(self, image_id: int) -> bytes:
        rows = self._all("SELECT data FROM dbo.images WHERE id = ?", image_id)
        if not rows:
            raise NotFound(f"no image with id {image_id}")
        return bytes(rows[0][0])

    def catalogue_stamp(self, backbone: str) -> tuple[int, int, int, int]:  # issue 18
        row = self._all("SELECT (SELECT MAX(version) FROM dbo.models), (SELECT MAX(id) FROM dbo.evaluations),"
                        " COUNT(*), MAX(image_id) FROM dbo.features WHERE backbone = ?", backbone)[0]
        return tuple(int(v or 0) for v in row)

    # features
    def missing_features(self, backbone: str, batch_size: int,
                         id_range: tuple[int, int] | None = None) -> Iterator[list[tuple[int, bytes]]]:
        last, end = (int(id_range[0]) - 1, int(id_range[1])) if id_range else (0, 2 ** 31 - 1)
        while True:
            batch = self._all(
                "SELECT TOP (?) i.id, i.data FROM dbo.images AS i WHERE i.id > ? AND i.id <= ? AND NOT EXISTS"
                " (SELECT 1 FROM dbo.features AS f WHERE f.image_id = i.id AND f.backbone = ?) ORDER BY i.id",
                batch_size, last, end, backbone)
            if not batch:
                return
            last = batch[-1][0]
            yield [(int(i), bytes(d)) for i, d in batch]

    def put_features(self, backbone: str, ids: Sequence[int], vectors: np.ndarray, precision: str = "fp32") -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        self._write([(
            ("INSERT INTO dbo.features (image_id, backbone, dim, vector)"
             " SELECT v.image_id, v.backbone, v.dim, v.vector FROM (VALUES {rows}) AS v (image_id, backbone, dim, vector)"
             " WHERE NOT EXISTS (SELECT 1 FROM dbo.features AS f WHERE f.image_id = v.image_id"
             " AND f.backbone = v.backbone)"),
            [(int(i), backbone, vectors.shape[1], v.tobytes()) for i, v in zip(ids, vectors)]), (
            ("INSERT INTO dbo.feature_precisions (image_id, backbone, precision_used)"
             " SELECT v.image_id, v.backbone, v.precision_used FROM (VALUES {rows}) AS v (image_id, backbone, precision_used)"
             " WHERE NOT EXISTS (SELECT 1 FROM dbo.feature_precisions AS p WHERE p.image_id = v.image_id"
             " AND p.backbone = v.backbone)"),
            [(int(i), backbone, precision) for i in ids])])

    def features(self, backbone: str, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = self._all("SELECT image_id, dim, vector FROM dbo.features WHERE backbone = ? ORDER BY image_id",
                         backbone)
        if ids is not None:
            wanted = {int(i) for i in ids}
            rows = [r for r in rows if r[0] in wanted]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        matrix = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype="<f4").reshape(len(rows), rows[0][1])
        return np.array([r[0] for r in rows], dtype=np.int64), matrix.astype(np.float32)

    def feature_counts(self) -> dict[str, int]:
        return dict(self._all("SELECT backbone, COUNT(*) FROM dbo.features GROUP BY backbone"))

    def feature_precisions(self, backbone: str) -> dict[str, int]:
        return dict(self._all("SELECT precision_used, COUNT(*) FROM dbo.feature_precisions WHERE backbone = ?"
                              " GROUP BY precision_used", backbone))

    # split
    def put_split(self, subsets: dict[int, str], seed: int, test_fraction: float) -> None:
        self._write([("DELETE FROM dbo.splits", [()]),
                     ("INSERT INTO dbo.splits (image_id, subset, seed, test_fraction) VALUES (?, ?, ?, ?)",
                      [(int(i), s, seed, test_fraction) for i, s in subsets.items()])])

    def split(self) -> dict[int, str]:
        return dict(self._all("SELECT image_id, subset FROM dbo.splits ORDER BY image_id"))

    # models
    def put_model(self, model: ModelRecord) -> int:
        return int(self._write([
            ("INSERT INTO dbo.models (backbone, classes, params) VALUES (?, ?, ?)",
             [(model.backbone, json.dumps(model.classes), json.dumps(model.params))]),
            ("INSERT INTO dbo.model_arrays (version, name, dtype, shape, data) VALUES (?, ?, ?, ?, ?)",
             [(_ID, name, *encode_array(a)) for name, a in model.arrays.items()]),
        ], returning="version"))

    def model(self, version: int | None = None) -> ModelRecord:
        select = "SELECT TOP (1) version, backbone, classes, params, CONVERT(nvarchar(33), created_at, 126)" \
                 " FROM dbo.models"
        rows = self._all(select + " ORDER BY version DESC") if version is None else \
            self._all(select + " WHERE version = ?", version)
        if not rows:
            raise NotReady("no trained model: run 'image-similarity train' first" if version is None
                             else f"no model version {version}")
        v, backbone, classes, params, created = rows[0]
        arrays = {name: decode_array(dtype, shape, bytes(data)) for name, dtype, shape, data in self._all(
            "SELECT name, dtype, shape, data FROM dbo.model_arrays WHERE version = ?", v)}
        return ModelRecord(version=v, backbone=backbone, classes=json.loads(classes), arrays=arrays,
                           params=json.loads(params), created_at=created)

    # evaluation
    def put_evaluation(self, evaluation: EvaluationRecord) -> int:
        return int(self._write([
            ("INSERT INTO dbo.evaluations (model_version, summary) VALUES (?, ?)",
             [(evaluation.model_version, strict_json(evaluation.summary))]),
            ("INSERT INTO dbo.evaluation_metrics (evaluation_id, scope, metric, class, value) VALUES (?, ?, ?, ?, ?)",
             [(_ID, *row) for row in evaluation.metrics if finite(row[-1]) is not None]),
            (("INSERT INTO dbo.evaluation_confusion (evaluation_id, subset, true_label, predicted_label, count)"
              " VALUES (?, ?, ?, ?, ?)"),
             [(_ID, *row) for row in evaluation.confusion]),
        ], returning="id"))

    def evaluation(self, model_version: int | None = None) -> EvaluationRecord | None:
        select = "SELECT TOP (1) id, model_version, summary, CONVERT(nvarchar(33), created_at, 126) FROM dbo.evaluations"
        rows = self._all(select + " ORDER BY id DESC") if model_version is None else \
            self._all(select + " WHERE model_version = ? ORDER BY id DESC", model_version)
        if not rows:
            return None
        eid, version, summary, created = rows[0]
        metrics = self._all("SELECT scope, metric, class, value FROM dbo.evaluation_metrics WHERE evaluation_id = ?",
                            eid)
        confusion = self._all("SELECT subset, true_label, predicted_label, count FROM dbo.evaluation_confusion"
                              " WHERE evaluation_id = ?", eid)
        return EvaluationRecord(id=eid, model_version=version, summary=json.loads(summary), created_at=created,
                                metrics=metrics, confusion=confusion)

    # rankings
    def put_ranking(self, query: dict[str, Any], rows: Sequence[tuple[int, int, float]]) -> int:
        return int(self._write([
            ("INSERT INTO dbo.queries (query_name, query_sha256, method, backbone, model_version) VALUES (?, ?, ?, ?, ?)",
             [(query["name"], query["sha256"], query["method"], query["backbone"], query.get("model_version"))]),
            ("INSERT INTO dbo.rankings (query_id, rank, image_id, score) VALUES (?, ?, ?, ?)",
             [(_ID, r, i, float(s)) for r, i, s in rows]),
        ], returning="id"))

    # neighbors
    def put_neighbors(self, backbone: str, method: str, model_version: int,
                      rows: Sequence[tuple[int, int, int, float]]) -> None:
        self._write([(
            ("INSERT INTO dbo.neighbors (image_id, backbone, method, model_version, rank, neighbor_id, score)"
             " SELECT v.image_id, v.backbone, v.method, v.model_version, v.rank, v.neighbor_id, v.score"
             " FROM (VALUES {rows}) AS v (image_id, backbone, method, model_version, rank, neighbor_id, score)"
             " WHERE NOT EXISTS (SELECT 1 FROM dbo.neighbors AS o WHERE o.image_id = v.image_id"
             " AND o.backbone = v.backbone AND o.method = v.method AND o.model_version = v.model_version"
             " AND o.rank = v.rank)"),
            [(int(i), backbone, method, int(model_version), int(r), int(n), float(s)) for i, r, n, s in rows])])

    def neighbor_ids(self, backbone: str, method: str, model_version: int) -> set[int]:
        return {int(r[0]) for r in self._all(
            "SELECT DISTINCT image_id FROM dbo.neighbors WHERE backbone = ? AND method = ? AND model_version = ?",
            backbone, method, int(model_version))}

    def delete_neighbors(self, backbone: str, method: str, model_version: int) -> None:
        self._write([("DELETE FROM dbo.neighbors WHERE backbone = ? AND method = ? AND model_version = ?",
                      [(backbone, method, int(model_version))])])

    def neighbors(self, image_id: int, backbone: str, method: str,
                  model_version: int) -> list[tuple[int, int, str, str, float]]:
        return self._all(
            "SELECT n.rank, n.neighbor_id, i.name, i.label, n.score FROM dbo.neighbors AS n JOIN dbo.images AS i"
            " ON i.id = n.neighbor_id WHERE n.image_id = ? AND n.backbone = ? AND n.method = ?"
            " AND n.model_version = ? ORDER BY n.rank", int(image_id), backbone, method, int(model_version))


    # refined networks (issue 14)
    def create_network(self, base: str, params: dict[str, Any]) -> NetworkRecord:
        cur = self.conn.cursor()
        try:
            cur.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM dbo.networks WITH (UPDLOCK, HOLDLOCK)"
                        " WHERE base = ?", base)
            version = int(cur.fetchone()[0])
            name = network_name(base, version)
            cur.execute("INSERT INTO dbo.networks (name, base, version, status, params, metrics)"
                        " OUTPUT CONVERT(nvarchar(33), INSERTED.created_at, 126)"
                        " VALUES (?, ?, ?, 'training', ?, N'{}')", name, base, version, json.dumps(params))
            created = cur.fetchone()[0]
            self.conn.commit()
        except Exception:
            self.conn.rollback()
            raise
        return NetworkRecord(name, base, version, "training", params, {}, created)

    def networks(self) -> list[NetworkRecord]:
        rows = self._all("SELECT name, base, version, status, params, metrics, CONVERT(nvarchar(33), created_at, 126)"
                         " FROM dbo.networks ORDER BY base, version")
        return [NetworkRecord(n, b, int(v), s, json.loads(p), json.loads(m), c) for n, b, v, s, p, m, c in rows]

    def network_arrays(self, name: str, kind: str) -> dict[str, tuple[str, str, bytes]]:
        rows = self._all("SELECT [key], dtype, shape, data FROM dbo.network_arrays WHERE network = ? AND kind = ?"
                         " ORDER BY [key]", name, kind)
        return {key: (dtype, shape, bytes(data)) for key, dtype, shape, data in rows}

    def put_network(self, name: str, status: str, metrics: dict[str, Any],
                    arrays: dict[str, dict[str, np.ndarray]], drop: Sequence[str] = ()) -> None:
        self._write([
            ("UPDATE dbo.networks SET status = ?, metrics = ? WHERE name = ?", [(status, json.dumps(metrics), name)]),
            *[("DELETE FROM dbo.network_arrays WHERE network = ? AND kind = ?", [(name, kind)])
              for kind in [*arrays, *drop]],
            ("INSERT INTO dbo.network_arrays (network, kind, [key], dtype, shape, data) VALUES (?, ?, ?, ?, ?, ?)",
             [(name, kind, key, *encode_array(a)) for kind, group in arrays.items() for key, a in group.items()]),
        ])


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


_ID = object()
"""Placeholder in `_write` rows for the identity value the first statement created."""
