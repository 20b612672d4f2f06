"""Rank: the catalogue images most similar to a query image by one of the scoring methods (search/methods.py),
never the query itself or its near duplicates; the ranking is stored. The search itself is search/searchers.py's."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from PIL import Image

from ..core.dedup import dhash
from ..core.images import decode_image
from ..errors import BadInput, NotReady
from ..search.methods import METHODS
from ..search.model import SimilarityModel
from ..search.searchers import Match, Searcher, store_searcher
from ..store import Store
from .suggest import suggest, suggest_matches
from .train import load_model


@dataclass
class RankResult:
    """A query's ranking and how it was made."""

    query: str
    method: str
    backbone: str
    model_version: int | None
    matches: list[Match]
    query_id: int | None = None
    suggested: str | None = None
    """The label the model suggests for the query, and its probability (none without a model)."""
    probability: float | None = None

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


def rank(store: Store, data: bytes, featurizer, *, top: int = 10, method: str | None = None,
         model: SimilarityModel | None = None, name: str = "query", save: bool = True,
         index: str = "exact", ef_search: int | None = None) -> RankResult:
    """Rank the store's catalogue against a query image given as bytes, and store the ranking unless not `save`.

    Uses the latest model unless `model` is given, if it was trained on the featurizer's backbone; `method` defaults
    to default_method's. `index` as in search.ann.INDEXES: exact unless asked, as one query never pays for
    building a graph (keep a searcher and use `rank_with` to answer many); `ef_search`: the candidates an HNSW
    search looks at (None: the database's or the in-memory graph's default).
    """
    image = decoded(data, top)
    model = model or latest_model(store)
    if model is not None and model.backbone != featurizer.backbone:
        model = None  # features of another backbone: rank by l2 or cosine alone
    searcher = store_searcher(store, featurizer.backbone, method or default_method(store, model), model, index,
                              ef_search)
    result = ranked(searcher, image, data, featurizer, top, name)
    result.matches = suggest_matches(store, model, result.matches)
    if save:
        result.query_id = store.put_ranking(
            {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "method": result.method,
             "backbone": result.backbone, "model_version": result.model_version},
            [(m.rank, m.image_id, m.score) for m in result.matches],
        )
    return result


def rank_with(searcher: Searcher, data: bytes, featurizer, top: int = 10, name: str = "query") -> RankResult:
    """Rank a searcher's catalogue against a query image given as bytes (a searcher kept to answer many queries:
    the web service, the in-database procedures); stores nothing."""
    image = decoded(data, top)
    model = searcher.method.model
    if model is not None and model.backbone != featurizer.backbone:
        raise BadInput(f"the model uses {model.backbone} features but the featurizer is {featurizer.backbone}")
    return ranked(searcher, image, data, featurizer, top, name)


def decoded(data: bytes, top: int) -> Image.Image:
    """The query image, once `top` is known to be valid."""
    if top < 1:
        raise BadInput(f"--top must be at least 1, got {top}")
    return decode_image(data)


def ranked(searcher: Searcher, image: Image.Image, data: bytes, featurizer, top: int, name: str) -> RankResult:
    """The best `top` matches of the query, never the query itself (its bytes `data`) or its near twins."""
    twins = searcher.catalogue.duplicates_of(hashlib.sha256(data).hexdigest(), dhash(image))
    features = featurizer.features([image])
    matches = searcher.search(features[0], top, twins)
    model = searcher.method.model
    result = RankResult(name, searcher.method.name, featurizer.backbone, model.version if model else None, matches)
    guess = suggest(model, features)
    if guess:
        result.suggested, result.probability = guess[0]
    return result
