"""Entry points for SQL Server stored procedures (`sp_execute_external_script`, SQLR/).

Each function is what one procedure's `@script` calls: it takes `InputDataSet` (a pandas DataFrame) and the
procedure's values, runs the engine on those rows in memory, and returns `OutputDataSet` (and values the
procedure reads back through OUTPUT parameters). Nothing here touches a database: the procedure owns the
reads, the writes and the transaction.

Frames that carry a model (evaluate, rank) hold two kinds of rows: image rows (`array_name` NULL) and the
model's `model_arrays` rows (`image_id` NULL, the bytes in `data`); model metadata comes as values.

A refined network (refine.py) that a procedure runs on images crosses as one JSON text value (`network`, see
`featurizer`), built by dbo.ResolveBackbone from networks/network_arrays.

Binary data crosses `sp_execute_external_script` only as hexadecimal text in varchar(max) (as sqlmlutils moves
it): the procedures send `CONVERT(varchar(max), data, 2)` and store `CONVERT(varbinary(max), text, 2)`. Each
script runs inside `with inproc.reported() as report:` and hands `report.error` (one line, or NULL) back through
an OUTPUT parameter, which the procedure THROWs before it writes anything (every OUTPUT variable is set before
that block, as *Known issues for Python and R* requires).

torch is imported only by the functions that run a network (featurize_images, rank_candidates, vector_query,
refine_model): the procedures that compute on stored features (PrepareData, TrainModel, EvaluateModel,
ComputeNeighbors, ...) run without it, which is how CI runs them on SQL Server's Python 3.10 / numpy 1.22.0 profile,
where no CPU torch for Python 3.10 can be installed (docs/sqlserver-setup.md).

OutputDataSet never holds None or NaN (how they map is documented for R, not for Python): what is absent is ''
or 0, which the procedure turns into NULL with NULLIF.
"""
from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..core.dedup import NEAR_DUPLICATE_DISTANCE, dhash, hamming_to, packed_hashes
from ..core.images import BadImageError, decode_image, inspect_image
from ..errors import BadInput, ImageSimilarityError, NotFound, NotReady
from ..features.specs import BACKBONES, WeightsNotFoundError
from ..pipeline.evaluate import evaluate_data
from ..pipeline.ingest import ingest_bytes
from ..pipeline.neighbors import block_neighbors, block_ranges, block_rows
from ..pipeline.rank import rank_with
from ..pipeline.split import TEST_FRACTION, split_images
from ..pipeline.suggest import catalogue_suggestions, with_suggestions
from ..pipeline.train import C_GRID, fit_model
from ..search.catalogue import Catalogue
from ..search.methods import Method
from ..search.model import SimilarityModel
from ..search.searchers import scorer, searcher
from ..store import SQLiteStore
from ..store.base import (
    STORED_METHODS,
    ImageRow,
    ModelRecord,
    NetworkRecord,
    decode_array,
    encode_array,
    finite,
    strict_json,
)
from ..store.mssql import VECTOR_DIMENSIONS, padded_json

if TYPE_CHECKING:  # torch comes with the network: the procedures that run none import neither
    from ..pipeline.featurize import Featurizer

INSPECT_COLUMNS = ["format", "width", "height", "mode", "sha256", "dhash", "reason"]
ARRAY_COLUMNS = ["name", "dtype", "shape", "data"]
METRIC_COLUMNS = ["table_name", "scope", "metric", "class", "value"]
RANK_COLUMNS = ["rank", "image_id", "name", "label", "score", "item_key", "metadata", "suggested", "probability"]
WEIGHTS_DIR = Path(sys.prefix) / "share" / "image-similarity" / "weights"
"""Where SQL Server's Python finds backbone weights that no installed package ships: the Launchpad sandbox has
no network and a working folder and profile of its own, so the torch hub cache of any user is out of reach."""
REFINED: dict[tuple[str, str], Featurizer] = {}
"""Refined networks built in this process, by (name, SHA-256 of the network text): FeaturizeImages sends the same
network with every batch, and SQL Server may run many calls in one process."""
KEEP_REFINED = 2  # at most this many at once: each holds its weights in memory


class Report:
    """Context manager that turns an exception in an external script into one line in `error`, which the
    procedure THROWs before it writes anything: an ImageSimilarityError's message as it is; anything else is a bug,
    named by its type, and its traceback also goes to the script's stderr (SQL Server's "STDERR message(s) from
    external script")."""

    error: str | None = None

    def __enter__(self) -> Report:  # noqa: PYI034 - typing.Self is 3.11+; SQL Server's runtime is Python 3.10
        return self

    def __exit__(self, kind, err, trace) -> bool:
        if not isinstance(err, Exception):
            return False
        if isinstance(err, ImageSimilarityError):
            line = str(err)
        else:
            traceback.print_exception(kind, err, trace, file=sys.stderr)
            line = f"{type(err).__name__}: {err}"
        self.error = " ".join(line.split())[:4000]
        return True


