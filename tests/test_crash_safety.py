"""Crash safety of the embedded default (SQLite): `kill -9` at 20 points across ingest, featurize, train and
evaluate, on 36 real photos and one truncated file. Most kills are placed inside a write transaction, after its
statements and before its commit (IMAGE_SIMILARITY_CRASH_AFTER, see store/sqlite.py); the others fall wherever
the step is when the database shows progress or a delay runs out. Each killed run starts where the previous one
left off. After every kill the file passes `PRAGMA integrity_check` and its foreign-key check and holds only whole
steps and whole batches; then the CLI reruns each step, and the result equals an uninterrupted run."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import class_files, ingest
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.store import SQLiteStore
from image_similarity.store.sqlite import CRASH_AFTER_ENV

STEP = Path(__file__).parent / "support" / "crash_step.py"
BATCH = 4  # tests/support/crash_step.py featurizes in batches of 4


@pytest.fixture(scope="module")
def photos(small_dir, tmp_path_factory) -> Path:
    """36 real photos in 3 classes and one truncated JPEG (ingest records it as rejected)."""
    root = tmp_path_factory.mktemp("crash") / "photos"
    shutil.copytree(small_dir, root)
    photo = next((root / "dotted").iterdir()).read_bytes()
    (root / "dotted" / "broken.jpg").write_bytes(photo[: len(photo) // 2])
    return root


@pytest.fixture(scope="module")
def reference(photos, featurizer, tmp_path_factory) -> Path:
    """The same work, uninterrupted."""
    path = tmp_path_factory.mktemp("crash-reference") / "reference.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, photos, progress=False)
        featurize(store, featurizer, batch_size=BATCH, progress=False)
        split(store, seed=0)
        train(store)
        evaluate(store)
    return path


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # table: a constant of this file


def check(db: Path, reference: Path) -> None:
    """An intact file with only whole models and whole evaluations (whole rows and batches are checked by the
    callers, which know how far each step got)."""
    with sqlite3.connect(db) as conn, sqlite3.connect(reference) as ref:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        arrays = ref.execute("SELECT COUNT(*) FROM model_arrays").fetchone()[0]
        assert all(n == arrays for n, in conn.execute(
            "SELECT COUNT(a.name) FROM models m LEFT JOIN model_arrays a USING (version) GROUP BY m.version"))
        shape = ref.execute("SELECT (SELECT COUNT(*) FROM evaluation_metrics), (SELECT COUNT(*) FROM "
                            "evaluation_confusion)").fetchone()
        assert all(row == shape for row in conn.execute(
            "SELECT (SELECT COUNT(*) FROM evaluation_metrics m WHERE m.evaluation_id = e.id),"
            " (SELECT COUNT(*) FROM evaluation_confusion c WHERE c.evaluation_id = e.id) FROM evaluations e"))


def run_killed(step: str, db: Path, folder: Path | str = "", crash_after: int | None = None,
               kill_when: Callable[[], bool] | None = None) -> int:
    """Run a step in its own process and kill it with SIGKILL: inside its write transaction number `crash_after`,
    or once `kill_when()` holds after the step started. The process's exit status."""
    env = {CRASH_AFTER_ENV: str(crash_after)} if crash_after else {}
    proc = subprocess.Popen([sys.executable, str(STEP), step, str(db), str(folder)], stdout=subprocess.PIPE,
                            text=True, env={**_environment(), **env})
    try:
        assert proc.stdout.readline() == "ready\n"
        while kill_when is not None and proc.poll() is None and not kill_when():
            time.sleep(0.01)
        if kill_when is not None:
            proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=600)
    finally:
        proc.kill()
        proc.wait()


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != CRASH_AFTER_ENV}


