"""Entry points for PostgreSQL's PL/Python functions and procedures (SQLR/postgres/).

Each SQL routine's body is one line that calls a function here with `plpy` and its bound arguments. The
engine runs inside the server process, on a PostgresStore that talks to the server through `plpy` (SPI).
An ImageSimilarityError (empty catalogue, no model, a query that is not an image) becomes a one-line SQL error;
any other exception is a bug and reaches the server with its traceback. The featurizer is loaded once per server
session and reused.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy
import sklearn
import torch

from .. import __version__
from ..errors import ImageSimilarityError
from ..features.specs import DEFAULT_BACKBONE
from ..pipeline.evaluate import evaluate
from ..pipeline.featurize import Featurizer, featurize
from ..pipeline.ingest import ingest_bytes
from ..pipeline.neighbors import neighbors
from ..pipeline.rank import default_method, rank
from ..pipeline.split import split
from ..pipeline.steps import JOB, STEPS, Results, Run, choose_model, run_job
from ..pipeline.train import C_GRID, load_model, train
from ..store.postgres import PostgresStore

FEATURIZERS: dict[str, Featurizer] = {}
"""Loaded networks, kept for the life of the server session (a backend process)."""


def _featurizer(backbone: str | None, store: PostgresStore) -> Featurizer:
    name = backbone or DEFAULT_BACKBONE
    if name not in FEATURIZERS:  # a refined network's name is never reused, so its weights never change
        FEATURIZERS[name] = Featurizer(name, workers=1, store=store)
    return FEATURIZERS[name]


def _clear_errors(function: Callable) -> Callable:
    """Render an ImageSimilarityError as a plain SQL error with a one-line message; let anything else (a bug) raise
    with its traceback."""

    @functools.wraps(function)
    def wrapper(plpy: Any, *args: Any) -> Any:
        try:
            return function(plpy, *args)
        except ImageSimilarityError as err:
            plpy.error(f"image_similarity: {err}")

    return wrapper


def environment(plpy: Any) -> list[tuple[str, str]]:
    """(key, value) rows describing the Python that runs inside this server process."""


    return [("pid", str(os.getpid())), ("executable", os.path.realpath("/proc/self/exe")),
            ("python", sys.version.split()[0]), ("image_similarity", __version__), ("torch", torch.__version__),
            ("numpy", numpy.__version__), ("scikit-learn", sklearn.__version__),
            ("device", "cuda" if torch.cuda.is_available() else "cpu")]


@_clear_errors
def featurize_images(plpy: Any, backbone: str | None, batch_size: int) -> tuple[int, int, str, int]:
    """Procedure: featurize every image without features, committing each batch. (added, skipped, device, pid)."""
    store = PostgresStore.in_server(plpy, commits=True)
    report = featurize(store, _featurizer(backbone, store), batch_size=batch_size, progress=False)
    return report.added, len(report.skipped), report.device, os.getpid()


@_clear_errors
def prepare_data(plpy: Any, test_fraction: float, seed: int) -> list[tuple[str, int]]:
    """(subset, images) rows of a new train/test split, and ('unlabelled', count) when it left any out."""
    return sorted((k, n) for k, n in split(PostgresStore.in_server(plpy), test_fraction, seed).items() if n)


@_clear_errors
def train_model(plpy: Any, backbone: str | None, c_grid: list[float] | None, seed: int) -> list[tuple]:
    """One row (version, backbone, C, cv_accuracy, n_train) for the new model version."""
    model = train(PostgresStore.in_server(plpy), backbone, c_grid or C_GRID, seed=seed)
    return [(model.version, model.backbone, model.params["C"], model.params["cv_accuracy"], model.params["n_train"])]


@_clear_errors
def evaluate_model(plpy: Any, model_version: int | None, seed: int) -> str:
    """The stored evaluation summary of a model version (latest by default) as JSON."""
    store = PostgresStore.in_server(plpy)
    return json.dumps(evaluate(store, load_model(store, model_version), seed=seed))


@_clear_errors
def rank_candidates(plpy: Any, query: bytes, query_name: str, top: int, method: str | None,
                    model_version: int | None) -> list[tuple]:
    """(rank, image_id, name, label, score, method, item key, metadata JSON, suggested label, its probability) rows
    of the catalogue images most similar to a query."""

    store = PostgresStore.in_server(plpy)
    model, backbone = choose_model(store, model_version)
    featurizer = _featurizer(backbone, store)
    result = rank(store, bytes(query), featurizer, top=top, method=method, model=model, name=query_name)
    return [(m.rank, m.image_id, m.name, m.label, m.score, result.method, m.key,
             None if m.metadata is None else json.dumps(m.metadata), m.suggested, m.probability)
            for m in result.matches]


@_clear_errors
def initial_run_once(plpy: Any, backbone: str | None, test_fraction: float, seed: int) -> tuple:
    """Procedure: the JOB on the stored images (featurize, committing each batch; split; train; evaluate).
    (model_version, test_accuracy, best_method, pid)."""
    store = PostgresStore.in_server(plpy, commits=True)
    done = run_job(Run(store, lambda name: _featurizer(name, store), test_fraction=test_fraction, seed=seed,
                       backbone=backbone), JOB)
    return done.model.version, done.summary["test_accuracy"], done.summary["best_method"], os.getpid()


@_clear_errors
def refine_model(plpy: Any, backbone: str | None, epochs: int | None, seed: int) -> tuple:
    """Procedure: fine-tune a backbone on the training split, committing after every epoch (a new call resumes).
    (network name, best epoch, its validation accuracy, device, pid)."""
    record, _ = STEPS["refine"].compute(Run(PostgresStore.in_server(plpy, commits=True), backbone=backbone,
                                            epochs=epochs, seed=seed), Results())
    best = record.metrics["best"]
    return record.name, best["epoch"], best["val_accuracy"], record.metrics["device"], os.getpid()


@_clear_errors
def add_image(plpy: Any, name: str, label: str, data: bytes) -> tuple[int | None, str | None]:
    """Validate and store one image: (new id or NULL, reason it was skipped or NULL)."""
    store = PostgresStore.in_server(plpy)
    image_id, reason = ingest_bytes(store, name, label, bytes(data))
    if reason:
        store.record_rejected(name, label, reason, stage="ingest")
    return image_id, reason


@_clear_errors
def compute_neighbors(plpy: Any, backbone: str | None, method: str | None, top: int, model_version: int | None,
                      refresh: bool) -> tuple[int, str, int]:
    """Procedure (issue 17): store the top neighbours of every image, committing each block.
    (images added, method used, pid)."""

    store = PostgresStore.in_server(plpy, commits=True)
    model, backbone = choose_model(store, model_version, backbone)
    method = method or default_method(store, model)
    report = neighbors(store, backbone, method, top, model, refresh=refresh, progress=False)
    return report.added, method, os.getpid()
