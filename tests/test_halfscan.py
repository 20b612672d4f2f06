"""Exact search through a float16 scan: the error bound holds, and the results equal the plain float32 scan."""
from __future__ import annotations

import numpy as np
import pytest

from image_similarity import rank
from image_similarity.halfscan import HalfMatrix
from image_similarity.rank import HALF_SCANNED, Catalogue
from image_similarity.store import SQLiteStore
from image_similarity.train import load_model

SCANNED = HALF_SCANNED  # the methods whose big matrix the float16 copy replaces


@pytest.fixture(scope="module")
def real(full_db) -> Catalogue:
    with SQLiteStore(full_db[0]) as store:
        model = load_model(store)
        return Catalogue.from_store(store, model.backbone, model, index="exact")


def clustered_catalogue(n: int, dim: int, clusters: int, spread: float, seed: int = 0) -> Catalogue:
    """n non-negative vectors around `clusters` random centres (like pooled CNN features)."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (clusters, dim)).astype(np.float32)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * spread
    vectors = np.maximum(centres[rng.integers(0, clusters, n)] + noise, 0)
    return Catalogue(np.arange(n), [str(i) for i in range(n)], ["x"] * n, [f"{i:064x}" for i in range(n)],
                     ["0" * 64] * n, vectors)


def both_ways(monkeypatch, catalogue: Catalogue, query: np.ndarray, method: str, top: int,
              exclude: np.ndarray | None = None) -> tuple[list, list]:
    """The search through the float16 scan, and the plain float32 scan of every row."""
    monkeypatch.setattr(rank, "HALF_SCAN_THRESHOLD", 0)
    fast = catalogue.search(query, method, top, exclude)
    monkeypatch.setattr(rank, "HALF_SCAN_THRESHOLD", len(catalogue) + 1)
    return fast, catalogue.search(query, method, top, exclude)


def assert_same(fast: list, plain: list) -> None:
    assert [m.image_id for m in fast] == [m.image_id for m in plain]
    np.testing.assert_allclose([m.score for m in fast], [m.score for m in plain], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matrix", ["features", "unit"])
def test_float16_inner_products_stay_within_their_bound(real, matrix):
    rows = getattr(real, matrix)
    half = HalfMatrix(rows)
    rng = np.random.default_rng(0)
    vectors = [rows[7], rows[200] * 0.3 + rows[9], rng.gamma(1.0, 1.0, rows.shape[1]), -rows[3] * 1e-3,
               rng.standard_normal(rows.shape[1]) * 1e4]
    for v in vectors:
        approx, bound = half.dot(v.astype(np.float32))
        exact = rows.astype(np.float64) @ v.astype(np.float64)
        error = np.abs(approx - exact)
        assert (error <= bound).all()
        assert error.max() > 0  # really approximate, yet the bound is tight enough to screen with:
        assert (bound <= 0.005 * np.linalg.norm(v) * np.linalg.norm(rows, axis=1) + 1e-9).all()


@pytest.mark.parametrize("method", SCANNED)
def test_real_features_rank_the_same_through_the_float16_scan(real, monkeypatch, method):
    for i in range(0, len(real), 7):
        exclude = real.duplicates_of(real.sha256[i], real.dhashes[i])
        assert_same(*both_ways(monkeypatch, real, real.features[i], method, 10, exclude))
    mixed = real.features[3] * 0.5 + real.features[400] * 0.5
    for top in (1, 50, len(real)):
        assert_same(*both_ways(monkeypatch, real, mixed, method, top))
    assert ("features" if method == "l2" else "unit") in real.halves


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_clustered_100k_catalogue_ranks_the_same(monkeypatch, method):
    catalogue = clustered_catalogue(100_000, 128, clusters=1_000, spread=0.35)
    rng = np.random.default_rng(1)
    for i in rng.integers(0, len(catalogue), 12):
        exclude = np.arange(len(catalogue)) == i
        assert_same(*both_ways(monkeypatch, catalogue, catalogue.features[i] + 0.01, method, 10, exclude))
    assert_same(*both_ways(monkeypatch, catalogue, rng.gamma(1.0, 1.0, 128).astype(np.float32), method, 25))


def test_rows_beyond_the_candidates_are_rescored_when_bounds_overlap(monkeypatch):
    """300 close copies of one vector: their float16 bounds overlap beyond the 110 candidates (their float32
    distances are still far apart compared with float32 rounding, so the exact order is well defined)."""
    catalogue = clustered_catalogue(100_000, 128, clusters=1_000, spread=0.35)
    rng = np.random.default_rng(2)
    catalogue.features[:300] = catalogue.features[0] + rng.standard_normal((300, 128)).astype(np.float32) * 0.05
    catalogue.sq_norms[:300] = np.einsum("ij,ij->i", catalogue.features[:300], catalogue.features[:300])
    scored = []
    similarity = catalogue.similarity
    monkeypatch.setattr(catalogue, "similarity", lambda q, m, rows=None: scored.append(
        len(catalogue) if rows is None else len(rows)) or similarity(q, m, rows))
    fast, plain = both_ways(monkeypatch, catalogue, catalogue.features[0] + 1e-3, "l2", 10)
    assert_same(fast, plain)
    assert scored[0] == 110 and scored[1] >= 300 and scored[2] == len(catalogue)
