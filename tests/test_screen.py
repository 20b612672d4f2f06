"""Exact search through a screening scan (float16, bfloat16 or int8): the error bounds hold, the results equal the
plain float32 scan, and the kernel is chosen by measurement, falling back to float32 when no screening one is
faster."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from image_similarity.core import machine
from image_similarity.pipeline.train import load_model
from image_similarity.search import screen, searchers
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.methods import scoring_method
from image_similarity.search.screen import SCREENING, screening_copy
from image_similarity.search.searchers import SCREENED_METHODS, ExactSearcher, Searcher, searcher
from image_similarity.store import SQLiteStore

SCANNED = SCREENED_METHODS  # the methods whose big matrix the screening copy replaces
# Most a bound may be, relative to |v| |row|, to screen with. int8 steps are per row (its largest entry / 127): on
# multi-stage features, whose short unit-length parts have larger entries, its bound reaches 0.104 |v| |row|.
TIGHTNESS = {"fp16": 0.004, "bf16": 0.015, "int8": 0.12}


@pytest.fixture(params=SCREENING)
def kernel(request, monkeypatch) -> str:
    """Each screening kernel in turn, used by every searcher whatever this machine measured."""
    monkeypatch.setattr(searchers, "scan_kernel", lambda: request.param)
    return request.param


@pytest.fixture(scope="module")
def real(full_db) -> Catalogue:
    with SQLiteStore(full_db[0]) as store:
        return Catalogue.from_store(store, load_model(store).backbone)


def clustered_catalogue(n: int, dim: int, clusters: int, spread: float, seed: int = 0) -> Catalogue:
    """n non-negative vectors around `clusters` random centres (like pooled CNN features), no cached screening copy."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (clusters, dim)).astype(np.float32)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * spread
    vectors = np.maximum(centres[rng.integers(0, clusters, n)] + noise, 0)
    return Catalogue(np.arange(n), [str(i) for i in range(n)], ["x"] * n, [f"{i:064x}" for i in range(n)],
                     ["0" * 64] * n, vectors)


def both_ways(monkeypatch, catalogue: Catalogue, method: str) -> tuple[Searcher, Searcher]:
    """The searcher through the low-precision screening scan, and the one through float32's."""
    monkeypatch.setattr(searchers, "SCREEN_THRESHOLD", 0)
    fast = searcher(catalogue, method, index="exact")
    monkeypatch.setattr(searchers, "SCREEN_THRESHOLD", len(catalogue) + 1)
    return fast, searcher(catalogue, method, index="exact")


def brute_force(searcher: ExactSearcher, query: np.ndarray, top: int, exclude: np.ndarray | None) -> list:
    """Every row scored exactly (no screening), best first, equal scores by row: the reference."""
    rows = np.arange(len(searcher.catalogue)) if exclude is None else np.flatnonzero(~exclude)
    scores = searcher.rescored(query, rows)
    single = searcher.similarity(query, rows)[0]  # float32 throughout: l2 loses digits to cancellation
    if searcher.method.name == "l2":  # so compare squared distances, to float32's rounding of |q|^2 + |x|^2
        slack = 1e-6 * (np.dot(query, query) + searcher.row_terms[rows])
        assert (np.abs(scores.astype(np.float64) ** 2 - single.astype(np.float64) ** 2) <= slack).all()
    else:
        np.testing.assert_allclose(scores, single, rtol=1e-5, atol=1e-6)
    best = np.lexsort((rows, -scores))[:top]
    return searcher._matches(rows[best], scores[best])


def search_both(pair: tuple[Searcher, Searcher], query: np.ndarray, top: int,
                exclude: np.ndarray | None = None) -> tuple[list, ...]:
    """The same search by both searchers, and by brute force."""
    return *(s.search(query, top, exclude) for s in pair), brute_force(pair[1], query, top, exclude)


def assert_same(*found: list) -> None:
    for matches in found[:-1]:
        assert [m.image_id for m in matches] == [m.image_id for m in found[-1]]
        np.testing.assert_allclose([m.score for m in matches], [m.score for m in found[-1]], rtol=1e-5, atol=1e-6)