def reported() -> Report:
    return Report()


def unhex(text: str) -> bytes:
    """Bytes from CONVERT(varchar(max), data, 2) text."""
    return bytes.fromhex(text)
NETWORK_COLUMNS = ["key", "dtype", "shape", "data"]


def _vectors(column: pd.Series) -> np.ndarray:
    """float32 matrix from a column of hex-encoded little-endian float32 blobs (features.vector)."""
    return np.stack([np.frombuffer(unhex(b), dtype="<f4") for b in column]).astype(np.float32)


def featurizer(backbone: str, network: str | None = None) -> Featurizer:
    """The backbone with weights the sandbox can read: the refined network in `network` when given, else an
    installed package's weights, else WEIGHTS_DIR's file.

    `network` is the JSON text dbo.ResolveBackbone builds for a refined backbone: {"base", "version", "status",
    "params" (its "classes" size the head), "weights": [{"key", "dtype", "shape", "data" (hexadecimal)}, ...]}.
    """
    from ..pipeline.featurize import Featurizer  # lazy: torch (see the module docstring)

    if network:
        return _refined(backbone, network)
    spec = BACKBONES[backbone]
    local = WEIGHTS_DIR / spec.weights_file
    if local.is_file():
        return Featurizer(backbone, weights=local)
    if spec.package is None:
        raise WeightsNotFoundError(f"{backbone} weights '{spec.weights_file}' not found in {WEIGHTS_DIR}: copy the "
                                   f"file there (Setup-ImageSimilarity.ps1 -WeightsFile does; source: {spec.source})")
    return Featurizer(backbone)


def _refined(name: str, network: str) -> Featurizer:
    """The refined network `name` built from its JSON text, strictly (refine.refined_extractor), once per process."""
    from ..pipeline.featurize import Featurizer  # lazy: torch (see the module docstring)
    from ..pipeline.networks import refined_extractor  # lazy: torch (see the module docstring)

    key = (name, hashlib.sha256(network.encode()).hexdigest())
    if key not in REFINED:
        try:
            value = json.loads(network)
            record = NetworkRecord(name, value["base"], int(value["version"]), value["status"], value["params"], {})
            weights = {w["key"]: (w["dtype"], w["shape"], unhex(w["data"])) for w in value.get("weights", [])}
        except (ValueError, KeyError, TypeError) as err:
            raise BadInput(f"network {name}: the procedure sent no readable network ({type(err).__name__}: {err})"
                           ) from None
        while len(REFINED) >= KEEP_REFINED:
            REFINED.pop(next(iter(REFINED)))
        REFINED[key] = Featurizer(extractor=refined_extractor(record, weights))
    return REFINED[key]


def _require(frame: pd.DataFrame, what: str) -> None:
    if frame.empty:
        raise NotReady(f"no rows: {what}")


def inspect(data_hex: str) -> pd.DataFrame:
    """One row (format, width, height, mode, sha256, dhash, reason): the engine's checks on uploaded bytes; ''
    and 0 for what is absent (OutputDataSet carries no None: see the module docstring)."""
    try:
        info, _ = inspect_image(unhex(data_hex))
    except BadImageError as err:
        return pd.DataFrame([("", 0, 0, "", "", "", str(err))], columns=INSPECT_COLUMNS)
    return pd.DataFrame([(info.format, info.width, info.height, info.mode, info.sha256, info.dhash, "")],
                        columns=INSPECT_COLUMNS)


FEATURE_COLUMNS = ["image_id", "dim", "vector", "reason", "precision_used", "runtime", "network_hash"]


def featurize_images(images: pd.DataFrame, backbone: str, network: str | None = None) -> pd.DataFrame:
    """One batch of rows (id, data hex) -> (image_id, dim, vector hex, reason, precision_used, runtime,
    network_hash): a float32 blob per good image and what computed it, a reason per bad one ('' and 0 for what is
    absent). The procedure loops over batches, so one call holds one batch of images. `network`: a refined
    backbone's JSON text (see `featurizer`)."""
    from ..pipeline.featurize import finish_batch  # lazy: torch (see the module docstring)

    model = featurizer(backbone, network)
    items = [(int(i), unhex(d)) for i, d in zip(images["id"], images["data"])]
    ids, vectors, bad = finish_batch(model, model.submit(items))
    out = [(i, 0, "", reason, "", "", "") for i, reason in bad]
    if ids:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        out += [(i, vectors.shape[1], v.tobytes().hex(), "", model.precision, model.runtime, model.network_hash)
                for i, v in zip(ids, vectors)]
    return pd.DataFrame(sorted(out, key=lambda r: r[0]), columns=FEATURE_COLUMNS)


