"""SQLite catalogues for the tests: a folder of the first photos of each class, the whole job run on a folder, and
consistent copies of a database. Imported by conftest.py, so also in SQL Server's runtime profile, which has no
torch (tests/test_sqlserver_profile.py): the pipeline is imported where the job runs."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from image_similarity.store import SQLiteStore

if TYPE_CHECKING:
    from image_similarity.pipeline.featurize import Featurizer


def first_photos(source: Path, root: Path, n: int) -> Path:
    """`root`, made to hold a copy of the first n photos of each class folder of `source`."""
    for label in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / label.name).mkdir(parents=True)
        for path in sorted(label.iterdir())[:n]:
            shutil.copy(path, root / label.name / path.name)
    return root


def whole_job(path: Path, folder: Path, featurizer: Featurizer) -> dict:
    """Ingest `folder` into a new SQLite file, featurize, split, train and evaluate; the evaluation summary."""
    from image_similarity.pipeline.evaluate import evaluate
    from image_similarity.pipeline.featurize import featurize
    from image_similarity.pipeline.ingest import ingest
    from image_similarity.pipeline.split import split
    from image_similarity.pipeline.train import train

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
