"""Approximate (HNSW) search behind the searcher API: same answers as exact search, switched on by size."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from image_similarity.core.dedup import hamming, hamming_matrix, hamming_to, packed_hashes
from image_similarity.errors import Unavailable
from image_similarity.search import ann, searchers
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.searchers import GraphSearcher, Searcher, searcher, strategy
from image_similarity.store import SQLiteStore

MIN_RECALL = 0.95  # recall@10 of the HNSW graph against exact search


@pytest.fixture(scope="module")
def real(full_db) -> Catalogue:
    with SQLiteStore(full_db[0]) as store:
        backbone = next(iter(store.feature_counts()))
        return Catalogue.from_store(store, backbone)


def recall_at_10(graph: Searcher, queries: np.ndarray, exclude_rows: bool) -> float:
    """Share of the exact top 10 that the HNSW graph finds; query i excludes catalogue row i when asked."""
    exact = searcher(graph.catalogue, graph.method.name, index="exact")
    hits = 0
    for i, q in enumerate(queries):
        exclude = np.arange(len(graph.catalogue)) == i if exclude_rows else None
        truth = {m.image_id for m in exact.search(q, 10, exclude)}
        found = graph.search(q, 10, exclude)
        assert len(found) == 10 and [m.rank for m in found] == list(range(1, 11))
        assert all(a.score >= b.score for a, b in zip(found, found[1:]))
        hits += len(truth & {m.image_id for m in found})
    return hits / (10 * len(queries))


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_hnsw_finds_the_exact_top_10_on_real_features(real, method):
    graph = searcher(real, method, index="hnsw")
    assert recall_at_10(graph, real.features[:200], exclude_rows=True) >= MIN_RECALL
    assert isinstance(graph, GraphSearcher) and len(graph.graph) == len(real)


def test_hnsw_scores_are_the_exact_scores(real):
    q = real.features[3] * 0.5 + real.features[400] * 0.5
    approximate = {m.image_id: m.score for m in searcher(real, "l2", index="hnsw").search(q)}
    exact = searcher(real, "l2", index="exact").similarity(q)[0]
    rows = np.searchsorted(real.ids, list(approximate))
    np.testing.assert_allclose(list(approximate.values()), exact[rows], rtol=1e-4)


def test_hnsw_recall_on_clustered_real_features(real):
    rng = np.random.default_rng(0)
    base = np.repeat(real.features, 6, axis=0)  # 6 noisy copies of each real vector: 3,342 in clusters
    noisy = base + rng.normal(0, 0.05, base.shape).astype(np.float32) * base.std()
    n = len(noisy)
    catalogue = Catalogue(np.arange(n), [str(i) for i in range(n)], ["x"] * n, [str(i) for i in range(n)],
                          ["0" * 64] * n, noisy)
    queries = real.features[::10] + rng.normal(0, 0.05, real.features[::10].shape).astype(np.float32) * base.std()
    assert recall_at_10(searcher(catalogue, "l2", index="hnsw"), queries, exclude_rows=False) >= MIN_RECALL


def test_auto_switches_to_hnsw_above_the_threshold(full_db, monkeypatch):
    with SQLiteStore(full_db[0]) as store:
        backbone = next(iter(store.feature_counts()))
        catalogue = Catalogue.from_store(store, backbone)
    n = len(catalogue)
    assert inspect.signature(searcher).parameters["index"].default == "auto"
    assert searcher(catalogue, "l2").strategy == "exact"
    monkeypatch.setattr(searchers, "ANN_THRESHOLD", n)
    assert strategy("l2", size=n) == strategy("cosine", size=n) == "hnsw"
    assert strategy("scores", size=n) == strategy("learned", size=n) == "exact"
    chosen = searcher(catalogue, "cosine")
    chosen.search(catalogue.features[0])
    assert isinstance(chosen, GraphSearcher) and chosen.method.name == "cosine"
    assert strategy("l2", "exact", n) == "exact"
    monkeypatch.setattr(ann, "available", lambda: False)  # without faiss: auto stays exact, hnsw is an error
    assert strategy("l2", "auto", n) == "exact"
    with pytest.raises(Unavailable, match=r"pip install 'image-similarity\[ann\]'"):
        searcher(catalogue, "l2", index="hnsw")
    with pytest.raises(ValueError, match="unknown index 'ivf'"):
        searcher(catalogue, "l2", index="ivf")


def test_packed_hamming_equals_the_pairwise_matrix(real):
    hashes = real.dhashes
    for query in (hashes[0], hashes[100], "f" * 64):
        assert hamming_to(query, packed_hashes(hashes)).tolist() == hamming_matrix([query], hashes)[0].tolist()
    assert hamming_to("abc", packed_hashes(["123", "abd"])).tolist() == [hamming("abc", "123"), 1]  # odd width
