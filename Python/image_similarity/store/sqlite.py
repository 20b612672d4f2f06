"""The embedded default store: one SQLite file, no server."""
from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    network_name,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    mode TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    dhash TEXT NOT NULL,
    data BLOB NOT NULL,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected_files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    UNIQUE (name, stage, reason)
);
CREATE TABLE IF NOT EXISTS features (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    backbone TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (image_id, backbone)
);
CREATE TABLE IF NOT EXISTS splits (
    image_id INTEGER PRIMARY KEY REFERENCES images (id) ON DELETE CASCADE,
    subset TEXT NOT NULL CHECK (subset IN ('train', 'test')),
    seed INTEGER NOT NULL,
    test_fraction REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    backbone TEXT NOT NULL,
    classes TEXT NOT NULL,
    params TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_arrays (
    version INTEGER NOT NULL REFERENCES models (version) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (version, name)
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL REFERENCES models (version),
    summary TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluation_metrics (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id) ON DELETE CASCADE,
    scope TEXT NOT NULL,
    metric TEXT NOT NULL,
    class TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluation_confusion (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id) ON DELETE CASCADE,
    subset TEXT NOT NULL,
    true_label TEXT NOT NULL,
    predicted_label TEXT NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY,
    query_name TEXT NOT NULL,
    query_sha256 TEXT NOT NULL,
    method TEXT NOT NULL,
    backbone TEXT NOT NULL,
    model_version INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rankings (
    query_id INTEGER NOT NULL REFERENCES queries (id) ON DELETE CASCADE,
    rank INTEGER NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images (id),
    score REAL NOT NULL,
    PRIMARY KEY (query_id, rank)
);
-- issue 16: the numeric precision the network computed each feature vector at
CREATE TABLE IF NOT EXISTS feature_precisions (
    image_id INTEGER NOT NULL,
    backbone TEXT NOT NULL,
    precision_used TEXT NOT NULL CHECK (precision_used IN ('fp32', 'bf16', 'fp16')),
    PRIMARY KEY (image_id, backbone),
    FOREIGN KEY (image_id, backbone) REFERENCES features (image_id, backbone) ON DELETE CASCADE
);
-- issue 17: the top k most similar catalogue images of every catalogue image (image-similarity neighbors)
CREATE TABLE IF NOT EXISTS neighbors (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    backbone TEXT NOT NULL,
    method TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    neighbor_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    score REAL NOT NULL,
    PRIMARY KEY (image_id, backbone, method, model_version, rank)
);
-- issue 14: refined networks and their arrays (weights, and the resumable training state while training)
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY,
    base TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('training', 'ready')),
    params TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (base, version)
);
CREATE TABLE IF NOT EXISTS network_arrays (
    network TEXT NOT NULL REFERENCES networks (name) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (network, kind, key)
);
"""


CRASH_AFTER_ENV = "IMAGE_SIMILARITY_CRASH_AFTER"
"""For the crash-safety tests (tests/test_crash_safety.py): a number N makes the process kill itself with SIGKILL
inside its Nth write transaction, after the transaction's statements and before its commit."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SQLiteStore(Store):
    """Store backed by a SQLite file (WAL journal, foreign keys on)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        if self.path.parent and not self.path.parent.exists():
            raise StoreError(f"folder does not exist: {self.path.parent}")
        self._crash_after = int(os.environ.get(CRASH_AFTER_ENV) or 0)
        self._writes = itertools.count(1)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.conn.execute("PRAGMA journal_mode = WAL")
            with self.conn:
                self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open {self.path} as a SQLite database: {err}") from None

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write transaction: committed whole, or rolled back whole (also by a crash: see CRASH_AFTER_ENV)."""
        with self.conn:
            yield
            if self._crash_after and next(self._writes) == self._crash_after:
                os.kill(os.getpid(), signal.SIGKILL)

    # images
    def add_image(self, image: NewImage) -> int | None:
        with self._writing():
            cur = self.conn.execute(
                "INSERT INTO images (name, label, format, width, height, mode, size_bytes, sha256, dhash,"
                " data, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (image.name, image.label, image.format, image.width, image.height, image.mode,
                 len(image.data), image.sha256, image.dhash, image.data, _now()),
            )
        return cur.lastrowid if cur.rowcount == 1 else None

    def find_sha256(self, sha256: str) -> ImageRow | None:
        row = self.conn.execute(
            "SELECT id, name, label, sha256, dhash FROM images WHERE sha256 = ?", (sha256,)
        ).fetchone()
        return ImageRow(*row) if row else None

    def record_rejected(self, name: str, label: str, reason: str, stage: str) -> None:
        with self._writing():
            self.conn.execute(
                "INSERT INTO rejected_files (name, label, stage, reason, seen_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name, stage, reason) DO UPDATE SET seen_at = excluded.seen_at",
                (name, label, stage, reason, _now()),
            )

    def rejected(self) -> list[tuple[str, str, str, str]]:
        return self.conn.execute("SELECT name, label, stage, reason FROM rejected_files ORDER BY id").fetchall()

    def images(self) -> list[ImageRow]:
        rows = self.conn.execute("SELECT id, name, label, sha256, dhash FROM images ORDER BY id")
        return [ImageRow(*row) for row in rows]

    def image_bytes(self, image_id: int) -> bytes:
        row = self.conn.execute("SELECT data FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise NotFound(f"no image with id {image_id}")
        return row[0]

    def remove_image(self, image_id: int) -> bool:
        with self._writing():  # features and splits go by ON DELETE CASCADE
            self.conn.execute("DELETE FROM rankings WHERE image_id = ?", (image_id,))
            return self.conn.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount == 1

    def catalogue_stamp(self, backbone: str) -> tuple[int, int, int, int]:
        row = self.conn.execute(
            "SELECT (SELECT max(version) FROM models), (SELECT max(id) FROM evaluations), count(*), max(image_id)"
            " FROM features WHERE backbone = ?", (backbone,)).fetchone()
        return tuple(int(v or 0) for v in row)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """One read transaction: in WAL mode it sees one snapshot and never blocks writers."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.rollback()

    # features
    def missing_features(self, backbone: str, batch_size: int,
                         id_range: tuple[int, int] | None = None) -> Iterator[list[tuple[int, bytes]]]:
        last, end = (id_range[0] - 1, id_range[1]) if id_range else (0, 2 ** 63 - 1)
        while True:
            batch = self.conn.execute(
                "SELECT i.id, i.data FROM images i WHERE i.id > ? AND i.id <= ? AND NOT EXISTS"
                " (SELECT 1 FROM features f WHERE f.image_id = i.id AND f.backbone = ?)"
                " ORDER BY i.id LIMIT ?",
                (last, end, backbone, batch_size),
            ).fetchall()
            if not batch:
                return
            last = batch[-1][0]
            yield batch

    def put_features(self, backbone: str, ids: Sequence[int], vectors: np.ndarray, precision: str = "fp32") -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        with self._writing():
            self.conn.executemany(
                "INSERT INTO features (image_id, backbone, dim, vector) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (image_id, backbone) DO NOTHING",
                [(int(i), backbone, vectors.shape[1], v.tobytes()) for i, v in zip(ids, vectors)],
            )
            self.conn.executemany(
                "INSERT INTO feature_precisions (image_id, backbone, precision_used) VALUES (?, ?, ?)"
                " ON CONFLICT (image_id, backbone) DO NOTHING", [(int(i), backbone, precision) for i in ids])

    def features(self, backbone: str, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = self.conn.execute(
            "SELECT image_id, dim, vector FROM features WHERE backbone = ? ORDER BY image_id", (backbone,)
        ).fetchall()
        if ids is not None:
            wanted = {int(i) for i in ids}
            rows = [r for r in rows if r[0] in wanted]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        found = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), rows[0][1])
        return found, matrix.astype(np.float32)

    def feature_counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT backbone, COUNT(*) FROM features GROUP BY backbone").fetchall())

    def feature_precisions(self, backbone: str) -> dict[str, int]:
        return dict(self.conn.execute("SELECT precision_used, COUNT(*) FROM feature_precisions WHERE backbone = ?"
                                      " GROUP BY precision_used", (backbone,)).fetchall())

    # split
    def put_split(self, subsets: dict[int, str], seed: int, test_fraction: float) -> None:
        with self._writing():
            self.conn.execute("DELETE FROM splits")
            self.conn.executemany(
                "INSERT INTO splits (image_id, subset, seed, test_fraction) VALUES (?, ?, ?, ?)",
                [(int(i), s, seed, test_fraction) for i, s in subsets.items()],
            )

    def split(self) -> dict[int, str]:
        return dict(self.conn.execute("SELECT image_id, subset FROM splits ORDER BY image_id").fetchall())

    # models
    def put_model(self, model: ModelRecord) -> int:
        with self._writing():
            cur = self.conn.execute(
                "INSERT INTO models (backbone, classes, params, created_at) VALUES (?, ?, ?, ?)",
                (model.backbone, json.dumps(model.classes), json.dumps(model.params), _now()),
            )
            version = cur.lastrowid
            self.conn.executemany(
                "INSERT INTO model_arrays (version, name, dtype, shape, data) VALUES (?, ?, ?, ?, ?)",
                [(version, name, *encode_array(a)) for name, a in model.arrays.items()],
            )
        return int(version)

    def model(self, version: int | None = None) -> ModelRecord:
        if version is None:
            row = self.conn.execute(
                "SELECT version, backbone, classes, params, created_at FROM models ORDER BY version DESC LIMIT 1"
            ).fetchone()
        else:
            row = self.conn.execute(
                "SELECT version, backbone, classes, params, created_at FROM models WHERE version = ?", (version,)
            ).fetchone()
        if row is None:
            raise NotReady("no trained model: run 'image-similarity train' first" if version is None
                             else f"no model version {version}")
        arrays = {
            name: decode_array(dtype, shape, data)
            for name, dtype, shape, data in self.conn.execute(
                "SELECT name, dtype, shape, data FROM model_arrays WHERE version = ?", (row[0],))
        }
        return ModelRecord(version=row[0], backbone=row[1], classes=json.loads(row[2]), arrays=arrays,
                           params=json.loads(row[3]), created_at=row[4])

    # evaluation
    def put_evaluation(self, evaluation: EvaluationRecord) -> int:
        with self._writing():
            cur = self.conn.execute(
                "INSERT INTO evaluations (model_version, summary, created_at) VALUES (?, ?, ?)",
                (evaluation.model_version, json.dumps(evaluation.summary), _now()),
            )
            eid = cur.lastrowid
            self.conn.executemany(
                "INSERT INTO evaluation_metrics (evaluation_id, scope, metric, class, value) VALUES (?, ?, ?, ?, ?)",
                [(eid, *row) for row in evaluation.metrics],
            )
            self.conn.executemany(
                "INSERT INTO evaluation_confusion (evaluation_id, subset, true_label, predicted_label, count)"
                " VALUES (?, ?, ?, ?, ?)",
                [(eid, *row) for row in evaluation.confusion],
            )
        return int(eid)

    def evaluation(self, model_version: int | None = None) -> EvaluationRecord | None:
        query = "SELECT id, model_version, summary, created_at FROM evaluations"
        args: tuple[Any, ...] = ()
        if model_version is not None:
            query, args = query + " WHERE model_version = ?", (model_version,)
        row = self.conn.execute(query + " ORDER BY id DESC LIMIT 1", args).fetchone()
        if row is None:
            return None
        metrics = self.conn.execute(
            "SELECT scope, metric, class, value FROM evaluation_metrics WHERE evaluation_id = ?", (row[0],)
        ).fetchall()
        confusion = self.conn.execute(
            "SELECT subset, true_label, predicted_label, count FROM evaluation_confusion WHERE evaluation_id = ?",
            (row[0],),
        ).fetchall()
        return EvaluationRecord(id=row[0], model_version=row[1], summary=json.loads(row[2]), created_at=row[3],
                                metrics=metrics, confusion=confusion)

    # rankings
    def put_ranking(self, query: dict[str, Any], rows: Sequence[tuple[int, int, float]]) -> int:
        with self._writing():
            cur = self.conn.execute(
                "INSERT INTO queries (query_name, query_sha256, method, backbone, model_version, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (query["name"], query["sha256"], query["method"], query["backbone"], query.get("model_version"),
                 _now()),
            )
            qid = cur.lastrowid
            self.conn.executemany(
                "INSERT INTO rankings (query_id, rank, image_id, score) VALUES (?, ?, ?, ?)",
                [(qid, r, i, float(s)) for r, i, s in rows],
            )
        return int(qid)

    # neighbors
    def put_neighbors(self, backbone: str, method: str, model_version: int,
                      rows: Sequence[tuple[int, int, int, float]]) -> None:
        with self._writing():
            self.conn.executemany(
                "INSERT INTO neighbors (image_id, backbone, method, model_version, rank, neighbor_id, score)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(int(i), backbone, method, int(model_version), int(r), int(n), float(s)) for i, r, n, s in rows])

    def neighbor_ids(self, backbone: str, method: str, model_version: int) -> set[int]:
        return {r[0] for r in self.conn.execute(
            "SELECT DISTINCT image_id FROM neighbors WHERE backbone = ? AND method = ? AND model_version = ?",
            (backbone, method, int(model_version)))}

    def delete_neighbors(self, backbone: str, method: str, model_version: int) -> None:
        with self._writing():
            self.conn.execute("DELETE FROM neighbors WHERE backbone = ? AND method = ? AND model_version = ?",
                              (backbone, method, int(model_version)))

    def neighbors(self, image_id: int, backbone: str, method: str,
                  model_version: int) -> list[tuple[int, int, str, str, float]]:
        return self.conn.execute(
            "SELECT n.rank, n.neighbor_id, i.name, i.label, n.score FROM neighbors n JOIN images i"
            " ON i.id = n.neighbor_id WHERE n.image_id = ? AND n.backbone = ? AND n.method = ?"
            " AND n.model_version = ? ORDER BY n.rank",
            (int(image_id), backbone, method, int(model_version))).fetchall()

    # refined networks (issue 14)
    def create_network(self, base: str, params: dict[str, Any]) -> NetworkRecord:
        with self._writing():
            (version,) = self.conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM networks WHERE base = ?",
                                           (base,)).fetchone()
            name, created = network_name(base, version), _now()
            self.conn.execute("INSERT INTO networks (name, base, version, status, params, metrics, created_at)"
                              " VALUES (?, ?, ?, 'training', ?, '{}', ?)", (name, base, version, json.dumps(params),
                                                                            created))
        return NetworkRecord(name, base, version, "training", params, {}, created)

    def networks(self) -> list[NetworkRecord]:
        rows = self.conn.execute("SELECT name, base, version, status, params, metrics, created_at FROM networks"
                                 " ORDER BY base, version").fetchall()
        return [NetworkRecord(n, b, v, s, json.loads(p), json.loads(m), c) for n, b, v, s, p, m, c in rows]

    def network_arrays(self, name: str, kind: str) -> dict[str, tuple[str, str, bytes]]:
        rows = self.conn.execute("SELECT key, dtype, shape, data FROM network_arrays WHERE network = ? AND kind = ?"
                                 " ORDER BY key", (name, kind))
        return {key: (dtype, shape, bytes(data)) for key, dtype, shape, data in rows}

    def put_network(self, name: str, status: str, metrics: dict[str, Any],
                    arrays: dict[str, dict[str, np.ndarray]], drop: Sequence[str] = ()) -> None:
        with self._writing():
            self.conn.execute("UPDATE networks SET status = ?, metrics = ? WHERE name = ?",
                              (status, json.dumps(metrics), name))
            for kind in [*arrays, *drop]:
                self.conn.execute("DELETE FROM network_arrays WHERE network = ? AND kind = ?", (name, kind))
            self.conn.executemany(
                "INSERT INTO network_arrays (network, kind, key, dtype, shape, data) VALUES (?, ?, ?, ?, ?, ?)",
                [(name, kind, key, *encode_array(a)) for kind, group in arrays.items() for key, a in group.items()])
