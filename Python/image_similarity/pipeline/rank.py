"""Rank: the catalogue images most similar to a query image, by one of several similarity methods."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from ..core.dedup import NEAR_DUPLICATE_DISTANCE, dhash, hamming_to, packed_hashes
from ..core.images import decode_image
from ..errors import BadInput, NotReady, Unavailable
from ..search import ann
from ..search.halfscan import HalfMatrix, scan_kernel
from ..store import Store
from ..store.base import VECTOR_SEARCH
from .train import SimilarityModel, l2_normalize, load_model

METHODS = ("l2", "cosine", "scores", "learned")
"""l2 and cosine on features (no model needed); scores: the probability that query and image share a class
(calibrated class probabilities), plus TIE_BREAK x their cosine so that same-class images come in order of
visual similarity; learned: cosine in the discriminant embedding learned on the training split (no class scores)."""
TIE_BREAK = 0.01
"""Weight of the cosine similarity in `scores`: it orders images whose class evidence is about equal (within a few
hundredths of probability) by how much they look like the query, and leaves the class evidence first."""

INDEXES = ("auto", "exact", "hnsw")
"""exact: score every image; hnsw: approximate l2/cosine search on a graph index (needs faiss);
auto: hnsw for catalogues of at least ANN_THRESHOLD images when faiss is installed, else exact."""
ANN_THRESHOLD = 200_000
HALF_SCAN_THRESHOLD = 20_000
"""Exact l2 and cosine search over at least this many images first scans a 16-bit copy of the matrix (half the
bytes; float16 or bfloat16, whichever halfscan.scan_kernel measured fastest here, if either beats the plain float32
scan), then re-scores in float32 only the rows whose error-bounded score can still reach the top."""
HALF_SCANNED = ("l2", "cosine")
"""The methods that scan a feature-sized matrix; scores and learned scan a few columns per image (classes + features
with a small weight, and classes - 1), always in float32."""
CANDIDATES = 100  # at least this many rows (and 10 x top) re-scored exactly after the 16-bit scan


@dataclass(frozen=True)
class Match:
    """One ranked catalogue image. `score` is higher for more similar images (for l2: minus the distance)."""

    rank: int
    image_id: int
    name: str
    label: str
    score: float


class Catalogue:
    """Featurized catalogue images held in memory, with what each method needs precomputed.

    `index` (one of INDEXES) chooses exact or approximate search for l2 and cosine; the HNSW graph of a
    method is built on its first approximate search.
    """

    def __init__(self, ids: np.ndarray, names: list[str], labels: list[str], sha256: list[str],
                 dhashes: list[str], features: np.ndarray, model: SimilarityModel | None = None,
                 index: str = "auto") -> None:
        if index not in INDEXES:
            raise BadInput(f"unknown index {index!r}: choose from {', '.join(INDEXES)}")
        if index == "hnsw" and not ann.available():
            raise Unavailable(ann.MISSING)
        self.ids, self.names, self.labels = ids, names, np.asarray(labels)
        self.sha256, self.dhashes = np.asarray(sha256), list(dhashes)
        self.packed_dhashes = packed_hashes(self.dhashes)
        self.index = index
        self.graphs: dict[str, ann.HNSWIndex] = {}
        self.halves: dict[str, HalfMatrix] = {}
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.sq_norms = np.einsum("ij,ij->i", self.features, self.features)
        self.unit = l2_normalize(self.features)
        self.model = model
        if model is not None and model.temperature is not None:  # older models lack what scores and learned need
            self.evidence = np.hstack([model.probabilities(self.features), self.unit])
        if model is not None and model.embedding is not None:
            self.embedded = l2_normalize(model.embed(self.features))

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_store(cls, store: Store, backbone: str, model: SimilarityModel | None = None,
                   ids: list[int] | None = None, index: str = "auto") -> Catalogue:
        """The featurized images of a store (all of them, or only `ids`)."""
        rows = {im.id: im for im in store.images()}
        found, X = store.features(backbone, ids)
        if len(found) == 0:
            raise NotReady(f"empty catalogue: no images featurized with {backbone!r}; run featurize first")
        meta = [rows[int(i)] for i in found]
        return cls(found, [m.name for m in meta], [m.label for m in meta], [m.sha256 for m in meta],
                   [m.dhash for m in meta], X, model, index)

    def similarity(self, queries: np.ndarray, method: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n_queries, n_catalogue) similarities, or (n_queries, len(rows)) for those rows; higher is more similar."""
        queries = np.atleast_2d(queries).astype(np.float32)
        vectors, matrix = self._query_vectors(queries, method)
        pick = slice(None) if rows is None else rows
        return self._from_dots(queries, method, vectors @ getattr(self, matrix)[pick].T, pick)

    def _query_vectors(self, queries: np.ndarray, method: str) -> tuple[np.ndarray, str]:
        """The vectors whose inner products with the rows of the named matrix give the method's similarities."""
        if method == "l2":
            return queries, "features"
        if method == "cosine":
            return l2_normalize(queries), "unit"
        if method not in METHODS:
            raise BadInput(f"unknown ranking method {method!r}: choose from {', '.join(METHODS)}")
        if self.model is None:
            raise NotReady(f"method {method!r} needs a trained model: run 'image-similarity train' first")
        if method == "scores":  # P(same class) + TIE_BREAK * cosine, as one inner product
            return np.hstack([self.model.probabilities(queries), TIE_BREAK * l2_normalize(queries)]), "evidence"
        return l2_normalize(self.model.embed(queries)), "embedded"

    def _from_dots(self, queries: np.ndarray, method: str, dots: np.ndarray, pick) -> np.ndarray:
        """Similarities of the rows `pick` from their inner products with the query vectors (monotone in them)."""
        if method == "l2":
            sq = np.einsum("ij,ij->i", queries, queries)[:, None] + self.sq_norms[pick] - 2 * dots
            return -np.sqrt(np.maximum(sq, 0))
        return dots

    def half(self, matrix: str) -> HalfMatrix:
        """The 16-bit copy of `features` or `unit` in this machine's scan kernel, made on first use."""
        if matrix not in self.halves:
            self.halves[matrix] = HalfMatrix(getattr(self, matrix), scan_kernel())
        return self.halves[matrix]

    def score_bounds(self, query: np.ndarray, method: str) -> np.ndarray:
        """An upper bound on every row's similarity to one query, from the 16-bit copy (HALF_SCANNED methods)."""
        queries = np.atleast_2d(query).astype(np.float32)
        vectors, matrix = self._query_vectors(queries, method)
        dots, error = self.half(matrix).dot(vectors[0])
        # similarities are monotone in the inner product: the larger end of the interval bounds them
        every = slice(None)
        return np.maximum(self._from_dots(queries, method, (dots + error)[None], every),
                          self._from_dots(queries, method, (dots - error)[None], every))[0]

    def duplicates_of(self, sha256: str, query_dhash: str, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> np.ndarray:
        """Mask of catalogue images that are the query itself or a near duplicate of it."""
        return (self.sha256 == sha256) | (hamming_to(query_dhash, self.packed_dhashes) <= max_distance)

    def approximate(self, method: str) -> bool:
        """Whether `search` answers this method from an HNSW graph rather than exactly."""
        if method not in ("l2", "cosine") or self.index == "exact":
            return False
        return self.index == "hnsw" or (len(self) >= ANN_THRESHOLD and ann.available())

    def graph(self, method: str) -> ann.HNSWIndex:
        """The HNSW graph for l2 (on the features) or cosine (inner product on unit rows), built once."""
        if method not in self.graphs:
            vectors = self.unit if method == "cosine" else self.features
            self.graphs[method] = ann.HNSWIndex(vectors, inner_product=method == "cosine")
        return self.graphs[method]

    def search(self, query: np.ndarray, method: str, top: int = 10, exclude: np.ndarray | None = None) -> list[Match]:
        """The `top` most similar catalogue images to one query vector."""
        best, scores = (self._nearest if self.approximate(method) else self._exact)(query, method, top, exclude)
        return [Match(r + 1, int(self.ids[i]), self.names[i], str(self.labels[i]), float(s))
                for r, (i, s) in enumerate(zip(best, scores))]

    def _exact(self, query: np.ndarray, method: str, top: int,
               exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the best `top`, by scoring every row (large catalogues: see HALF_SCAN_THRESHOLD)."""
        if method in HALF_SCANNED and len(self) >= HALF_SCAN_THRESHOLD and scan_kernel() != "fp32":
            return self._screened(query, method, top, exclude)
        scores = self.similarity(query, method)[0]
        if exclude is not None:
            scores[exclude] = -np.inf
        best = _best(scores, top)
        return best, scores[best]

    def _screened(self, query: np.ndarray, method: str, top: int,
                  exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The exact best `top`: bound every row's score from the 16-bit copy, score exactly the rows with the
        highest bounds, then any other row whose bound reaches the worst of the exact best `top`."""
        bounds = self.score_bounds(query, method)
        if exclude is not None:
            bounds[exclude] = -np.inf
        top = min(top, int(np.isfinite(bounds).sum()))
        if not top:
            return np.array([], dtype=int), np.array([], dtype=np.float32)
        wanted = top + max(10 * top, CANDIDATES)
        if wanted < len(bounds):
            order = np.argpartition(-bounds, wanted)
            rows, left_out = order[:wanted], bounds[order[wanted]]  # left_out: the best bound left out
        else:
            rows, left_out = np.arange(len(bounds)), -np.inf
        rows = rows[np.isfinite(bounds[rows])]
        scores = self.similarity(query, method, rows)[0]
        worst = scores[_best(scores, top)[-1]]
        if left_out >= worst:  # rare: rows left out could still beat the worst of the best `top`
            rows = np.flatnonzero(bounds >= worst)
            scores = self.similarity(query, method, rows)[0]
        best = _best(scores, top)
        return rows[best], scores[best]

    def _nearest(self, query: np.ndarray, method: str, top: int,
                 exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of (about) the best `top` l2/cosine matches, from the HNSW graph."""
        query = np.atleast_2d(query).astype(np.float32)
        if method == "cosine":
            query = l2_normalize(query)
        skipped = int(exclude.sum()) if exclude is not None else 0
        rows, values = self.graph(method).search(query, min(top + skipped, len(self)))
        if exclude is not None:
            kept = ~exclude[rows]
            rows, values = rows[kept], values[kept]
        scores = -np.sqrt(np.maximum(values, 0)) if method == "l2" else values
        return rows[:top], scores[:top]


def _best(scores: np.ndarray, top: int) -> np.ndarray:
    """Positions of the `top` highest finite scores (fewer if there are fewer), best first."""
    top = min(top, int(np.isfinite(scores).sum()))
    best = np.argpartition(-scores, top - 1)[:top] if top else np.array([], dtype=int)
    return best[np.argsort(-scores[best], kind="stable")]


def database_search(store: Store, backbone: str, vector: np.ndarray, method: str, top: int, sha256: str,
                    query_dhash: str, index: str = "exact") -> list[Match] | None:
    """l2/cosine matches ranked by the store's database (pgvector), without the query and its near twins;
    None when the store has no VECTOR_SEARCH. `index` as in INDEXES (auto: the database's index if any)."""
    if index not in INDEXES:
        raise BadInput(f"unknown index {index!r}: choose from {', '.join(INDEXES)}")
    if VECTOR_SEARCH not in store.capabilities:
        return None
    rows = store.images()
    near = hamming_to(query_dhash, packed_hashes([r.dhash for r in rows])) <= NEAR_DUPLICATE_DISTANCE
    exclude = [r.id for r, twin in zip(rows, near) if twin or r.sha256 == sha256]
    found = store.nearest(backbone, vector, method, top, exclude, {"exact": False, "hnsw": True}.get(index))
    if not found and not store.feature_counts().get(backbone):
        raise NotReady(f"empty catalogue: no images featurized with {backbone!r}; run featurize first")
    meta = {r.id: r for r in rows}
    return [Match(k + 1, i, meta[i].name, meta[i].label, score) for k, (i, score) in enumerate(found)]


@dataclass
class RankResult:
    """A query's ranking and how it was made."""

    query: str
    method: str
    backbone: str
    model_version: int | None
    matches: list[Match]
    query_id: int | None = None

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "matches"},
                "matches": [asdict(m) for m in self.matches]}


def latest_model(store: Store) -> SimilarityModel | None:
    """The latest trained model, or None when there is none yet."""
    try:
        return load_model(store)
    except NotReady:
        return None


def default_method(store: Store, model: SimilarityModel | None) -> str:
    """The method the latest evaluation of the model found best (on the original protocol); else scores with a
    model, cosine without."""
    if model is None:
        return "cosine"
    evaluation = store.evaluation(model.version)
    if evaluation and evaluation.summary.get("best_method") in METHODS:
        return evaluation.summary["best_method"]
    return "scores"


def rank(store: Store, data: bytes, featurizer, top: int = 10, method: str | None = None,
         model: SimilarityModel | None = None, catalogue: Catalogue | None = None, name: str = "query",
         save: bool = True, index: str = "exact") -> RankResult:
    """Rank the catalogue against a query image given as bytes; never returns the query or its near twins.

    Uses the latest model unless `model` is given, if it was trained on the featurizer's backbone. Pass a prebuilt
    `catalogue` to answer many queries quickly (large ones then use the HNSW index: see INDEXES); without one,
    `index` chooses how the loaded catalogue is searched.
    """
    if top < 1:
        raise BadInput(f"--top must be at least 1, got {top}")
    image = decode_image(data)
    if catalogue is None:
        model = model or latest_model(store)
        if model is not None and model.backbone != featurizer.backbone:
            model = None  # features of another backbone: rank by l2 or cosine alone
    else:
        model = catalogue.model
    if model is not None and model.backbone != featurizer.backbone:
        raise BadInput(f"the model uses {model.backbone} features but the featurizer is {featurizer.backbone}")
    method = method or default_method(store, model)
    if method not in METHODS:
        raise BadInput(f"unknown ranking method {method!r}: choose from {', '.join(METHODS)}")
    vector = featurizer.features([image])[0]
    sha = hashlib.sha256(data).hexdigest()
    matches = None
    if catalogue is None and method in ("l2", "cosine"):
        matches = database_search(store, featurizer.backbone, vector, method, top, sha, dhash(image), index)
    if matches is None:
        # exact by default: for one query an HNSW graph costs far more to build than one exact scan saves
        catalogue = catalogue or Catalogue.from_store(store, featurizer.backbone, model, index=index)
        matches = catalogue.search(vector, method, top, catalogue.duplicates_of(sha, dhash(image)))
    result = RankResult(name, method, featurizer.backbone, model.version if model else None, matches)
    if save:
        result.query_id = store.put_ranking(
            {"name": name, "sha256": sha, "method": method, "backbone": featurizer.backbone,
             "model_version": result.model_version},
            [(m.rank, m.image_id, m.score) for m in matches],
        )
    return result