def assert_bound_holds(rows: np.ndarray, kernel: str, vectors: list[np.ndarray]) -> None:
    copy = screening_copy(rows, kernel)
    norms = np.linalg.norm(rows, axis=1)
    usual = norms > 1e-6 * norms.max()  # rows not so tiny that the absolute (subnormal) term dominates
    for v in vectors:
        approx, bound = copy.dot(v.astype(np.float32))
        exact = rows.astype(np.float64) @ v.astype(np.float64)
        error = np.abs(approx - exact)
        assert (error <= bound).all()
        assert error.max() > 0  # really approximate, yet the bound is tight enough to screen with:
        assert (bound[usual] <= TIGHTNESS[kernel] * np.linalg.norm(v) * norms[usual] + 1e-9).all()


@pytest.mark.parametrize("kernel_name", SCREENING)
@pytest.mark.parametrize("matrix", ["features", "unit"])
def test_inner_products_stay_within_their_bound_on_real_features(real, matrix, kernel_name):
    rows = ExactSearcher(real, scoring_method({"features": "l2", "unit": "cosine"}[matrix])).matrix
    rng = np.random.default_rng(0)
    assert_bound_holds(rows, kernel_name, [rows[7], rows[200] * 0.3 + rows[9], rng.gamma(1.0, 1.0, rows.shape[1]),
                                           -rows[3] * 1e-3, rng.standard_normal(rows.shape[1]) * 1e4])


@pytest.mark.parametrize("kernel_name", SCREENING)
def test_inner_products_stay_within_their_bound_on_clustered_vectors(kernel_name):
    """Close vectors (the worst case for screening) at 1280 dimensions, and tiny values near bfloat16's and
    float16's normal range."""
    rows = clustered_catalogue(20_000, 1280, clusters=50, spread=0.35).features
    rng = np.random.default_rng(3)
    rows[:100] *= np.float32(1e-30)  # bfloat16 keeps these; their inner products sit far below the others
    assert_bound_holds(rows, kernel_name, [rows[150] + 0.01, rows[17_000], rows[5], rng.gamma(1.0, 1.0, 1280) * 1e-6])


@pytest.mark.parametrize("method", SCANNED)
def test_real_features_rank_the_same_through_the_screening_scan(real, kernel, monkeypatch, method):
    both = both_ways(monkeypatch, real, method)
    for i in range(0, len(real), 7):
        exclude = real.duplicates_of(real.sha256[i], real.dhashes[i])
        assert_same(*search_both(both, real.features[i], 10, exclude))
    mixed = real.features[3] * 0.5 + real.features[400] * 0.5
    for top in (1, 50, len(real)):
        assert_same(*search_both(both, mixed, top))
    assert both[0].copy.kernel.name == kernel


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_clustered_100k_catalogue_ranks_the_same(kernel, monkeypatch, method):
    catalogue = clustered_catalogue(100_000, 128, clusters=1_000, spread=0.35)
    rng = np.random.default_rng(1)
    both = both_ways(monkeypatch, catalogue, method)
    for i in rng.integers(0, len(catalogue), 12):
        exclude = np.arange(len(catalogue)) == i
        assert_same(*search_both(both, catalogue.features[i] + 0.01, 10, exclude))
    assert_same(*search_both(both, rng.gamma(1.0, 1.0, 128).astype(np.float32), 25))


def test_rows_beyond_the_candidates_are_rescored_when_bounds_overlap(kernel, monkeypatch):
    """300 close copies of one vector: their low-precision bounds overlap beyond the 110 candidates (their float32
    distances are still far apart compared with float32 rounding, so the exact order is well defined)."""
    catalogue = clustered_catalogue(100_000, 128, clusters=1_000, spread=0.35)
    rng = np.random.default_rng(2)
    catalogue.features[:300] = catalogue.features[0] + rng.standard_normal((300, 128)).astype(np.float32) * 0.05
    scored = []
    exact = ExactSearcher._exact  # every exact re-scoring goes through it
    monkeypatch.setattr(ExactSearcher, "_exact", lambda self, v, rows: scored.append(len(rows)) or exact(
        self, v, rows))
    assert_same(*search_both(both_ways(monkeypatch, catalogue, "l2"), catalogue.features[0] + 1e-3, 10))
    assert scored[:3] == [110, scored[1], 110] and scored[1] >= 300  # float32 bounds are tight: no second pass


