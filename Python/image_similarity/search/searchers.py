"""Searchers: the best matches of a query among catalogue images by one scoring method, in one way chosen once when
the searcher is made (`strategy`): an exact float32 scan, an exact scan screened through a low-precision copy, an HNSW
graph, or the database's own vector search (any method whose vectors the database keeps). Each holds only what its
way needs (one method's matrix, its screening copy or graph); the in-memory ones also score whole query matrices
(`similarity`) for evaluation and neighbours."""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from ..core.machine import one_blas_thread
from ..errors import BadInput, NotReady, Unavailable
from ..store import Store
from ..store.base import VECTOR_SEARCH
from . import ann, screen
from .ann import ANN_THRESHOLD, INDEXES
from .catalogue import Catalogue
from .methods import METHODS, Method, ranking_method, scoring_method
from .model import SimilarityModel
from .screen import BLOCK, FP32, Float32Rows, HalfMatrix, Int8Matrix, scan_kernel, screening_copy

SCREEN_THRESHOLD = 20_000
"""Exact l2 and cosine search over at least this many images scans a screening copy of the matrix (float16,
bfloat16 or int8: a half or a quarter of the bytes; whichever screen.scan_kernel measured fastest here, if any beats
the float32 scan) instead of the float32 matrix itself; either way it then re-scores exactly only the rows whose
error-bounded score can still reach the top."""
SCREENED_METHODS = tuple(name for name in METHODS if ranking_method(name).approximate)
"""The methods that scan a feature-sized matrix; scores and learned scan a few columns per image (classes + features
with a small weight, and classes - 1), always in float32."""
CANDIDATES = 100  # at least this many rows (and 10 x top) re-scored exactly after the screening scan


@dataclass(frozen=True)
class Match:
    """One ranked catalogue image. `score` is higher for more similar images (for l2: minus the distance)."""

    rank: int
    image_id: int
    name: str
    label: str | None
    """None: unlabelled."""
    score: float
    key: str | None = None
    """The item's key and metadata (issue 29)."""
    metadata: dict | None = None
    suggested: str | None = None
    """For an unlabelled image: the label the model suggests, and its probability (pipeline/suggest.py)."""
    probability: float | None = None


def best_positions(scores: np.ndarray, top: int) -> np.ndarray:
    """Positions of the `top` highest finite scores (fewer if there are fewer), best first."""
    top = min(top, int(np.isfinite(scores).sum()))
    best = np.argpartition(-scores, top - 1)[:top] if top else np.array([], dtype=int)
    return best[np.argsort(-scores[best], kind="stable")]


class Searcher(ABC):
    """Searches `catalogue` by `method`; `strategy` names the way."""

    strategy: ClassVar[str]

    def __init__(self, catalogue: Catalogue, scoring: Method) -> None:
        self.catalogue, self.method = catalogue, scoring

    @abstractmethod
    def search(self, query: np.ndarray, top: int = 10, exclude: np.ndarray | None = None) -> list[Match]:
        """The `top` most similar catalogue images to one query vector, never the rows where `exclude` (a mask
        over the catalogue's rows) is True."""

    def _matches(self, rows, scores) -> list[Match]:
        c = self.catalogue
        return [Match(r + 1, int(c.ids[i]), c.names[i], None if c.labels[i] is None else str(c.labels[i]), float(s),
                      c.keys[i], c.metadata[i]) for r, (i, s) in enumerate(zip(rows, scores))]


