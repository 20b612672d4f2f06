"""Ingest on real photos and on files made bad on purpose; hostile names never reach SQL text."""
from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from image_similarity.errors import NotFound
from image_similarity.pipeline.ingest import ingest
from image_similarity.store import SQLiteStore

HOSTILE = ["it's \"quoted\".jpg", "x'; DROP TABLE images; --.jpg", "ünïcødé 猫 🐆.jpg", "semi;colon.jpg",
           "a" * 200 + ".jpg"]


@pytest.fixture
def store(tmp_path):
    with SQLiteStore(tmp_path / "db.sqlite") as s:
        yield s


def test_bundled_data_ingests_completely_and_reingest_adds_nothing(store, sample_dir):
    report = ingest(store, sample_dir, progress=False)
    assert (report.added, report.skipped) == (557, [])
    labels = [im.label for im in store.images()]
    assert {lab: labels.count(lab) for lab in set(labels)} == {"dotted": 163, "leopard": 153, "striped": 241}
    again = ingest(store, sample_dir, progress=False)
    assert (again.added, again.already_stored, again.skipped) == (0, 557, [])
    assert len(store.images()) == 557


def test_png_named_jpg_is_stored_with_its_real_format(store, sample_dir):
    ingest(store, sample_dir, progress=False)
    formats = dict(store.conn.execute("SELECT format, COUNT(*) FROM images GROUP BY format").fetchall())
    assert formats == {"JPEG": 554, "PNG": 3}
    names = [r[0] for r in store.conn.execute("SELECT name FROM images WHERE format = 'PNG'")]
    assert all(n.endswith(".jpg") for n in names)


def test_bad_files_are_skipped_with_reasons_and_good_ones_kept(store, tmp_path, sample_dir):
    root = tmp_path / "in"
    good = root / "leopard"
    good.mkdir(parents=True)
    photo = sorted((sample_dir / "leopard").iterdir())[0]
    shutil.copy(photo, good / "good.jpg")
    (good / "empty.jpg").write_bytes(b"")
    (good / "half.jpg").write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    (good / "notes.jpg").write_text("not an image at all")
    loose = sorted((sample_dir / "leopard").iterdir())[1]
    (root / "loose.jpg").write_bytes(loose.read_bytes())           # no class folder: unlabelled (issue 29)
    other = root / "striped"
    other.mkdir()
    shutil.copy(photo, other / "same-bytes.jpg")                  # identical bytes, another label
    report = ingest(store, root, progress=False)
    reasons = dict(report.skipped)
    assert report.added == 2 and report.unlabelled == 1
    assert {im.name: im.label for im in store.images()} == {"loose.jpg": None, "leopard/good.jpg": "leopard"}
    assert reasons["leopard/empty.jpg"] == "empty file"
    assert reasons["leopard/half.jpg"] == "truncated image data"
    assert reasons["leopard/notes.jpg"].startswith("not an image")
    assert "identical to stored image 'leopard/good.jpg'" in reasons["striped/same-bytes.jpg"]
    recorded = {(name, stage) for name, _, stage, _ in store.rejected()}
    assert ("leopard/half.jpg", "ingest") in recorded and len(recorded) == 4
    again = ingest(store, root, progress=False)                      # re-run records nothing twice
    assert len(store.rejected()) == 4 and again.added == 0 and again.already_stored == 2


def test_hostile_names_are_stored_verbatim(store, tmp_path):
    label = "tab\tand 'quote'; DROP TABLE features; --"
    folder = tmp_path / "in" / label
    folder.mkdir(parents=True)
    for n, name in enumerate(HOSTILE):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (n * 40, 255 - n * 40, 90)).save(buf, "PNG")
        (folder / name).write_bytes(buf.getvalue())
    report = ingest(store, tmp_path / "in", progress=False)
    assert report.added == len(HOSTILE)
    stored = {im.name for im in store.images()}
    assert stored == {f"{label}/{name}" for name in HOSTILE}
    assert {im.label for im in store.images()} == {label}
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images", "features"} <= tables


def test_missing_folder_is_a_clear_error(store, tmp_path):
    with pytest.raises(NotFound, match="not a folder"):
        ingest(store, tmp_path / "nope", progress=False)
