"""Entry points for SQL Server stored procedures (`sp_execute_external_script`, SQLR/).

Each function is what one procedure's `@script` calls: it takes `InputDataSet` (a pandas DataFrame) and the
procedure's values, runs the engine on those rows in memory, and returns `OutputDataSet` (and values the
procedure reads back through OUTPUT parameters). Nothing here touches a database: the procedure owns the
reads, the writes and the transaction.

Frames that carry a model (evaluate, rank) hold two kinds of rows: image rows (`array_name` NULL) and the
model's `model_arrays` rows (`image_id` NULL, the bytes in `data`); model metadata comes as values.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .evaluate import evaluate_data
from .featurize import Featurizer, collect_batch
from .images import BadImageError, inspect_image
from .rank import Catalogue, rank
from .split import split_images
from .store.base import ImageRow, ModelRecord, decode_array, encode_array
from .train import C_GRID, SimilarityModel, fit_model

INSPECT_COLUMNS = ["format", "width", "height", "mode", "sha256", "dhash", "reason"]
ARRAY_COLUMNS = ["name", "dtype", "shape", "data"]
METRIC_COLUMNS = ["table_name", "scope", "metric", "class", "value"]
RANK_COLUMNS = ["rank", "image_id", "name", "label", "score"]
NETWORK_COLUMNS = ["key", "dtype", "shape", "data"]


def _vectors(column: pd.Series) -> np.ndarray:
    """float32 matrix from a column of little-endian float32 blobs (features.vector)."""
    return np.stack([np.frombuffer(bytes(b), dtype="<f4") for b in column]).astype(np.float32)


def _require(frame: pd.DataFrame, what: str) -> None:
    if frame.empty:
        raise ValueError(f"no rows: {what}")


def inspect(data: bytes) -> pd.DataFrame:
    """One row (format, width, height, mode, sha256, dhash, reason): the engine's checks on uploaded bytes."""
    try:
        info, _ = inspect_image(bytes(data))
    except BadImageError as err:
        return pd.DataFrame([(None,) * 6 + (str(err),)], columns=INSPECT_COLUMNS)
    return pd.DataFrame([(info.format, info.width, info.height, info.mode, info.sha256, info.dhash, None)],
                        columns=INSPECT_COLUMNS)


def featurize_images(images: pd.DataFrame, backbone: str, batch_size: int = 32) -> pd.DataFrame:
    """Rows (id, data) -> (image_id, dim, vector, reason): a float32 blob per good image, a reason per bad one."""
    featurizer = Featurizer(backbone)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images.iloc[start:start + batch_size]
        ids, arrays, bad = collect_batch(featurizer.submit(list(zip(chunk["id"].astype(int), chunk["data"]))))
        if ids:
            vectors = np.ascontiguousarray(featurizer.forward(np.stack(arrays)), dtype="<f4")
            out += [(i, vectors.shape[1], v.tobytes(), None) for i, v in zip(ids, vectors)]
        out += [(i, None, None, reason) for i, reason in bad]
    return pd.DataFrame(out, columns=["image_id", "dim", "vector", "reason"])