@pytest.mark.parametrize("timings, chosen", [
    ({"fp32": 10.0, "fp16": 20.0, "bf16": 6.0}, "bf16"),  # this CPU: bfloat16 fast, float16 slow
    ({"fp32": 10.0, "fp16": 5.0, "bf16": 6.0}, "fp16"),
    ({"fp32": 10.0, "fp16": 20.0, "bf16": 9.0}, "fp32"),  # too small a gain to pay for the re-scoring
    ({"fp32": 10.0, "fp16": 20.0}, "fp32"),  # bfloat16's bound failed on the probe: never used
    ({"fp32": 10.0, "fp16": 20.0, "bf16": 6.0, "int8": 5.0}, "int8"),  # a quarter of the bytes, fastest here
])
def test_the_fastest_kernel_is_chosen_else_the_plain_float32_scan(fresh_choices, monkeypatch, timings, chosen):
    calls = []
    monkeypatch.setattr(screen, "kernel_timings", lambda: calls.append(1) or timings)
    assert screen.scan_kernel() == chosen
    assert screen.scan_kernel() == chosen and len(calls) == 1  # measured once per process
    machine.forget()
    assert screen.scan_kernel() == chosen and len(calls) == 1  # and once per machine: the cache file
    assert chosen in fresh_choices.read_text()


def test_slow_screening_kernels_leave_the_plain_float32_scan(fresh_choices, monkeypatch):
    monkeypatch.setattr(screen, "kernel_timings", lambda: {"fp32": 1.0, "fp16": 2.0, "bf16": 1.5, "int8": 0.9})
    catalogue = clustered_catalogue(25_000, 64, clusters=100, spread=0.35)
    chosen = searcher(catalogue, "l2")
    found = chosen.search(catalogue.features[3] + 0.01)
    assert chosen.strategy == "exact" and chosen.copy.kernel.name == "fp32" and found[0].image_id == 3


def test_real_measurement_picks_a_kernel_whose_bound_holds_here(fresh_choices):
    timings = screen.kernel_timings()
    assert {"fp32", "fp16", "bf16", "int8"} >= set(timings) >= {"fp32"} and all(t > 0 for t in timings.values())
    assert screen.scan_kernel() in timings


def blas_threads() -> set[int]:
    """numpy's BLAS thread counts (one per loaded BLAS library)."""
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_one_query_runs_numpy_on_one_blas_thread(real, monkeypatch):
    """Idle BLAS threads spin after a multi-threaded product and slow the next forward pass: a search holds numpy's
    BLAS to one thread while it runs, and gives the threads back afterwards."""
    exact = searcher(real, "l2", index="exact")
    seen = []
    best = exact._best
    monkeypatch.setattr(exact, "_best", lambda *args: (seen.append(blas_threads()), best(*args))[1])
    before = blas_threads()
    matches = exact.search(real.features[0], 5)
    assert seen == [{1}] and blas_threads() == before and len(matches) == 5


def test_overlapping_searches_keep_one_blas_thread_until_the_last_leaves():
    """Web-service threads search concurrently: the threads come back only when the last search leaves, even when
    the first one leaves before it."""
    before = blas_threads()
    first, second = machine.one_blas_thread(), machine.one_blas_thread()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert blas_threads() == {1}
    second.__exit__(None, None, None)
    assert blas_threads() == before


def test_scoring_whole_matrices_makes_no_screening_copy(real):
    """Evaluation and neighbours score query matrices; only a search scans, and makes its copy then."""
    exact = searchers.scorer(real, "l2")
    assert exact.similarity(real.features[:3]).shape == (3, len(real)) and "copy" not in vars(exact)
    exact.search(real.features[0], 3)
    assert exact.copy.kernel.name == "fp32"