def after(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def features_reach(db: Path, n: int) -> Callable[[], bool]:
    return lambda: count(db, "features") >= n


def cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "image_similarity.entrypoints.cli", *args, "-q"], capture_output=True,
                          text=True, timeout=600, env=_environment(), check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kill_9_anywhere_then_rerun_equals_an_uninterrupted_run(photos, reference, tmp_path, capsys):
    db = tmp_path / "killed.sqlite"
    points: Counter[str] = Counter()
    good = [name for name, _, _ in class_files(photos) if name != "dotted/broken.jpg"]
    broken = [name for name, _, _ in class_files(photos)].index("dotted/broken.jpg") + 1
    assert len(good) == 36 and broken == 13

    # ingest: in order, one transaction per new image and one per rejected file; photos already stored are
    # found by their bytes and cost none. A kill inside a run's Nth transaction keeps what the N - 1 before it wrote.
    stored, rejected = 0, False
    for n in (1, 4, 5, 4, 2, 2, 2, 8, 10, 7):  # kills at files 1, 4, 8, 11, 12, 13 (broken), 14, 20, 28, 37 (last)
        assert run_killed("ingest", db, photos, crash_after=n) == -signal.SIGKILL
        check(db, reference)
        writes = 0
        for position in range(1, 38):
            if position == broken or position - (position > broken) > stored:
                writes += 1
                if writes == n:
                    break
                stored += position != broken
                rejected |= position == broken
        assert (count(db, "images"), count(db, "rejected_files")) == (stored, rejected)
        points["ingest"] += 1
    cli("ingest", str(photos), "--db", str(db))
    assert count(db, "images") == 36 and count(db, "rejected_files") == 1

    # featurize: one transaction per batch of 4; kills inside the 1st and 3rd batch of a run, then wherever the
    # process is when the database shows 16 and 28 vectors.
    stored = 0
    for n in (1, 3):
        assert run_killed("featurize", db, crash_after=n) == -signal.SIGKILL
        check(db, reference)
        stored += n - 1
        assert count(db, "features") == BATCH * stored
        points["featurize"] += 1
    for n in (16, 28):
        run_killed("featurize", db, kill_when=features_reach(db, n))
        check(db, reference)
        assert count(db, "features") % BATCH == 0 and count(db, "features") >= n
        points["featurize"] += 1
    cli("featurize", "--db", str(db), "--batch-size", str(BATCH), "--device", "cpu")
    assert count(db, "features") == 36

    with SQLiteStore(db) as store:
        split(store, seed=0)

    # train and evaluate write once each, at the end: a kill inside that transaction, then two after delays.
    for step, table in (("train", "models"), ("evaluate", "evaluations")):
        folder = tmp_path / "plots" if step == "evaluate" else ""
        assert run_killed(step, db, folder, crash_after=1) == -signal.SIGKILL
        check(db, reference)
        assert count(db, table) == 0
        for seconds in (0.3, 1.5):
            run_killed(step, db, folder, kill_when=after(seconds))
            check(db, reference)
        points[step] += 3
        cli(step, "--db", str(db), *(["--out", str(folder)] if folder else []))

    assert_same_work(db, reference)
    assert sum(points.values()) >= 20
    with capsys.disabled():
        print(f"\n  crash safety: kill -9 at {sum(points.values())} points ({dict(points)}): 0 corrupt files,"
              " 0 lost or duplicated rows, reruns equal an uninterrupted run")


def assert_same_work(db: Path, reference: Path) -> None:
    """The images, rejected files, features and split are those of the uninterrupted run, and so are the latest
    model and evaluation."""
    with SQLiteStore(db) as got, SQLiteStore(reference) as ref:
        rows = "SELECT id, name, label, sha256, dhash, data FROM images ORDER BY id"
        assert got.conn.execute(rows).fetchall() == ref.conn.execute(rows).fetchall()
        assert got.rejected() == ref.rejected()
        (ids, vectors), (ref_ids, ref_vectors) = got.features("efficientnet_lite0"), ref.features("efficientnet_lite0")
        assert ids.tolist() == ref_ids.tolist() and len(set(ids.tolist())) == 36
        np.testing.assert_allclose(vectors, ref_vectors, rtol=1e-5, atol=1e-6)
        assert got.split() == ref.split()
        model, ref_model = got.model(), ref.model()
        assert (model.classes, model.params) == (ref_model.classes, ref_model.params)
        for name, array in ref_model.arrays.items():
            np.testing.assert_allclose(model.arrays[name], array, rtol=1e-5, atol=1e-6)
        summary, ref_summary = got.evaluation().summary, ref.evaluation().summary
        ignore = {"evaluation_id", "model_version", "plots"}
        assert {k: v for k, v in summary.items() if k not in ignore} == \
            {k: v for k, v in ref_summary.items() if k not in ignore}
