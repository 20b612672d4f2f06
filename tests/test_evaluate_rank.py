"""Evaluation figures on the real bundled data, and ranking a query against the catalogue."""
from __future__ import annotations

import numpy as np
import pytest

from image_similarity.core.dedup import NEAR_DUPLICATE_DISTANCE, hamming
from image_similarity.core.images import BadImageError
from image_similarity.errors import NotReady
from image_similarity.pipeline.evaluate import draw_candidates, positive_ranks, retrieval_metrics
from image_similarity.pipeline.rank import rank
from image_similarity.pipeline.train import load_model
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.methods import METHODS, TIE_BREAK
from image_similarity.search.searchers import searcher, store_searcher
from image_similarity.store import SQLiteStore
from image_similarity.store.base import VECTOR_SEARCH

CNTK_ACCURACY, CNTK_TOP1 = 0.889, 0.433  # the CNTK tutorial on the same 3 classes, the same protocol


def test_beats_the_reference_solution(full_db):
    summary = full_db[1]
    assert summary["test_accuracy"] > CNTK_ACCURACY
    assert summary["class_avg_accuracy"] > CNTK_ACCURACY
    assert set(summary["ranking"]) == set(summary["catalogue_ranking"]) == set(METHODS)
    assert summary["n_ranking_queries"] == summary["n_test"]  # every test image is a query
    best = summary["ranking"][summary["best_method"]]
    assert summary["best_method"] == max(METHODS, key=lambda m: summary["ranking"][m]["top1"])
    assert best["top1"] > CNTK_TOP1 and best["median_rank"] <= 2
    assert all(0.9 < a <= 1 for a in summary["auc"].values())


def test_methods_that_need_no_class_scores_and_the_order_within_a_class(full_db):
    ranking, catalogue = full_db[1]["ranking"], full_db[1]["catalogue_ranking"]
    # the learned embedding needs no class scores and finds the positive first far more often than raw features
    assert ranking["learned"]["top1"] > 2 * max(ranking["cosine"]["top1"], ranking["l2"]["top1"])
    # scores puts same-class images first, and among them the ones that look most like the query
    assert catalogue["scores"]["precision@10"] > catalogue["cosine"]["precision@10"]
    assert catalogue["scores"]["look_alike@10"] > 0.05


def test_class_probabilities_are_calibrated_on_the_test_split(full_db):
    """As confident as right: the mean top probability on unseen images is close to the accuracy."""
    with SQLiteStore(full_db[0]) as store:
        model = load_model(store)
        _, X = store.features(model.backbone, [i for i, s in store.split().items() if s == "test"])
    confidence = model.probabilities(X).max(axis=1).mean()
    assert abs(confidence - full_db[1]["test_accuracy"]) < 0.05 and model.temperature > 0


def test_original_protocol_on_a_case_worked_out_by_hand():
    labels = np.array(["a", "a", "a", "b", "c"])
    excluded = np.eye(5, dtype=bool)
    excluded[0, 2] = excluded[2, 0] = True  # 0 and 2 are near duplicates: neither is the other's positive
    positives, negatives = draw_candidates(labels, labels, excluded, seed=3, n_negatives=4)
    assert positives.tolist() == [1, positives[1], 1, -1, -1]  # b and c have no second image: no query
    assert positives[1] in (0, 2)
    assert all(set(labels[negatives[q]]) <= {"b", "c"} for q in range(3))
    similarity = np.array([[1.0, 0.5, 0.9, 0.7, 0.6],    # 0: both negatives beat its positive 1: rank 5
                           [0.5, 1.0, 0.8, 0.8, 0.1],    # 1: b negatives tie or beat its positive, c ones lose
                           [0.9, 0.2, 1.0, 0.1, 0.1],    # 2: its positive 1 beats every negative: rank 1
                           [0.0] * 5, [0.0] * 5])
    assert positive_ranks(similarity, positives, negatives).tolist() == [5, 1 + np.sum(negatives[1] == 3), 1]
    assert draw_candidates(labels, labels, excluded, seed=3, n_negatives=4)[1].tolist() == negatives.tolist()


