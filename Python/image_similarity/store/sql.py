"""Every store operation written once, as SQL over a small dialect per database, on a connection that runs
constant statement text with bound values.

Statement templates name tables and columns in braces: `{images}` becomes the dialect's table name,
`{key}` a quoted column, `{created_at:time}` / `{params:json}` / `{vector:vector}` the expression that reads
such a column back as text, JSON text or vector bytes; `?` is the bound-value placeholder; `{now}` the time.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from ..errors import NotFound, NotReady, StoreError, first_line
from .base import (
    EvaluationRecord,
    ImageRow,
    ModelRecord,
    NetworkRecord,
    NewImage,
    Store,
    decode_array,
    encode_array,
    finite,
    network_name,
    strict_json,
)
from .schema import JSON, SCHEMA, TIME

LAST_ID = 2 ** 63 - 1
SOURCE = "SELECT item_key, label, data, NULL AS metadata FROM image_source WHERE item_key > ? ORDER BY item_key"
SOURCE_WITH_METADATA = "SELECT item_key, label, data, metadata FROM image_source WHERE item_key > ? ORDER BY item_key"
"""The view's rows (issue 29): fixed names, the metadata column read where the view has one."""


class Connection(Protocol):
    """What the store needs of a database connection (every value bound, never spliced)."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """All rows of a statement (none for a write)."""

    def query_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many rows of values."""

    def first(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """The first row of a statement: what an INSERT's RETURNING / OUTPUT gives, or None."""

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a write; the number of rows it changed."""

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction: committed whole, or rolled back whole."""

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads that see one snapshot of the database."""

    def close(self) -> None: ...


class _Names(dict):
    """Template names: tables get the dialect's prefix, columns its quoting and read expressions."""

    def __init__(self, dialect: Dialect) -> None:
        super().__init__(now=dialect.now, lock=dialect.lock)
        self.dialect = dialect

    def __missing__(self, name: str) -> _Name:
        return _Name(self.dialect, name)


class _Name(str):
    def __new__(cls, dialect: Dialect, name: str) -> _Name:
        self = super().__new__(cls, name)
        self.dialect = dialect
        return self

    def __format__(self, spec: str) -> str:
        d = self.dialect
        if not spec:
            return d.prefix + self if self in SCHEMA else d.quote(self)
        return {"time": d.time_text, "json": d.json_text, "vector": d.vector_read}[spec](d.quote(self))


class Dialect:
    """How one database spells the store's SQL; the defaults are SQLite's. Subclasses set the attributes and
    override the builders whose syntax differs (PostgreSQL shares SQLite's `ON CONFLICT` and `RETURNING`)."""

    placeholder = "?"
    prefix = ""
    now = "CURRENT_TIMESTAMP"
    lock = ""
    """Table hint that holds a checked key until the transaction ends (SQL Server)."""
    vector_column = "vector"
    source_column = "SELECT 1 FROM pragma_table_info('image_source') WHERE name = ?"
    """Whether the view image_source has the column (bound), from the catalogue."""

    def __init__(self) -> None:
        self.names = _Names(self)
        self.cache: dict[str, str] = {}

    def sql(self, template: str) -> str:
        """A statement template in this dialect (cached: templates are constants)."""
        if template not in self.cache:
            self.cache[template] = template.format_map(self.names).replace("?", self.placeholder)
        return self.cache[template]

    def quote(self, name: str) -> str:
        return self.vector_column if name == "vector" else name

    def time_text(self, column: str) -> str:
        return column

    def json_text(self, column: str) -> str:
        return column

    def vector_read(self, column: str) -> str:
        return column

    def bind(self, column_type: str) -> str:
        """The placeholder of a value of an abstract column type."""
        return "?"

    def row(self, table: str, columns: Sequence[str]) -> tuple[list[str], list[str]]:
        """(column names, values) of an INSERT of `columns` (bound), then the table's TIME columns (set to now)."""
        times = [c.name for c in SCHEMA[table].columns if c.type == TIME and c.name not in columns]
        values = [self.bind(SCHEMA[table].column(c).type) for c in columns] + ["{now}"] * len(times)
        return [f"{{{c}}}" for c in [*columns, *times]], values

    def limit(self, sql: str, params: Sequence[Any], n: int) -> tuple[str, list]:
        """A SELECT statement (this dialect's text) of its first `n` rows."""
        return f"{sql} LIMIT {self.placeholder}", [*params, n]

    def insert(self, table: str, columns: Sequence[str], returning: str | None = None, tail: str = "") -> str:
        """INSERT of one row of `columns`; `returning` a column whose new value the statement gives back."""
        names, values = self.row(table, columns)
        end = f" RETURNING {{{returning}{':time' if SCHEMA[table].column(returning).type == TIME else ''}}}" \
            if returning else ""
        return self.sql(f"INSERT INTO {{{table}}} ({', '.join(names)}) VALUES ({', '.join(values)}){tail}{end}")

    serialize_images: str | None = None
    """A statement that makes the transaction that runs it the only one adding images until it ends; None where
    none is needed (SQLite's writers are one at a time already; SQL Server's statements lock with UPDLOCK, HOLDLOCK)."""

    def insert_absent(self, table: str, row: dict[str, Any], keys: Sequence[str],
                      returning: str | None = None) -> tuple[str, list]:
        """(statement, values) adding one row unless a row has the same `keys` values (a unique key, or any
        columns in a transaction that ran `serialize_images` for images), atomically."""
        names, values = self.row(table, list(row))
        taken = " AND ".join(f"{{{k}}} = ?" for k in keys)
        end = f" RETURNING {{{returning}}}" if returning else ""
        return self.sql(f"INSERT INTO {{{table}}} ({', '.join(names)}) SELECT {', '.join(values)}"
                        f" WHERE NOT EXISTS (SELECT 1 FROM {{{table}}} WHERE {taken}){end}"), \
            [*row.values(), *(row[k] for k in keys)]

    def insert_absent_rows(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        """INSERT of many rows (see Connection.query_many), each unless its `keys` are taken."""
        return self.insert(table, columns, tail=f" ON CONFLICT ({', '.join(keys)}) DO NOTHING")

    def upsert(self, table: str, row: dict[str, Any], keys: Sequence[str], touch: str) -> list[tuple[str, list]]:
        """Statements adding one row, or setting `touch` to now where its `keys` are taken."""
        return [(self.insert(table, list(row), tail=f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {touch}"
                             f" = excluded.{touch}"), list(row.values()))]

    def among(self, column: str) -> str:
        """`column` is one of the ids bound as `ids(values)`."""
        return f"{column} IN (SELECT value FROM json_each(?))"

    def ids(self, values: Sequence[int]) -> Any:
        return json.dumps([int(v) for v in values])

    def vector_value(self, vector: np.ndarray) -> Any:
        """A float32 vector as the VECTOR column takes it: little-endian float32 bytes."""
        return np.ascontiguousarray(vector, "<f4").tobytes()

    def vectors(self, blobs: list[Any], dim: int) -> np.ndarray:
        """The (n, dim) float32 matrix of `vector_read` values."""
        return np.frombuffer(b"".join(map(bytes, blobs)), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)


class SQLStore(Store):
    """The store's operations on any database: `self.db` runs statements that `self.d` spells."""

    d: Dialect
    db: Connection

    def _rows(self, template: str, *params: Any) -> list[tuple]:
        return self.db.query(self.d.sql(template), params)

    def _run(self, template: str, *params: Any) -> None:
        self.db.query(self.d.sql(template), params)

    def _latest(self, template: str, where: str, params: Sequence[Any], order: str) -> tuple | None:
        rows = self.db.query(*self.d.limit(self.d.sql(template + where + order), params, 1))
        return tuple(rows[0]) if rows else None

    def reading(self) -> AbstractContextManager[None]:
        return self.db.snapshot()

    def close(self) -> None:
        self.db.close()

    # images
    IMAGE_COLUMNS = "id, name, label, sha256, dhash, item_key, {metadata:json}"

    def _image_rows(self, where: str, *params: Any) -> list[ImageRow]:
        rows = self._rows(f"SELECT {self.IMAGE_COLUMNS} FROM {{images}}{where}", *params)
        return [ImageRow(int(i), n, label, sha, dh, key, None if meta is None else json.loads(meta))
                for i, n, label, sha, dh, key, meta in rows]

    def add_image(self, image: NewImage) -> int | None:
        row = {"name": image.name, "label": image.label, "format": image.format, "width": image.width,
               "height": image.height, "mode": image.mode, "size_bytes": len(image.data), "sha256": image.sha256,
               "dhash": image.dhash, "data": image.data, "item_key": image.key,
               "metadata": None if image.metadata is None else strict_json(image.metadata)}
        with self.db.transaction():
            if self.d.serialize_images:
                self._run(self.d.serialize_images)
            if image.key is None:
                added = self.db.first(*self.d.insert_absent("images", row, ["sha256"], returning="id"))
                return int(added[0]) if added else None
            stored = self._rows("SELECT id, sha256 FROM {images}{lock} WHERE item_key = ?", image.key)
            if stored and stored[0][1] == image.sha256:
                return None
            if stored:  # the item's new image: the old row goes with everything computed from it
                self._delete_image(int(stored[0][0]))
            (added,) = self.db.first(self.d.insert("images", list(row), "id"), list(row.values()))
        return int(added)

    def find_sha256(self, sha256: str) -> ImageRow | None:
        rows = self._image_rows(" WHERE sha256 = ? ORDER BY id", sha256)
        return rows[0] if rows else None

    def find_key(self, key: str) -> ImageRow | None:
        rows = self._image_rows(" WHERE item_key = ?", key)
        return rows[0] if rows else None

    def source_rows(self, batch_size: int = 100) -> Iterator[list[tuple[str, str | None, bytes | None, Any]]]:
        last = ""
        while True:
            try:
                if not last:  # the view's optional metadata column: one of two constant statements
                    sql = self.d.sql(SOURCE_WITH_METADATA if self.db.query(self.d.sql(self.d.source_column),
                                                                           ("metadata",)) else SOURCE)
                batch = self.db.query(*self.d.limit(sql, (last,), int(batch_size)))
            except Exception as err:  # noqa: BLE001 - each driver's error for a missing view or column
                raise StoreError(f"cannot read the view image_source (item_key, label, data): {first_line(err)}"
                                 ) from None
            if not batch:
                return
            last = batch[-1][0]
            yield [(str(k), label, None if data is None else bytes(data), metadata)
                   for k, label, data, metadata in batch]

    def record_rejected(self, name: str, label: str | None, reason: str, stage: str) -> None:
        with self.db.transaction():
            for sql, params in self.d.upsert("rejected_files", {"name": name, "label": label or "", "stage": stage,
                                                                "reason": reason}, ["name", "stage", "reason"],
                                             "seen_at"):
                self.db.query(sql, params)

    def rejected(self) -> list[tuple[str, str, str, str]]:
        return self._rows("SELECT name, label, stage, reason FROM {rejected_files} ORDER BY id")

    def images(self) -> list[ImageRow]:
        return self._image_rows(" ORDER BY id")

    def image_bytes(self, image_id: int) -> bytes:
        rows = self._rows("SELECT data FROM {images} WHERE id = ?", int(image_id))
        if not rows:
            raise NotFound(f"no image with id {image_id}")
        return bytes(rows[0][0])

    def remove_image(self, image_id: int) -> bool:
        with self.db.transaction():
            return self._delete_image(int(image_id))

    def _delete_image(self, image_id: int) -> bool:
        """Delete an image and what names it, in the caller's transaction (features, splits, its own neighbours and
        method vectors go by ON DELETE CASCADE); whether it was there."""
        self._run("DELETE FROM {rankings} WHERE image_id = ?", image_id)
        self._run("DELETE FROM {neighbors} WHERE neighbor_id = ?", image_id)
        return self.db.count(self.d.sql("DELETE FROM {images} WHERE id = ?"), (image_id,)) == 1

    def relabel_image(self, image_id: int, label: str) -> bool:
        with self.db.transaction():
            return self.db.count(self.d.sql("UPDATE {images} SET label = ? WHERE id = ?"), (label, int(image_id))) == 1

    def catalogue_stamp(self, backbone: str) -> tuple[int, int, int, int]:
        row = self._rows("SELECT (SELECT MAX(version) FROM {models}), (SELECT MAX(id) FROM {evaluations}),"
                         " COUNT(*), MAX(image_id) FROM {features} WHERE backbone = ?", backbone)[0]
        return tuple(int(v or 0) for v in row)

    # features
    def missing_features(self, backbone: str, batch_size: int,
                         id_range: tuple[int, int] | None = None) -> Iterator[list[tuple[int, bytes]]]:
        last, end = (int(id_range[0]) - 1, int(id_range[1])) if id_range else (0, LAST_ID)
        sql = self.d.sql("SELECT i.id, i.data FROM {images} AS i WHERE i.id > ? AND i.id <= ? AND NOT EXISTS"
                         " (SELECT 1 FROM {features} AS f WHERE f.image_id = i.id AND f.backbone = ?) ORDER BY i.id")
        while True:
            batch = self.db.query(*self.d.limit(sql, (last, end, backbone), int(batch_size)))
            if not batch:
                return
            last = batch[-1][0]
            yield [(int(i), bytes(d)) for i, d in batch]

    def put_features(self, backbone: str, ids: Sequence[int], vectors: np.ndarray, precision: str = "fp32",
                     computed_by: tuple[str, str] | None = None) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        with self.db.transaction():
            self.db.query_many(self.d.insert_absent_rows("features", ["image_id", "backbone", "dim", "vector"],
                                                         ["image_id", "backbone"]),
                               [(int(i), backbone, vectors.shape[1], self.d.vector_value(v)) for i, v in zip(ids, vectors)])
            self.db.query_many(self.d.insert_absent_rows("feature_precisions", ["image_id", "backbone", "precision_used"],
                                                         ["image_id", "backbone"]),
                               [(int(i), backbone, precision) for i in ids])
            if computed_by is not None:
                self.db.query_many(self.d.insert_absent_rows("feature_runtimes",
                                                             ["image_id", "backbone", "runtime", "network_hash"],
                                                             ["image_id", "backbone"]),
                                   [(int(i), backbone, *computed_by) for i in ids])

    def features(self, backbone: str, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        select = "SELECT image_id, dim, {vector:vector} FROM {features} WHERE backbone = ?"
        if ids is None:
            rows = self._rows(select + " ORDER BY image_id", backbone)
        else:
            rows = self._rows(select + " AND " + self.d.among("image_id") + " ORDER BY image_id", backbone,
                              self.d.ids(ids))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.array([r[0] for r in rows], dtype=np.int64), self.d.vectors([r[2] for r in rows], int(rows[0][1]))

    def feature_dim(self, backbone: str) -> int | None:
        sql = self.d.sql("SELECT dim FROM {features} WHERE backbone = ?")
        rows = self.db.query(*self.d.limit(sql, (backbone,), 1))
        return int(rows[0][0]) if rows else None

    def feature_counts(self) -> dict[str, int]:
        return {b: int(n) for b, n in self._rows("SELECT backbone, COUNT(*) FROM {features} GROUP BY backbone")}

    def feature_precisions(self, backbone: str) -> dict[str, int]:
        return {p: int(n) for p, n in self._rows("SELECT precision_used, COUNT(*) FROM {feature_precisions}"
                                                 " WHERE backbone = ? GROUP BY precision_used", backbone)}

    def feature_runtimes(self, backbone: str) -> dict[tuple[str, str], int]:
        rows = self._rows("SELECT runtime, network_hash, COUNT(*) FROM {feature_runtimes} WHERE backbone = ?"
                          " GROUP BY runtime, network_hash", backbone)
        return {(runtime, digest): int(n) for runtime, digest, n in rows}

    # split
    def put_split(self, subsets: dict[int, str], seed: int, test_fraction: float) -> None:
        with self.db.transaction():
            self._run("DELETE FROM {splits}")
            self.db.query_many(self.d.insert("splits", ["image_id", "subset", "seed", "test_fraction"]),
                               [(int(i), s, int(seed), float(test_fraction)) for i, s in subsets.items()])

    def split(self) -> dict[int, str]:
        return {int(i): s for i, s in self._rows("SELECT image_id, subset FROM {splits} ORDER BY image_id")}

    # models
    def put_model(self, model: ModelRecord) -> int:
        with self.db.transaction():
            (version,) = self.db.first(self.d.insert("models", ["backbone", "classes", "params"], "version"),
                                       (model.backbone, json.dumps(model.classes), json.dumps(model.params)))
            self.db.query_many(self.d.insert("model_arrays", ["version", "name", "dtype", "shape", "data"]),
                               [(version, name, *encode_array(a)) for name, a in model.arrays.items()])
        return int(version)

    def model(self, version: int | None = None) -> ModelRecord:
        row = self._latest("SELECT version, backbone, {classes:json}, {params:json}, {created_at:time} FROM {models}",
                           "" if version is None else " WHERE version = ?", () if version is None else (int(version),),
                           " ORDER BY version DESC")
        if row is None:
            raise NotReady("no trained model: run 'image-similarity train' first" if version is None
                           else f"no model version {version}")
        arrays = {name: decode_array(dtype, shape, bytes(data)) for name, dtype, shape, data in self._rows(
            "SELECT name, dtype, shape, data FROM {model_arrays} WHERE version = ?", row[0])}
        return ModelRecord(version=int(row[0]), backbone=row[1], classes=json.loads(row[2]), arrays=arrays,
                           params=json.loads(row[3]), created_at=row[4])

    # evaluation
    def put_evaluation(self, evaluation: EvaluationRecord) -> int:
        """Undefined figures (NaN: a class with no test image) are null in the summary and left out of the metric
        rows, as every database can hold that."""
        with self.db.transaction():
            (eid,) = self.db.first(self.d.insert("evaluations", ["model_version", "summary"], "id"),
                                   (int(evaluation.model_version), strict_json(evaluation.summary)))
            self.db.query_many(self.d.insert("evaluation_metrics", ["evaluation_id", "scope", "metric", "class", "value"]),
                               [(eid, s, m, c, float(v)) for s, m, c, v in evaluation.metrics if finite(v) is not None])
            self.db.query_many(self.d.insert("evaluation_confusion", ["evaluation_id", "subset", "true_label",
                                                                      "predicted_label", "count"]),
                               [(eid, s, t, p, int(n)) for s, t, p, n in evaluation.confusion])
        return int(eid)

    def evaluation(self, model_version: int | None = None) -> EvaluationRecord | None:
        row = self._latest("SELECT id, model_version, {summary:json}, {created_at:time} FROM {evaluations}",
                           "" if model_version is None else " WHERE model_version = ?",
                           () if model_version is None else (int(model_version),), " ORDER BY id DESC")
        if row is None:
            return None
        metrics = self._rows("SELECT scope, metric, class, value FROM {evaluation_metrics} WHERE evaluation_id = ?",
                             row[0])
        confusion = self._rows("SELECT subset, true_label, predicted_label, count FROM {evaluation_confusion}"
                               " WHERE evaluation_id = ?", row[0])
        return EvaluationRecord(id=int(row[0]), model_version=int(row[1]), summary=json.loads(row[2]),
                                created_at=row[3], metrics=metrics, confusion=confusion)

    # rankings
    def put_ranking(self, query: dict[str, Any], rows: Sequence[tuple[int, int, float]]) -> int:
        version = query.get("model_version")
        with self.db.transaction():
            (qid,) = self.db.first(self.d.insert("queries", ["query_name", "query_sha256", "method", "backbone",
                                                             "model_version"], "id"),
                                   (query["name"], query["sha256"], query["method"], query["backbone"],
                                    None if version is None else int(version)))
            self.db.query_many(self.d.insert("rankings", ["query_id", "rank", "image_id", "score"]),
                               [(qid, int(r), int(i), float(s)) for r, i, s in rows])
        return int(qid)

    # neighbors
    def put_neighbors(self, backbone: str, method: str, model_version: int,
                      rows: Sequence[tuple[int, int, int, float]]) -> None:
        with self.db.transaction():
            self.db.query_many(
                self.d.insert_absent_rows("neighbors", ["image_id", "backbone", "method", "model_version", "rank",
                                                        "neighbor_id", "score"],
                                          ["image_id", "backbone", "method", "model_version", "rank"]),
                [(int(i), backbone, method, int(model_version), int(r), int(n), float(s)) for i, r, n, s in rows])

    def neighbor_ids(self, backbone: str, method: str, model_version: int) -> set[int]:
        return {int(r[0]) for r in self._rows("SELECT DISTINCT image_id FROM {neighbors} WHERE backbone = ?"
                                              " AND method = ? AND model_version = ?", backbone, method,
                                              int(model_version))}

    def delete_neighbors(self, backbone: str, method: str, model_version: int) -> None:
        with self.db.transaction():
            self._run("DELETE FROM {neighbors} WHERE backbone = ? AND method = ? AND model_version = ?",
                        backbone, method, int(model_version))

    def neighbors(self, image_id: int, backbone: str, method: str,
                  model_version: int) -> list[tuple[int, int, str, str, float]]:
        return [(int(r), int(n), name, label, float(s)) for r, n, name, label, s in self._rows(
            "SELECT n.rank, n.neighbor_id, i.name, i.label, n.score FROM {neighbors} AS n JOIN {images} AS i"
            " ON i.id = n.neighbor_id WHERE n.image_id = ? AND n.backbone = ? AND n.method = ?"
            " AND n.model_version = ? ORDER BY n.rank", int(image_id), backbone, method, int(model_version))]

    # refined networks (issue 14)
    def create_network(self, base: str, params: dict[str, Any]) -> NetworkRecord:
        with self.db.transaction():
            (version,) = self.db.first(self.d.sql("SELECT COALESCE(MAX(version), 0) + 1 FROM {networks}{lock}"
                                                  " WHERE base = ?"), (base,))
            name = network_name(base, int(version))
            (created,) = self.db.first(self.d.insert("networks", ["name", "base", "version", "status", "params",
                                                                  "metrics"], "created_at"),
                                       (name, base, int(version), "training", json.dumps(params), "{}"))
        return NetworkRecord(name, base, int(version), "training", params, {}, created)

    def networks(self) -> list[NetworkRecord]:
        rows = self._rows("SELECT name, base, version, status, {params:json}, {metrics:json}, {created_at:time}"
                          " FROM {networks} ORDER BY base, version")
        return [NetworkRecord(n, b, int(v), s, json.loads(p), json.loads(m), c) for n, b, v, s, p, m, c in rows]

    def network_arrays(self, name: str, kind: str) -> dict[str, tuple[str, str, bytes]]:
        rows = self._rows("SELECT {key}, dtype, shape, data FROM {network_arrays} WHERE network = ? AND kind = ?"
                          " ORDER BY {key}", name, kind)
        return {key: (dtype, shape, bytes(data)) for key, dtype, shape, data in rows}

    def put_network(self, name: str, status: str, metrics: dict[str, Any],
                    arrays: dict[str, dict[str, np.ndarray]], drop: Sequence[str] = ()) -> None:
        with self.db.transaction():
            self._run("UPDATE {networks} SET status = ?, metrics = " + self.d.bind(JSON) + " WHERE name = ?",
                        status, json.dumps(metrics), name)
            for kind in [*arrays, *drop]:
                self._run("DELETE FROM {network_arrays} WHERE network = ? AND kind = ?", name, kind)
            self.db.query_many(self.d.insert("network_arrays", ["network", "kind", "key", "dtype", "shape", "data"]),
                               [(name, kind, key, *encode_array(a)) for kind, group in arrays.items()
                                for key, a in group.items()])
