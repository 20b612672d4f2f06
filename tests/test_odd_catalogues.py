"""The whole pipeline on odd catalogues (issue 25 item 3), property-based (hypothesis), through the CLI's main().

Each catalogue is a folder of small downscaled bundled photos: 0-5 images in each of 0-6 classes with odd names
(unicode, spaces), the same photo in two classes (as the same bytes, or re-encoded: a near duplicate), files outside
any class folder, empty and non-image files, up to all of them bad. Every step (ingest, featurize, split, train,
evaluate, rank, neighbors) either succeeds or answers one line of the package's errors (exit status 1; a traceback
fails the test), running it again changes nothing stored, and everything stored stays readable.

Derandomized with no example database: CI and a local run try the same catalogues. The featurizer is the session's
(loading the network for every command would dominate the time).
"""
from __future__ import annotations

import io
import json
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from image_similarity.core.images import decode_image
from image_similarity.entrypoints import cli
from image_similarity.errors import NotReady
from image_similarity.store import SQLiteStore

SIDE = 48
"""Pixels per side of the photos in the catalogues (featurize scales them up: only the time matters)."""
PHOTOS_PER_CLASS = 3
NAMES = ("dotted", "Streifen mit Leerzeichen", "léopard", "点", "a", "z 9")
FILE_NAMES = ("photo", "ph oto", "фото", "e\u0301té")
BAD = {"empty": b"", "text": b"not an image at all\n"}
TABLES = {"images": "id, name, label, sha256, dhash", "rejected_files": "name, label, stage, reason",
          "features": "image_id, backbone, vector", "splits": "image_id, subset",
          "neighbors": "image_id, backbone, method, model_version, rank, neighbor_id, score"}
"""What a re-run must leave as it was (models and evaluations are compared by content: a re-run adds a version)."""


@pytest.fixture(scope="module")
def pool(sample_dir) -> list[Image.Image]:
    """Small distinct photos: the first PHOTOS_PER_CLASS of each bundled class, downscaled."""
    return [decode_image(path.read_bytes()).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
            for label in ("dotted", "leopard", "striped")
            for path in sorted((sample_dir / label).iterdir())[:PHOTOS_PER_CLASS]]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if fmt == "jpg" else "PNG", **({"quality": 85} if fmt == "jpg" else {}))
    return buffer.getvalue()


FILE = st.tuples(st.sampled_from([*range(3 * PHOTOS_PER_CLASS), *sorted(BAD)]),
                 st.sampled_from(("jpg", "png")), st.sampled_from(FILE_NAMES))
"""One file: a photo of the pool (its index) or, 2 times in 11, a bad file; its format, and a name."""
CATALOGUE = st.tuples(st.dictionaries(st.sampled_from(NAMES), st.lists(FILE, max_size=5), min_size=1, max_size=6),
                      st.lists(FILE, max_size=2))
"""({class: files}, files outside any class folder)."""
ISSUE = ({"dotted": [(i, "jpg", "photo") for i in range(3)], "leopard": [(i, "jpg", "photo") for i in range(3, 6)],
          "Streifen mit Leerzeichen": [(6, "jpg", "photo")]}, [])
"""The issue's catalogue, small: 3, 3 and 1 photos."""


def write(root: Path, catalogue: tuple[dict, list], pool: list[Image.Image]) -> Path:
    classes, loose = catalogue
    root.mkdir()
    for folder, files in [*((root / name, files) for name, files in classes.items()), (root, loose)]:
        folder.mkdir(exist_ok=True)
        for n, (what, fmt, name) in enumerate(files):
            data = BAD[what] if isinstance(what, str) else encode(pool[what], fmt)
            (folder / f"{name} {n}.{fmt}").write_bytes(data)
    return root


def stored(db: Path) -> dict:
    """The tables a re-run must leave unchanged, and the latest model's and evaluation's content."""
    with sqlite3.connect(db) as conn:
        state = {t: conn.execute(f"SELECT {c} FROM {t} ORDER BY {c}").fetchall() for t, c in TABLES.items()}
    with SQLiteStore(db) as store:
        try:
            model = store.model()
            state["model"] = (model.classes, model.params, {k: v.tobytes() for k, v in model.arrays.items()})
        except NotReady:
            state["model"] = None
        evaluation = store.evaluation()
        skip = ("evaluation_id", "plots", "model_version")
        state["evaluation"] = evaluation and json.dumps({k: v for k, v in evaluation.summary.items() if k not in skip},
                                                        sort_keys=True)
    state["model"] = state["model"] and json.dumps(state["model"], sort_keys=True, default=repr)
    return state


def readable(db: Path) -> None:
    """Everything stored reads back through the store: each image decodes, each vector is finite."""
    with SQLiteStore(db) as store:
        for image in store.images():
            decode_image(store.image_bytes(image.id))
        for backbone in store.feature_counts():
            _, X = store.features(backbone)
            assert np.isfinite(X).all()
        subsets = store.split()
        assert set(subsets.values()) <= {"train", "test"}
        store.rejected()
        if store.evaluation() is not None:
            store.model()


@pytest.fixture
def session_featurizer(monkeypatch, featurizer):
    """The CLI's featurizer is the session's: the same network and settings, loaded once."""
    monkeypatch.setattr(cli, "_featurizer", lambda *args, **kwargs: featurizer)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(catalogue=CATALOGUE)
@example(catalogue=ISSUE)
@example(catalogue=({}, []))  # an empty folder
@example(catalogue=({"dotted": [(i, "png", "ph oto") for i in range(4)]}, []))  # a single class
@example(catalogue=({"a": [("text", "jpg", "photo")], "点": [("empty", "png", "фото")]}, [(0, "jpg", "photo")]))
@example(catalogue=({"a": [(0, "jpg", "photo"), (1, "jpg", "photo"), (2, "jpg", "photo")],  # one photo in two classes
                     "z 9": [(0, "png", "photo"), (0, "jpg", "photo"), (3, "jpg", "photo"), (4, "jpg", "photo")]}, []))
def test_every_step_succeeds_or_answers_one_line(catalogue, pool, capsys, session_featurizer):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, db = write(tmp / "catalogue", catalogue, pool), tmp / "db.sqlite"
        query = tmp / "query.png"
        query.write_bytes(encode(pool[-1], "png"))
        steps = [["ingest", str(folder)], ["featurize"], ["split"], ["train"], ["evaluate", "--out", str(tmp / "out")],
                 ["rank", str(query)], ["neighbors"]]
        for argv in steps:
            answers = []
            for _ in range(2):
                code = cli.main([*argv, "--db", str(db), "-q"])
                out, err = capsys.readouterr()
                assert code in (0, 1), (argv, code, err)
                if code:
                    assert err.startswith("image-similarity: error: ") and err.count("\n") == 1, (argv, err)
                answers.append((code, err, out if argv[0] == "rank" else "", stored(db)))
            event(f"{argv[0]}: " + (answers[0][1].removeprefix("image-similarity: error: ")[:40] if answers[0][0]
                                    else "ok"))
            assert answers[0] == answers[1], argv  # a re-run changes nothing
        readable(db)