def test_negatives_are_drawn_class_first_as_the_original_did():
    """Each negative picks one of the other classes uniformly, then one of its images: a class of 1 image
    gets as many negatives as a class of 60."""
    labels = np.array(["a"] * 3 + ["b"] + ["c"] * 60)
    positives, negatives = draw_candidates(labels[:3], labels, np.zeros((3, len(labels)), dtype=bool), n_negatives=2000)
    share_b = np.mean(labels[negatives] == "b")
    assert 0.45 < share_b < 0.55 and set(labels[negatives.ravel()]) == {"b", "c"}
    assert set(labels[positives]) == {"a"}


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


def test_retrieval_figures_worked_out_by_hand():
    labels = np.array(["a", "b", "b", "a"])
    similarity = np.array([[0.9, 0.95, 0.1, 0.2]])   # order: b, a(0), a(3), b
    look = np.array([[0.8, 0.0, 0.0, 0.2]])          # image 0 looks like the query, image 3 less so
    figures = retrieval_metrics(similarity, np.array(["a"]), labels, look, top=2)
    assert figures["recall@1"] == 0 and figures["recall@5"] == 1 and figures["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert figures["precision@2"] == 0.5 and figures["look_alike@2"] == pytest.approx(0.8 - 0.5)


@pytest.fixture(scope="module")
def catalogue(full_db) -> tuple[Catalogue, object]:
    """The catalogue and its model."""
    with SQLiteStore(full_db[0]) as store:
        model = load_model(store)
        return Catalogue.from_store(store, model.backbone), model


@pytest.mark.parametrize("method", METHODS)
def test_vectorised_similarity_equals_a_per_row_computation(catalogue, method):
    catalogue, model = catalogue
    q = catalogue.features[5] * 0.7 + catalogue.features[9] * 0.3
    fast = searcher(catalogue, method, model).similarity(q)[0]
    unit = lambda v: v / np.linalg.norm(v)
    for i in (0, 17, 300):
        x = catalogue.features[i]
        slow = {"l2": -np.linalg.norm(q - x), "cosine": unit(q) @ unit(x),
                "scores": model.probabilities(q[None])[0] @ model.probabilities(x[None])[0] + TIE_BREAK * unit(q) @ unit(x),
                "learned": unit((unit(q) - model.embedding_mean) @ model.embedding)
                           @ unit((unit(x) - model.embedding_mean) @ model.embedding)}[method]
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
    with SQLiteStore(tmp_path / "empty.sqlite") as empty, pytest.raises(NotReady, match="empty catalogue"):
        rank(empty, (small_dir / "dotted" / sorted((small_dir / "dotted").iterdir())[0].name).read_bytes(),
             featurizer)


def test_rank_asks_the_database_only_when_the_store_can_search_vectors(full_copy, featurizer, monkeypatch):
    """A store without VECTOR_SEARCH is never asked: its image rows are read once, with the features. One with it
    ranks l2 and cosine itself (without the query and its twins) before any row is read into a catalogue."""
    with SQLiteStore(full_copy) as store:
        model, query = load_model(store), store.images()[40]
        data, calls, images = store.image_bytes(query.id), [], store.images
        monkeypatch.setattr(store, "images", lambda: calls.append("images") or images())
        monkeypatch.setattr(store, "nearest", lambda *args: calls.append(args[2:]) or [(7, -1.5)])
        assert len(rank(store, data, featurizer, method="l2", save=False).matches) == 10 and calls == ["images"]
        monkeypatch.setattr(store, "capabilities", frozenset({VECTOR_SEARCH}))
        assert store_searcher(store, model.backbone, "scores", model).strategy == "exact"
        calls.clear()
        result = rank(store, data, featurizer, method="cosine", index="hnsw", save=False)
        assert calls[0] == "images" and calls[1][:2] == ("cosine", 10) and calls[1][3] is True
        assert query.id in calls[1][2] and len(calls) == 2
        assert [(m.image_id, m.name, m.score) for m in result.matches] == [(7, {im.id: im for im in images()}[7].name, -1.5)]
