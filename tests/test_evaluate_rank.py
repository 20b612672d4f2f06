"""Evaluation figures on the real bundled data, and ranking a query against the catalogue."""
from __future__ import annotations

import numpy as np
import pytest

from image_similarity.dedup import NEAR_DUPLICATE_DISTANCE, hamming
from image_similarity.evaluate import positive_ranks, retrieval_metrics
from image_similarity.images import BadImageError
from image_similarity.rank import METHODS, Catalogue, rank
from image_similarity.store import SQLiteStore, StoreError
from image_similarity.train import load_model

CNTK_ACCURACY, CNTK_TOP1 = 0.889, 0.433


def test_beats_the_reference_solution(full_db):
    summary = full_db[1]
    assert summary["test_accuracy"] > CNTK_ACCURACY
    assert summary["class_avg_accuracy"] > CNTK_ACCURACY
    best = summary["ranking"][summary["best_method"]]
    assert best["top1"] > CNTK_TOP1 and best["median_rank"] <= 2
    assert set(summary["ranking"]) == set(METHODS)
    assert all(0.9 < a <= 1 for a in summary["auc"].values())


def test_evaluation_is_stored_and_plotted(full_db):
    path, summary = full_db
    with SQLiteStore(path) as store:
        stored = store.evaluation()
        assert stored.summary["test_accuracy"] == summary["test_accuracy"]
        assert ("test", "accuracy", "", summary["test_accuracy"]) in stored.metrics
        assert sum(n for subset, _, _, n in stored.confusion if subset == "test") == summary["n_test"]
    for png in summary["plots"].values():
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_positive_rank_counts_negatives_scoring_at_least_as_high():
    labels = np.array(["a", "b", "b", "b"])
    similarity = np.array([[0.9, 0.95, 0.1, 0.2]])   # the only positive is beaten by one negative
    assert positive_ranks(similarity, np.array(["a"]), labels, n_negatives=3).tolist() == [2]
    figures = retrieval_metrics(similarity, np.array(["a"]), labels)
    assert figures["recall@1"] == 0 and figures["recall@5"] == 1 and figures["map"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def catalogue(full_db):
    with SQLiteStore(full_db[0]) as store:
        model = load_model(store)
        return Catalogue.from_store(store, model.backbone, model)


@pytest.mark.parametrize("method", METHODS)
def test_vectorised_similarity_equals_a_per_row_computation(catalogue, method):
    q = catalogue.features[5] * 0.7 + catalogue.features[9] * 0.3
    fast = catalogue.similarity(q, method)[0]
    unit = lambda v: v / np.linalg.norm(v)
    model = catalogue.model
    for i in (0, 17, 300):
        x = catalogue.features[i]
        slow = {"l2": -np.linalg.norm(q - x), "cosine": unit(q) @ unit(x),
                "scores": unit(model.decision_function(q[None])[0]) @ unit(model.decision_function(x[None])[0]),
                "learned": model.metric_weights @ (unit(q) - unit(x)) ** 2 + model.metric_bias}[method]
        assert fast[i] == pytest.approx(slow, rel=1e-3, abs=1e-4)


def test_rank_a_catalogue_image_excludes_it_and_its_twins(full_copy, featurizer):
    with SQLiteStore(full_copy) as store:
        images = store.images()
        query = images[40]
        result = rank(store, store.image_bytes(query.id), featurizer, name=query.name)
        assert len(result.matches) == 10 and [m.rank for m in result.matches] == list(range(1, 11))
        assert query.id not in {m.image_id for m in result.matches}
        by_id = {im.id: im for im in images}
        assert all(hamming(by_id[m.image_id].dhash, query.dhash) > NEAR_DUPLICATE_DISTANCE for m in result.matches)
        scores = [m.score for m in result.matches]
        assert scores == sorted(scores, reverse=True)
        assert result.method == store.evaluation().summary["best_method"]
        assert sum(m.label == query.label for m in result.matches) >= 8
        stored = store.conn.execute("SELECT image_id FROM rankings WHERE query_id = ? ORDER BY rank",
                                    (result.query_id,)).fetchall()
        assert [r[0] for r in stored] == [m.image_id for m in result.matches]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_ranks_same_class_images_first(full_copy, featurizer, method):
    """Over 12 test images (4 per class), most of each top 5 shares the query's label."""
    with SQLiteStore(full_copy) as store:
        test = [im for im in store.images() if store.split()[im.id] == "test"]
        queries = [im for label in ("dotted", "leopard", "striped") for im in test if im.label == label][::12]
        precision = []
        for im in queries:
            result = rank(store, store.image_bytes(im.id), featurizer, top=5, method=method, save=False)
            assert result.method == method and len(result.matches) == 5
            precision.append(np.mean([m.label == im.label for m in result.matches]))
    assert len(queries) >= 10 and np.mean(precision) >= 0.6, precision  # chance: about 0.36


def test_rank_errors_are_clear(full_copy, featurizer, tmp_path, small_dir):
    with SQLiteStore(full_copy) as store:
        with pytest.raises(BadImageError):
            rank(store, b"GIF89a not really", featurizer)
        with pytest.raises(ValueError, match="unknown ranking method"):
            rank(store, store.image_bytes(1), featurizer, method="nearest")
    with SQLiteStore(tmp_path / "empty.sqlite") as empty, pytest.raises(StoreError, match="empty catalogue"):
        rank(empty, (small_dir / "dotted" / sorted((small_dir / "dotted").iterdir())[0].name).read_bytes(),
             featurizer)