def prepare_data(images: pd.DataFrame, test_fraction: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """Rows (id, name, label, sha256, dhash) -> (image_id, subset): the engine's split."""
    _require(images, "no images stored")
    rows = [ImageRow(int(r.id), r.name, r.label, r.sha256, r.dhash) for r in images.itertuples(index=False)]
    subsets = split_images(rows, test_fraction, seed)
    return pd.DataFrame(sorted(subsets.items()), columns=["image_id", "subset"])


def train_model(features: pd.DataFrame, backbone: str, c_grid: str = "", seed: int = 0) -> tuple[pd.DataFrame, str, str]:
    """Training rows (image_id, label, dhash, vector) -> (model_arrays rows, classes JSON, params JSON).

    `c_grid` is a JSON list of C values ('' for the default grid).
    """
    _require(features, f"no featurized training images for {backbone!r}")
    grid = [float(c) for c in json.loads(c_grid)] if c_grid else list(C_GRID)
    model = fit_model(backbone, _vectors(features["vector"]), features["label"].to_numpy(dtype=str),
                      features["dhash"].tolist(), grid, seed)
    record = model.to_record()
    arrays = pd.DataFrame([(name, *encode_array(a)) for name, a in record.arrays.items()], columns=ARRAY_COLUMNS)
    return arrays, json.dumps(record.classes), json.dumps(record.params)


def _model(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int) -> SimilarityModel:
    arrays = frame[frame["array_name"].notna()]
    if arrays.empty:
        raise ValueError(f"no arrays for model version {version}")
    record = ModelRecord(backbone=backbone, classes=json.loads(classes), params=json.loads(params), version=version,
                         arrays={r.array_name: decode_array(r.dtype, r.shape, bytes(r.data))
                                 for r in arrays.itertuples(index=False)})
    return SimilarityModel.from_record(record)


def _images(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["array_name"].isna()].astype({"image_id": "int64"}).sort_values("image_id")


def evaluate_model(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int,
                   seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Image rows (image_id, label, dhash, subset, data) and the model's arrays -> (figure rows, summary JSON).

    Figure rows are (table_name, scope, metric, class, value): `evaluation_metrics` rows as they are, and
    `evaluation_confusion` rows as (subset, true label, predicted label, count).
    """
    model = _model(frame, backbone, classes, params, version)
    images = _images(frame)
    data = {}
    for subset in ("train", "test"):
        rows = images[images["subset"] == subset]
        _require(rows, f"no featurized {subset} images for {backbone!r}")
        data[subset] = (rows["image_id"].to_numpy(), _vectors(rows["data"]), rows["label"].to_numpy(dtype=str))
    record, _, _ = evaluate_data(model, data, dict(zip(images["image_id"], images["dhash"])), seed)
    figures = [("evaluation_metrics", *row) for row in record.metrics]
    figures += [("evaluation_confusion", *row) for row in record.confusion]
    return pd.DataFrame(figures, columns=METRIC_COLUMNS), json.dumps(record.summary)


def rank_candidates(frame: pd.DataFrame, query: bytes, backbone: str, classes: str, params: str, version: int,
                    top: int = 10, method: str = "", best_method: str = "") -> tuple[pd.DataFrame, str]:
    """Catalogue rows (image_id, name, label, sha256, dhash, data) and the model's arrays plus a query image ->
    (the top rows (rank, image_id, name, label, score), the method used).

    `method` '' means the latest evaluation's `best_method`, else `learned`.
    """
    model = _model(frame, backbone, classes, params, version)
    images = _images(frame)
    _require(images, f"empty catalogue: no images featurized with {backbone!r}")
    catalogue = Catalogue(images["image_id"].to_numpy(), images["name"].tolist(), images["label"].tolist(),
                          images["sha256"].tolist(), images["dhash"].tolist(), _vectors(images["data"]), model)
    # With a catalogue and a method given and save=False, rank() reads nothing from a store.
    result = rank(None, bytes(query), Featurizer(backbone), top=top, method=method or best_method or "learned",
                  catalogue=catalogue, save=False)
    rows = [(m.rank, m.image_id, m.name, m.label, m.score) for m in result.matches]
    return pd.DataFrame(rows, columns=RANK_COLUMNS), result.method


def refine_model(images: pd.DataFrame, backbone: str, epochs: int | None = None,
                 seed: int = 0) -> tuple[pd.DataFrame, str, str, str]:
    """Training rows (id, name, label, data as hexadecimal text) -> (the refined weights as network_arrays rows
    (key, dtype, shape, data as hexadecimal text), params JSON, metrics JSON, rejected rows JSON
    [[name, label, reason], ...]).

    Runs refine.refine on an in-memory store holding these images as its training split; the procedure stores
    the result under the next version's name.
    """
    from .ingest import ingest_bytes
    from .refine import refine
    from .store import SQLiteStore

    _require(images, "no training images: run PrepareData first")
    with SQLiteStore(":memory:") as store:
        rejected = []
        for row in images.itertuples(index=False):
            _, reason = ingest_bytes(store, row.name, row.label, bytes.fromhex(row.data))
            if reason:
                rejected.append([row.name, row.label, reason])
        store.put_split({im.id: "train" for im in store.images()}, seed, 0.0)
        name = refine(store, backbone, epochs=epochs or None, seed=seed, progress=False)
        record = store.network(name)
        rejected += [[n, label, reason] for n, label, _, reason in store.rejected()]
        rows = [(key, dtype, shape, data.hex()) for key, (dtype, shape, data) in
                store.network_arrays(name, "weights").items()]
    return pd.DataFrame(rows, columns=NETWORK_COLUMNS), json.dumps(record.params), json.dumps(record.metrics), \
        json.dumps(rejected)