def vector_json(vectors: pd.DataFrame) -> pd.DataFrame:
    """Rows (image_id, vector hex) -> (image_id, embedding): JSON arrays for VECTOR(1998) columns, zero-padded."""
    rows = [(int(i), padded_json(np.frombuffer(unhex(v), dtype="<f4")))
            for i, v in zip(vectors["image_id"], vectors["vector"])]
    if any(embedding is None for _, embedding in rows):
        raise BadInput(f"features longer than VECTOR({VECTOR_DIMENSIONS}) cannot be stored as vectors")
    return pd.DataFrame(rows, columns=["image_id", "embedding"])


def prepare_data(images: pd.DataFrame, test_fraction: float = TEST_FRACTION, seed: int = 0) -> pd.DataFrame:
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
    arrays = pd.DataFrame([(name, dtype, shape, data.hex()) for name, (dtype, shape, data) in
                           ((n, encode_array(a)) for n, a in record.arrays.items())], columns=ARRAY_COLUMNS)
    return arrays, json.dumps(record.classes), strict_json(record.params)


def _model(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int) -> SimilarityModel:
    arrays = frame[frame["array_name"].notna()]
    if arrays.empty:
        raise NotFound(f"no arrays for model version {version}")
    record = ModelRecord(backbone=backbone, classes=json.loads(classes), params=json.loads(params), version=version,
                         arrays={r.array_name: decode_array(r.dtype, r.shape, unhex(r.data))
                                 for r in arrays.itertuples(index=False)})
    return SimilarityModel.from_record(record)


def _images(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["array_name"].isna()].astype({"image_id": "int64"}).sort_values("image_id")


