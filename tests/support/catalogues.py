"""SQLite catalogues for the tests: the whole job run on a folder, and consistent copies of a database."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.store import SQLiteStore


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