class ExactSearcher(Searcher):
    """The exact answer over the method's one catalogue matrix, in memory, through a screening scan: bound every
    row's score by one mat-vec, score exactly the rows with the highest bounds, then any other row whose bound
    reaches the worst of the exact best. The scan is torch's float32 mat-vec over the matrix itself ("exact"),
    or over a float16, bfloat16 or int8 copy ("screened", see SCREEN_THRESHOLD). Exact scores come from float64
    inner products rounded to float32, the same for a row whichever rows are scored with it: equal scores tie
    exactly and go to the earlier row. The catalogue's own rows as queries (`best_of_rows`, for neighbours) are
    bounded by one float32 matrix product instead of a scan per query, and re-scored the same way."""

    def __init__(self, catalogue: Catalogue, scoring: Method, kernel: str = "fp32") -> None:
        super().__init__(catalogue, scoring)
        self.matrix = scoring.matrix(catalogue.features)
        self.row_terms = scoring.row_terms(self.matrix)
        self.kernel = kernel

    @property
    def strategy(self) -> str:
        return "exact" if self.kernel == "fp32" else "screened"

    @cached_property
    def copy(self) -> Float32Rows | HalfMatrix | Int8Matrix:
        """What `search` scans, made on the first search (scoring whole matrices never needs it)."""
        return self.float32_rows if self.kernel == FP32.name else screening_copy(self.matrix, self.kernel)

    @cached_property
    def float32_rows(self) -> Float32Rows:
        """The matrix itself with the error bound of its float32 inner products."""
        return Float32Rows(self.matrix)

    def similarity(self, queries: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(n_queries, n_catalogue) float32 similarities, or (n_queries, len(rows)) for those rows; higher is more
        similar. For many queries at once (evaluation)."""
        vectors = self.method.vectors(np.atleast_2d(queries).astype(np.float32))
        pick = slice(None) if rows is None else rows
        terms = None if self.row_terms is None else self.row_terms[pick]
        return self.method.similarities(vectors, vectors @ self.matrix[pick].T, terms)

    def rescored(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Similarities of one query to these rows, from float64 inner products, rounded to float32."""
        return self._exact(self._vector(query), rows)

    def _vector(self, query: np.ndarray) -> np.ndarray:
        """One query's vector (Method.vectors)."""
        return self.method.vectors(np.atleast_2d(query).astype(np.float32))[0]

    def _exact(self, vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Similarities of one query vector to these rows, from float64 inner products, rounded to float32: the
        same for a row whichever rows are scored with it."""
        wide = vector.astype(np.float64)
        dots = np.zeros(len(rows))
        for start in range(0, len(rows), BLOCK):
            dots[start:start + BLOCK] = self.matrix[rows[start:start + BLOCK]].astype(np.float64) @ wide
        terms = None if self.row_terms is None else self.row_terms[rows]
        return self.method.similarities(vector[None], dots[None], terms)[0].astype(np.float32)

    def search(self, query: np.ndarray, top: int = 10, exclude: np.ndarray | None = None) -> list[Match]:
        with one_blas_thread():
            return self._matches(*self._best(query, top, exclude))

    def _best(self, query: np.ndarray, top: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the best `top`: every row bounded by one scan of the screening copy."""
        vector = self._vector(query)
        dots, error = self.copy.dot(vector)
        return self._best_bounded(vector, dots + error, top, exclude)

    def best_of_rows(self, positions: np.ndarray, top: int, exclude: np.ndarray) -> list[tuple[np.ndarray,
                                                                                            np.ndarray]]:
        """For the catalogue's own rows at `positions` as queries (neighbours): each one's best `top` (rows, exact
        scores), never where its row of `exclude` is True. Bounded by one float32 matrix product, then re-scored
        as `search` re-scores: each answer is the same whichever rows are asked together."""
        vectors = self.method.row_vectors(self.matrix[positions])
        products = vectors @ self.matrix.T
        best = []
        for vector, dots, excluded in zip(vectors, products, exclude):
            dots += self.float32_rows.largest_error(vector)  # in place: one pass over the row
            best.append(self._best_bounded(vector, dots, top, excluded))
        return best

    def _best_bounded(self, vector: np.ndarray, upper: np.ndarray, top: int,
                      exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and exact scores of one query vector's best `top`, given an upper bound on every row's inner
        product with it (`upper`): score exactly the rows with the highest bounds, then any other row whose bound
        reaches the worst of the exact best. Equal scores go to the earlier row."""
        # every method's similarity grows with the inner product: the interval's upper end bounds it
        bounds = self.method.similarities(vector[None], upper[None], self.row_terms)[0]
        if exclude is not None:
            bounds[exclude] = -np.inf
        top = min(top, int(np.isfinite(bounds).sum()))
        if not top:
            return np.array([], dtype=int), np.array([], dtype=np.float32)
        wanted = top + max(10 * top, CANDIDATES)
        if wanted < len(bounds):
            rows, left_out = highest(bounds, wanted)  # left_out: the best bound left out
        else:
            rows, left_out = np.arange(len(bounds)), -np.inf
        rows = rows[np.isfinite(bounds[rows])]
        scores = self._exact(vector, rows)
        worst = scores[best_positions(scores, top)[-1]]
        if left_out >= worst:  # rare: rows left out could still beat the worst of the best `top`
            rows = np.flatnonzero(bounds >= worst)
            scores = self._exact(vector, rows)
        best = np.lexsort((rows, -scores))[:top]
        return rows[best], scores[best]


def highest(values: np.ndarray, wanted: int) -> tuple[np.ndarray, float]:
    """Positions of `wanted` highest `values` (fewer than all), in any order, and the highest value left out: by
    torch's top-k where torch is installed (0.2 ms over 100k values), else numpy's argpartition (1 ms)."""
    torch = screen.torch
    if torch is None:
        order = np.argpartition(-values, wanted)
        return order[:wanted], float(values[order[wanted]])
    top, order = torch.topk(torch.from_numpy(values), wanted + 1, sorted=False)
    last = int(torch.argmin(top))
    return np.delete(order.numpy(), last), float(top[last])


class GraphSearcher(ExactSearcher):
    """(About) the best l2/cosine matches from an HNSW graph over the method's matrix (faiss), looking at
    `ef_search` candidates (None: ann.EF_SEARCH); scores are the exact distances or cosines. Excluded rows are
    filtered from a deeper candidate list."""

    strategy = "hnsw"

    def __init__(self, catalogue: Catalogue, scoring: Method, ef_search: int | None = None) -> None:
        super().__init__(catalogue, scoring)
        self.graph = ann.HNSWIndex(self.matrix, inner_product=not scoring.kind.euclidean,
                                   ef_search=ef_search or ann.EF_SEARCH)

    def _best(self, query: np.ndarray, top: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        query = self.method.vectors(np.atleast_2d(query).astype(np.float32))
        skipped = int(exclude.sum()) if exclude is not None else 0
        rows, values = self.graph.search(query, min(top + skipped, len(self.catalogue)))
        if exclude is not None:
            kept = ~exclude[rows]
            rows, values = rows[kept], values[kept]
        scores = -np.sqrt(np.maximum(values, 0)) if self.method.kind.euclidean else values
        return rows[:top], scores[:top]


class DatabaseSearcher(Searcher):
    """Any method ranked by the store's database (VECTOR_SEARCH): the vectors stay there (the features for l2 and
    cosine, the model version's rows for scores and learned); the catalogue holds the stored images' rows, to
    leave out a query's twins and name the matches (matches the database has and the catalogue lacks, images
    featurized since it was read, are left out). `approximate` and `ef_search` as in Store.nearest."""

    strategy = "database"

    def __init__(self, store: Store, backbone: str, scoring: Method, approximate: bool | None,
                 catalogue: Catalogue | None = None, lock: AbstractContextManager | None = None,
                 ef_search: int | None = None) -> None:
        super().__init__(catalogue if catalogue is not None else Catalogue.from_records(store.images()), scoring)
        self.store, self.backbone, self.approximate, self.ef_search = store, backbone, approximate, ef_search
        self.lock = lock or nullcontext()
        """Held while the store's connection is used (one connection shared by threads: the web service)."""
        self.positions = {int(i): k for k, i in enumerate(self.catalogue.ids)}
        self.version = model_version(scoring)

    def search(self, query: np.ndarray, top: int = 10, exclude: np.ndarray | None = None) -> list[Match]:
        excluded = [] if exclude is None else self.catalogue.ids[exclude].tolist()
        query = np.asarray(query, dtype=np.float32)
        vector = self.method.vectors(query[None])[0] if self.method.needs_model else query  # l2, cosine: the features
        with self.lock:
            found = self.store.nearest(self.backbone, vector, self.method.name, top, excluded, self.approximate,
                                       self.version, self.ef_search)
            if not found and not self.store.feature_counts().get(self.backbone):
                raise NotReady(f"empty catalogue: no images featurized with {self.backbone!r}; run featurize first")
        found = [(i, score) for i, score in found if i in self.positions]
        return self._matches([self.positions[i] for i, _ in found], [score for _, score in found])


def strategy(method: str, index: str = "auto", size: int = 0, in_database: bool = False) -> str:
    """The way a searcher answers a method, chosen here only: "database" when the store ranks the method's
    vectors itself (`in_database`, told before any image row is read); else, over `size` images in memory, "hnsw"
    as `index` (one of INDEXES) says, "screened" for l2/cosine from SCREEN_THRESHOLD images when this machine
    has a screening kernel faster than float32, or "exact"."""
    if index not in INDEXES:
        raise BadInput(f"unknown index {index!r}: choose from {', '.join(INDEXES)}")
    if in_database:
        return "database"
    if index == "hnsw" and not ann.available():
        raise Unavailable(ann.MISSING)
    large = size >= ANN_THRESHOLD and ann.available()
    approximate = ranking_method(method).approximate
    if approximate and (index == "hnsw" or (index == "auto" and large)):
        return "hnsw"
    if approximate and size >= SCREEN_THRESHOLD and scan_kernel() != "fp32":
        return "screened"
    return "exact"


def searcher(catalogue: Catalogue, method: str, model: SimilarityModel | None = None,
             index: str = "auto", ef_search: int | None = None) -> ExactSearcher:
    """A searcher of `method` over a catalogue in memory, in the way `strategy` chooses for its size (`ef_search`:
    the candidates an HNSW graph search looks at)."""
    scoring = scoring_method(method, model)
    chosen = strategy(method, index, len(catalogue))
    if chosen == "screened":
        return ExactSearcher(catalogue, scoring, scan_kernel())
    return GraphSearcher(catalogue, scoring, ef_search) if chosen == "hnsw" else ExactSearcher(catalogue, scoring)


def scorer(catalogue: Catalogue, method: str, model: SimilarityModel | None = None) -> ExactSearcher:
    """An exact searcher to score whole matrices of queries (evaluation, neighbours) with `similarity`: only the
    method's matrix, never a screening copy or a graph."""
    return ExactSearcher(catalogue, scoring_method(method, model))


def model_version(scoring: Method) -> int:
    """The model version whose stored rows a method ranks in a database: 0 for l2 and cosine (the features)."""
    return scoring.model.version or 0 if scoring.needs_model else 0


def in_database(store: Store, backbone: str, scoring: Method) -> bool:
    """Whether the store's database ranks this method over the backbone's images itself (VECTOR_SEARCH, and the
    vectors it needs are all stored: for scores and learned, the model version's rows)."""
    return VECTOR_SEARCH in store.capabilities and store.searchable(backbone, scoring.name, model_version(scoring))


def store_searcher(store: Store, backbone: str, method: str, model: SimilarityModel | None = None,
                   index: str = "auto", ef_search: int | None = None) -> Searcher:
    """A searcher of `method` over a store's images featurized with `backbone`: in the database when it ranks the
    method itself (the database's index as `index` says), else over the catalogue read into memory; an HNSW search
    looks at `ef_search` candidates (None: the database's or ann's default)."""
    scoring = scoring_method(method, model)
    if strategy(method, index, in_database=in_database(store, backbone, scoring)) == "database":
        approximate = {"exact": False, "hnsw": True}.get(index)
        return DatabaseSearcher(store, backbone, scoring, approximate, ef_search=ef_search)
    return searcher(Catalogue.from_store(store, backbone), method, model, index, ef_search)
