"""Split (stratified, seeded, near-duplicates kept together) and train (versioned plain-array models)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from image_similarity.core.dedup import dhash, near_duplicate_groups
from image_similarity.core.images import decode_image
from image_similarity.errors import NotReady
from image_similarity.pipeline.split import split, split_images
from image_similarity.pipeline.train import SimilarityModel, load_model, train
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.searchers import searcher
from image_similarity.store import ImageRow, SQLiteStore


@pytest.fixture(scope="module")
def images(full_db):
    with SQLiteStore(full_db[0]) as store:
        return store.images()


def test_same_seed_same_split_other_seed_other_split(images):
    assert split_images(images, seed=3) == split_images(images, seed=3)
    assert split_images(images, seed=3) != split_images(images, seed=4)


def test_split_is_stratified(images):
    subsets = split_images(images, test_fraction=0.25, seed=1)
    for label in ("dotted", "leopard", "striped"):
        ids = [im.id for im in images if im.label == label]
        share = sum(subsets[i] == "test" for i in ids) / len(ids)
        assert 0.2 <= share <= 0.3, (label, share)


def test_no_near_duplicate_straddles_the_split(images, full_db):
    """The bundled photos have no dhash twins, so add re-encoded copies of 60 of them as twins."""
    with SQLiteStore(full_db[0]) as store:
        twins = []
        for n, im in enumerate(images[::9]):
            buf = io.BytesIO()
            decode_image(store.image_bytes(im.id)).resize((200, 200)).save(buf, "JPEG", quality=70)
            twins.append(ImageRow(100_000 + n, f"copy of {im.name}", im.label, "", dhash(decode_image(buf.getvalue()))))
    rows = images + twins
    groups = near_duplicate_groups([im.dhash for im in rows])
    assert len(set(groups)) <= len(rows) - len(twins) * 0.9
    subsets = split_images(rows, seed=0)
    sides: dict[int, set] = {}
    for im, g in zip(rows, groups):
        sides.setdefault(int(g), set()).add(subsets[im.id])
    assert all(len(s) == 1 for s in sides.values())
    assert 0.2 < sum(v == "test" for v in subsets.values()) / len(rows) < 0.3


def test_bad_fraction_and_empty_store_are_clear_errors(images, tmp_path):
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_images(images, test_fraction=1.5)
    with SQLiteStore(tmp_path / "empty.sqlite") as store, pytest.raises(NotReady, match="no images"):
        split(store)


def test_training_adds_versions_that_round_trip_as_plain_arrays(full_copy):
    with SQLiteStore(full_copy) as store:
        before = load_model(store)
        model = train(store, before.backbone, C=[0.1, 1.0], seed=1)
        assert model.version == before.version + 1
        assert load_model(store).version == model.version
        assert load_model(store, before.version).params["C"] == before.params["C"]
        again = load_model(store)
        np.testing.assert_array_equal(again.coef, model.coef)
        np.testing.assert_array_equal(again.embedding, model.embedding)
        assert again.temperature == model.temperature > 0 and model.embedding.shape[1] == len(model.classes) - 1
        _, X = store.features(model.backbone)
        assert (again.predict(X) == model.predict(X)).all()
        probabilities = again.probabilities(X)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
        assert (np.asarray(again.classes)[probabilities.argmax(axis=1)] == model.predict(X)).all()
        dtypes = {r[0] for r in store.conn.execute("SELECT dtype FROM model_arrays")}
        assert dtypes <= {"<f4", "<f8"}
        assert model.coef.shape == (3, X.shape[1]) and model.classes == ["dotted", "leopard", "striped"]
        assert model.params["C"] in (0.1, 1.0)


def test_training_needs_a_split_and_features(tmp_path, small_dir):
    from image_similarity.pipeline.ingest import ingest

    with SQLiteStore(tmp_path / "db.sqlite") as store:
        ingest(store, small_dir, progress=False)
        with pytest.raises(NotReady, match="split"):
            train(store)
        split(store)
        with pytest.raises(NotReady, match="featurize"):
            train(store)
        with pytest.raises(NotReady, match="no trained model"):
            load_model(store)


def test_a_model_stored_by_an_older_release_still_ranks_by_features(full_db):
    """Models stored before calibration and the embedding existed load; the methods needing them ask to retrain."""
    with SQLiteStore(full_db[0]) as store:
        record = store.model()
        catalogue_ids, X = store.features(record.backbone)
    old = dataclasses.replace(record, arrays={k: record.arrays[k] for k in ("coef", "intercept")})
    model = SimilarityModel.from_record(old)
    assert model.temperature is None and model.embedding is None
    catalogue = Catalogue(catalogue_ids, [""] * len(X), ["x"] * len(X), [""] * len(X), ["0" * 64] * len(X), X)
    assert searcher(catalogue, "cosine", model).similarity(X[0])[0].argmax() == 0
    for method in ("scores", "learned"):
        with pytest.raises(NotReady, match="run 'image-similarity train' again"):
            searcher(catalogue, method, model).similarity(X[0])
