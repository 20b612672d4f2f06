"""The interface every store implements, and the plain records that cross it.

A store maps the engine's steps onto database tables. It is the only code that writes SQL, always with
bound parameters. Vectors cross the interface as numpy arrays; stores choose their own column types.
"""
from __future__ import annotations

import abc
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NotReady, StoreError

VECTOR_SEARCH = "vector search"
"""Capability: the store's `nearest` ranks inside the database: by l2 or cosine on the features, and by scores or
learned on the catalogue rows of those methods stored per model version (`put_method_vectors`)."""
STORED_METHODS = ("scores", "learned")
"""The methods whose catalogue matrix (search.methods.Method.matrix) a store with VECTOR_SEARCH keeps per model
version, so that the database ranks them by one inner product."""
PROCEDURES = "stored procedures"
"""Capability: the store runs the SQLR procedures or PL/Python routines (`run_procedure`)."""


@dataclass(frozen=True)
class ImageRow:
    """One catalogue image as stored (without its bytes)."""

    id: int
    name: str
    label: str | None
    """None: unlabelled (issue 29)."""
    sha256: str
    dhash: str
    key: str | None = None
    """The user's key of the item (unique when given)."""
    metadata: dict[str, Any] | None = None
    """The item's attributes, a JSON object."""


@dataclass(frozen=True)
class NewImage:
    """An image to add: validated bytes plus what is known of the item."""

    name: str
    label: str | None
    data: bytes
    format: str
    width: int
    height: int
    mode: str
    sha256: str
    dhash: str
    key: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelRecord:
    """A trained model as plain arrays and metadata: never a pickle."""

    backbone: str
    classes: list[str]
    arrays: dict[str, np.ndarray]
    params: dict[str, Any]
    version: int | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class EvaluationRecord:
    """The figures of one evaluation of one model version."""

    model_version: int
    summary: dict[str, Any]
    metrics: list[tuple[str, str, str, float]] = field(default_factory=list)
    """(subset or method, metric, class or '', value) rows."""
    confusion: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(subset, true label, predicted label, count) rows."""
    id: int | None = None
    created_at: str | None = None


def finite(value: float | None) -> float | None:
    """A figure every database can hold: NaN or an infinity (undefined, e.g. the accuracy of a class with no
    test image) becomes None."""
    return None if value is None or not math.isfinite(value) else float(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """JSON that SQL Server's JSON functions accept (no bare NaN or Infinity): they become null."""
    return json.dumps(_json_safe(value), allow_nan=False)


@dataclass(frozen=True)
class NetworkRecord:
    """A refined network (issue 14): its metadata; the weights live in `network_arrays` as plain arrays."""

    name: str
    base: str
    version: int
    status: str  # "training" until refine finishes, then "ready"
    params: dict[str, Any]
    metrics: dict[str, Any]
    created_at: str | None = None


NETWORK_STATUSES = ("training", "ready")


def network_name(base: str, version: int) -> str:
    """The backbone name of a refined network: letters, digits and underscores only."""
    return f"{base}_refined_{version}"


def encode_array(array: np.ndarray) -> tuple[str, str, bytes]:
    """(little-endian dtype, JSON shape, bytes): how every store keeps a model array."""
    dtype = array.dtype.newbyteorder("<").str
    return dtype, json.dumps(array.shape), np.ascontiguousarray(array, dtype).tobytes()


def decode_array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    """The array `encode_array` encoded."""
    return np.frombuffer(data, dtype=dtype).reshape(json.loads(shape)).copy()


