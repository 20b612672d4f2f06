"""Shared fixtures: the bundled real photos (all, or the first n of each class), one pretrained featurizer, one fully
run pipeline, and one throwaway PostgreSQL server for the whole run (started when a test first needs it). Importable
without torch (the featurizer's fixture imports it), for the tests SQL Server's runtime profile runs
(.ci/sqlserver-profile)."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support import pgserver
from support.catalogues import first_photos, whole_job

from image_similarity.core import machine
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore

if TYPE_CHECKING:
    from image_similarity.pipeline.featurize import Featurizer


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DATASET


@pytest.fixture(scope="session")
def photo_dirs(tmp_path_factory, sample_dir) -> Callable[[int], Path]:
    """`photo_dirs(n)`: a folder with a copy of the first n real photos of each class, made once per n."""
    made: dict[int, Path] = {}

    def photos(n: int) -> Path:
        if n not in made:
            made[n] = first_photos(sample_dir, tmp_path_factory.mktemp(f"photos{n}"), n)
        return made[n]

    return photos


@pytest.fixture(scope="session")
def small_dir(photo_dirs) -> Path:
    """12 real photos per class, for tests that run whole steps quickly."""
    return photo_dirs(12)


@pytest.fixture(scope="session")
def featurizer() -> Featurizer:
    from image_similarity.pipeline.featurize import Featurizer

    return Featurizer(device="cpu")


@pytest.fixture(scope="session")
def full_db(tmp_path_factory, sample_dir, featurizer) -> tuple[Path, dict]:
    """The whole job on all 557 bundled photos: (database file, evaluation summary). Do not modify it."""
    path = tmp_path_factory.mktemp("full") / "full.sqlite"
    return path, whole_job(path, sample_dir, featurizer)


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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The admin URL of one PostgreSQL server with PL/Python and pgvector for the whole run, started when a test
    first asks for it (skipped with the reason where none can start, failed under CI)."""
    yield from pgserver.admin_url()


@pytest.fixture
def database(pg_server, request) -> str:
    """A new database on the server with the extensions and routines of SQLR/postgres/, named after the test."""
    return pgserver.create_database(pg_server, pgserver.database_name(request.node.name))