def evaluate_model(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int,
                   seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Image rows (image_id, label, dhash, subset, data) and the model's arrays -> (figure rows, summary JSON).

    Figure rows are (table_name, scope, metric, class, value): `evaluation_metrics` rows as they are (a figure
    that is undefined, NaN, is left out), and `evaluation_confusion` rows as (subset, true label, predicted
    label, count). The summary is strict JSON (an undefined figure is null).
    """
    model = _model(frame, backbone, classes, params, version)
    images = _images(frame)
    data = {}
    _require(images, f"no featurized images for {backbone!r}")
    for subset in ("train", "test"):  # a subset without images: evaluate_data names what it cannot measure
        rows = images[images["subset"] == subset]
        X = _vectors(rows["data"]) if len(rows) else np.zeros((0, model.coef.shape[1]), dtype=np.float32)
        data[subset] = (rows["image_id"].to_numpy(), X, rows["label"].to_numpy(dtype=str))
    record, _, _ = evaluate_data(model, data, dict(zip(images["image_id"], images["dhash"])), seed)
    figures = [("evaluation_metrics", *row) for row in record.metrics if finite(row[-1]) is not None]
    figures += [("evaluation_confusion", *row) for row in record.confusion]
    return pd.DataFrame(figures, columns=METRIC_COLUMNS), strict_json(record.summary)


def _catalogue(frame: pd.DataFrame, backbone: str) -> Catalogue:
    images = _images(frame)
    _require(images, f"empty catalogue: no images featurized with {backbone!r}")
    labels = [label if isinstance(label, str) else None for label in images["label"]]  # NULL: unlabelled
    return Catalogue(images["image_id"].to_numpy(), images["name"].tolist(), labels,
                     images["sha256"].tolist(), images["dhash"].tolist(), _vectors(images["data"]))


def rank_candidates(frame: pd.DataFrame, query_hex: str, backbone: str, classes: str, params: str, version: int,
                    top: int = 10, method: str = "scores", network: str | None = None) -> tuple[str, str]:
    """Catalogue rows (image_id, name, label, sha256, dhash, data hex) and the model's arrays plus a query image ->
    (the top rows as a JSON list of {rank, image_id, score, suggested, probability}, the method used): an unlabelled
    match carries the model's suggested label and its probability (pipeline/suggest.py), the others null. The
    procedure resolves `method`; `network`: a refined backbone's JSON text (see `featurizer`)."""
    catalogue, model = _catalogue(frame, backbone), _model(frame, backbone, classes, params, version)
    result = rank_with(searcher(catalogue, method, model), unhex(query_hex), featurizer(backbone, network), top)
    matches = with_suggestions(result.matches, catalogue_suggestions(catalogue, model))
    return json.dumps([{"rank": m.rank, "image_id": int(m.image_id), "score": finite(m.score),
                        "suggested": m.suggested, "probability": m.probability} for m in matches],
                      allow_nan=False), result.method


def suggest_rows(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int) -> str:
    """Feature rows (image_id, name, label, sha256, dhash, data hex) of unlabelled images and the model's arrays ->
    their suggested labels as a JSON list of {image_id, suggested, probability} (pipeline/suggest.py), as
    rank_candidates gives them: for the matches SQL Server 2025 ranked in T-SQL (dbo.SuggestRanked)."""
    found = catalogue_suggestions(_catalogue(frame, backbone), _model(frame, backbone, classes, params, version))
    return json.dumps([{"image_id": i, "suggested": label, "probability": finite(p)}
                       for i, (label, p) in sorted(found.items())], allow_nan=False)


def vector_query(frame: pd.DataFrame, query_hex: str, backbone: str, network: str | None = None, method: str = "l2",
                 classes: str | None = None, params: str | None = None,
                 version: int | None = None) -> tuple[str, str]:
    """Catalogue rows (image_id, sha256, dhash) and, for scores and learned, the model's arrays, and a query image
    -> (the method's query vector as VECTOR(1998) JSON: its features for l2 and cosine, Method.vectors for scores
    and learned; a JSON list of the ids never to return: the query itself and its near twins). `network`: a
    refined backbone's JSON text (see `featurizer`)."""
    data = unhex(query_hex)
    image, sha = decode_image(data), hashlib.sha256(data).hexdigest()
    vector = featurizer(backbone, network).features([image])[:1]
    if method in STORED_METHODS:
        vector = Method(method, _model(frame, backbone, classes, params, version)).vectors(vector)
    images = _images(frame)
    near = hamming_to(dhash(image), packed_hashes(images["dhash"].tolist())) <= NEAR_DUPLICATE_DISTANCE
    excluded = [int(i) for i, s, twin in zip(images["image_id"], images["sha256"], near) if twin or s == sha]
    padded = padded_json(np.asarray(vector[0], dtype=np.float32))
    if padded is None:
        raise BadInput(f"{method} vectors of {backbone} have {vector.shape[1]} values; VECTOR holds"
                       f" {VECTOR_DIMENSIONS} at most")
    return padded, json.dumps(excluded)


def method_vectors_json(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int) -> pd.DataFrame:
    """Feature rows (image_id, data hex) and the model's arrays -> (image_id, method, embedding): each image's rows
    of scores and learned (Method.matrix) as VECTOR(1998) JSON, zero-padded (inner products are unchanged); NULL
    for a row longer than VECTOR_DIMENSIONS."""
    model = _model(frame, backbone, classes, params, version)
    images = _images(frame)
    features = _vectors(images["data"])
    return pd.DataFrame([(int(i), method, padded_json(row)) for method in STORED_METHODS
                         for i, row in zip(images["image_id"], Method(method, model).matrix(features))],
                        columns=["image_id", "method", "embedding"])


def compute_neighbors(frame: pd.DataFrame, backbone: str, classes: str, params: str, version: int, method: str,
                      top: int = 10) -> pd.DataFrame:
    """Catalogue rows (image_id, name, label, sha256, dhash, data hex, done) and, for scores/learned, the model's
    arrays -> rows (image_id, rank, neighbor_id, score): the top neighbours of each image whose `done` is 0."""
    model = _model(frame, backbone, classes, params, version) if frame["array_name"].notna().any() else None
    catalogue = _catalogue(frame, backbone)
    images = _images(frame)
    done = set(images.loc[images["done"] == 1, "image_id"].astype(int))
    ranges = block_ranges(len(catalogue), block_rows(len(catalogue)))
    rows = [row for block in block_neighbors(scorer(catalogue, method, model), ranges, top, done) for row in block]
    return pd.DataFrame(rows, columns=["image_id", "rank", "neighbor_id", "score"])


def refine_model(images: pd.DataFrame, backbone: str, epochs: int | None = None,
                 seed: int = 0) -> tuple[pd.DataFrame, str, str, str]:
    """Training rows (id, name, label, data as hexadecimal text) -> (the refined weights as network_arrays rows
    (key, dtype, shape, data as hexadecimal text), params JSON, metrics JSON, rejected rows JSON
    [[name, label, reason], ...]).

    Runs refine.refine on an in-memory store holding these images as its training split; the procedure stores
    the result under the next version's name.
    """
    from ..pipeline.refine import refine  # lazy: torch (see the module docstring)

    _require(images, "no training images: run PrepareData first")
    with SQLiteStore(":memory:") as store:
        rejected = []
        for row in images.itertuples(index=False):
            _, reason = ingest_bytes(store, row.name, row.label, unhex(row.data))
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