class Store(abc.ABC):
    """Tables of the image-similarity job. Every write is one transaction; re-running a step is safe."""

    url: str
    server: str
    """The database's name for people ("SQLite", "PostgreSQL", "SQL Server")."""
    capabilities: frozenset[str] = frozenset()
    """What this store can do beyond the operations every store has: VECTOR_SEARCH, PROCEDURES."""

    # images
    @abc.abstractmethod
    def add_image(self, image: NewImage) -> int | None:
        """Store an image; return its id, or None when nothing changed. Without a key: None when identical bytes
        are stored. With a key (issue 29): None when the key's item has these bytes; a key stored with other bytes
        is replaced, in one transaction, by a new row (new id) without the old one's features, split row,
        neighbours and rankings."""

    @abc.abstractmethod
    def find_sha256(self, sha256: str) -> ImageRow | None:
        """A stored image with these exact bytes (the first), if any."""

    @abc.abstractmethod
    def find_key(self, key: str) -> ImageRow | None:
        """The stored image of the item with this key, if any."""

    @abc.abstractmethod
    def source_rows(self, batch_size: int = 100) -> Iterator[list[tuple[str, str | None, bytes | None, Any]]]:
        """Batches of (item_key, label, data, metadata) from the view `image_source` that the database's owner
        created over their own table (issue 29), by key, streamed; metadata is the view's optional `metadata`
        column as the driver gives it (None without one); StoreError when there is no such view."""

    @abc.abstractmethod
    def record_rejected(self, name: str, label: str, reason: str, stage: str) -> None:
        """Record a file that was skipped, with the reason (idempotent per name, stage and reason)."""

    @abc.abstractmethod
    def rejected(self) -> list[tuple[str, str, str, str]]:
        """(name, label, stage, reason) of every skipped file."""

    @abc.abstractmethod
    def images(self) -> list[ImageRow]:
        """Every stored image, by id (unlabelled ones too: label None)."""

    @abc.abstractmethod
    def image_bytes(self, image_id: int) -> bytes:
        """The stored bytes of one image."""

    # features
    @abc.abstractmethod
    def missing_features(self, backbone: str, batch_size: int,
                         id_range: tuple[int, int] | None = None) -> Iterator[list[tuple[int, bytes]]]:
        """Batches of (id, bytes) of images with no features for this backbone, in id order, streamed; only ids
        from id_range[0] to id_range[1] (both included) when given."""

    @abc.abstractmethod
    def put_features(self, backbone: str, ids: Sequence[int], vectors: np.ndarray, precision: str = "fp32",
                     computed_by: tuple[str, str] | None = None) -> None:
        """Store float32 vectors, one per id, the precision the network computed them at ("fp32", "bf16", "fp16")
        and, when given, what computed them: (runtime, network hash), in one transaction (existing rows are kept)."""

    @abc.abstractmethod
    def features(self, backbone: str, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 matrix) of stored features for this backbone, by id; only `ids` when given."""

    @abc.abstractmethod
    def feature_dim(self, backbone: str) -> int | None:
        """The dimension of the backbone's stored vectors (of the first one); None when none are stored."""

    @abc.abstractmethod
    def feature_counts(self) -> dict[str, int]:
        """Number of featurized images per backbone."""

    @abc.abstractmethod
    def feature_precisions(self, backbone: str) -> dict[str, int]:
        """Number of the backbone's vectors per recorded precision (vectors stored without one are not counted)."""

    @abc.abstractmethod
    def feature_runtimes(self, backbone: str) -> dict[tuple[str, str], int]:
        """Number of the backbone's vectors per recorded (runtime, network hash); vectors without one are not
        counted."""

    # split
    @abc.abstractmethod
    def put_split(self, subsets: dict[int, str], seed: int, test_fraction: float) -> None:
        """Replace the train/test split atomically."""

    @abc.abstractmethod
    def split(self) -> dict[int, str]:
        """image id -> 'train' or 'test'; empty when no split was made."""

    # models
    @abc.abstractmethod
    def put_model(self, model: ModelRecord) -> int:
        """Store a model as a new version; return the version."""

    @abc.abstractmethod
    def model(self, version: int | None = None) -> ModelRecord:
        """A stored model: the latest when version is None. NotReady when there is none."""

    # evaluation
    @abc.abstractmethod
    def put_evaluation(self, evaluation: EvaluationRecord) -> int:
        """Store an evaluation and its metric rows; return its id."""

    @abc.abstractmethod
    def evaluation(self, model_version: int | None = None) -> EvaluationRecord | None:
        """The latest evaluation (of a model version when given), or None."""

    # rankings
    @abc.abstractmethod
    def put_ranking(self, query: dict[str, Any], rows: Sequence[tuple[int, int, float]]) -> int:
        """Store one query's results as (rank, image id, score) rows; return the query's id."""

    # issue 18: a service that stays right while the catalogue changes
    @abc.abstractmethod
    def remove_image(self, image_id: int) -> bool:
        """Remove an image with its features, split row, neighbours and the stored rankings that name it, in one
        transaction; False when there is no such image."""

    @abc.abstractmethod
    def relabel_image(self, image_id: int, label: str) -> bool:
        """Set an image's label (issue 31); False when there is no such image. Train and evaluate read labels from
        here, so the next model learns the new one; the split, features and neighbours stay."""

    @abc.abstractmethod
    def catalogue_stamp(self, backbone: str) -> tuple[int, int, int, int]:
        """(latest model version, latest evaluation id, number and largest image id of the backbone's features),
        0 for none: cheap to read, and it changes whenever train, evaluate, featurize or a removal changes what
        a ranking on the latest model sees (images are only added by ingest and removed by remove_image)."""

    def reading(self) -> AbstractContextManager[None]:
        """A context in which every read sees one snapshot of the database (a read transaction); keep it short.
        Stores without snapshots read statement by statement."""
        return nullcontext()

    # neighbors (issue 17): the top k of every catalogue image; model_version 0 for l2 and cosine
    @abc.abstractmethod
    def put_neighbors(self, backbone: str, method: str, model_version: int,
                      rows: Sequence[tuple[int, int, int, float]]) -> None:
        """Store (image id, rank, neighbour id, score) rows in one transaction; rows already stored are kept."""

    @abc.abstractmethod
    def neighbor_ids(self, backbone: str, method: str, model_version: int) -> set[int]:
        """Ids of the images whose neighbours are stored for this backbone, method and model version."""

    @abc.abstractmethod
    def delete_neighbors(self, backbone: str, method: str, model_version: int) -> None:
        """Remove the stored neighbours of this backbone, method and model version."""

    @abc.abstractmethod
    def neighbors(self, image_id: int, backbone: str, method: str,
                  model_version: int) -> list[tuple[int, int, str, str, float]]:
        """(rank, neighbour id, name, label, score) of one image's stored neighbours, by rank, in one query."""

    # refined networks (issue 14)
    @abc.abstractmethod
    def create_network(self, base: str, params: dict[str, Any]) -> NetworkRecord:
        """Register a new version of a refined `base` network, status "training", with no arrays yet."""

    @abc.abstractmethod
    def networks(self) -> list[NetworkRecord]:
        """Every refined network, by base and version."""

    @abc.abstractmethod
    def network_arrays(self, name: str, kind: str) -> dict[str, tuple[str, str, bytes]]:
        """key -> (dtype, JSON shape, bytes) of one kind of a network's arrays ("weights", "state", "optimizer")."""

    @abc.abstractmethod
    def put_network(self, name: str, status: str, metrics: dict[str, Any],
                    arrays: dict[str, dict[str, np.ndarray]], drop: Sequence[str] = ()) -> None:
        """In one transaction: set status and metrics, replace each kind in `arrays`, delete the kinds in `drop`."""

    def network(self, name: str) -> NetworkRecord:
        """One refined network by name; NotReady when there is none."""
        for record in self.networks():
            if record.name == name:
                return record
        raise NotReady(f"no network named {name!r}: run 'image-similarity refine' first")

    def nearest(self, backbone: str, vector: np.ndarray, method: str, top: int, exclude: Sequence[int] = (),
                approximate: bool | None = None, model_version: int = 0,
                ef_search: int | None = None) -> list[tuple[int, float]]:
        """(image id, score) of the `top` best matches, ranked by the database itself (stores with VECTOR_SEARCH;
        StoreError elsewhere). Scores as in rank.Match. l2 and cosine: `vector` is the query's features; scores
        and learned: the method's query vector (Method.vectors), scored by its inner product with the rows stored
        for `model_version`. `approximate`: through the database's vector index (True), by an exact scan (False),
        or through the index if there is one; `ef_search`: the candidates an index search looks at (None: the
        store's default)."""
        raise StoreError(f"{type(self).__name__} has no {VECTOR_SEARCH} in the database: rank in the engine")

    def searchable(self, backbone: str, method: str, model_version: int = 0) -> bool:
        """Whether `nearest` can rank every featurized image of the backbone by this method now (its vectors
        are all stored): l2 and cosine in a store with VECTOR_SEARCH (the features are its vectors) unless it says
        otherwise; never without VECTOR_SEARCH."""
        return VECTOR_SEARCH in self.capabilities and method not in STORED_METHODS

    def put_method_vectors(self, model_version: int, method: str, ids: Sequence[int], rows: np.ndarray) -> None:
        """Store the catalogue rows of a STORED_METHODS method under a model version, one per image id, in one
        transaction (rows already stored are kept); stores without VECTOR_SEARCH keep none."""
        raise StoreError(f"{type(self).__name__} has no {VECTOR_SEARCH} in the database")

    def method_vector_ids(self, model_version: int, method: str) -> set[int]:
        """Ids of the images whose row of the method is stored under the model version."""
        raise StoreError(f"{type(self).__name__} has no {VECTOR_SEARCH} in the database")

    def run_procedure(self, procedure: str, values: dict[str, Any]) -> tuple[list[str], list[tuple]]:
        """Run a step's stored procedure (SQLR/) or PL/Python routine, by its SQL Server name, with named values
        (stores with PROCEDURES; StoreError elsewhere); (column names, rows) of its last result set."""
        raise StoreError(f"{type(self).__name__} runs no {PROCEDURES}")

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
