"""Shared fixtures: the bundled real photos, one pretrained featurizer, and one fully run pipeline."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from image_similarity.core import machine
from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DATASET


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, sample_dir) -> Path:
    """A copy of 12 real photos per class, for tests that run whole steps quickly."""
    root = tmp_path_factory.mktemp("small")
    for label in ("dotted", "leopard", "striped"):
        (root / label).mkdir()
        for path in sorted((sample_dir / label).iterdir())[:12]:
            shutil.copy(path, root / label / path.name)
    return root


@pytest.fixture(scope="session")
def featurizer() -> Featurizer:
    return Featurizer(device="cpu")


@pytest.fixture(scope="session")
def full_db(tmp_path_factory, sample_dir, featurizer) -> tuple[Path, dict]:
    """The whole job on all 557 bundled photos: (database file, evaluation summary). Do not modify it."""
    path = tmp_path_factory.mktemp("full") / "full.sqlite"
    return path, whole_job(path, sample_dir, featurizer)


def whole_job(path: Path, folder: Path, featurizer: Featurizer) -> dict:
    """Ingest `folder` into a new SQLite file, featurize, split, train and evaluate; the evaluation summary."""
    with SQLiteStore(path) as store:
        ingest(store, folder, progress=False)
        featurize(store, featurizer, progress=False)
        split(store, seed=0)
        train(store, featurizer.backbone)
        summary = evaluate(store, out_dir=path.parent / "plots")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return summary


def copy_database(source: Path, path: Path) -> Path:
    """A consistent copy of a SQLite database (its WAL included) at `path`, read through SQLite's backup."""
    with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    return path


@pytest.fixture
def full_copy(full_db, tmp_path) -> Path:
    """A private copy of the full database that a test may change."""
    copy = tmp_path / "copy.sqlite"
    with SQLiteStore(full_db[0]) as src:
        src.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(full_db[0], copy)
    return copy


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """Machine choices (precision, scan kernel) measured anew, cached in a file of this test's own."""
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path))
    machine.forget()
    yield tmp_path / "choices.json"
    machine.forget()
