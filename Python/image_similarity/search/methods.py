"""Scoring methods: how each ranking method scores a query against catalogue images, and what it needs. Every
method's similarity is increasing in the inner product of a query vector with a row of one catalogue matrix, so a
scan is one matrix-vector product whatever the method. To add one: a RankingMethod subclass in RANKING_METHODS
(docs/architecture.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import BadInput, NotReady
from .model import SimilarityModel, l2_normalize

TIE_BREAK = 0.01
"""Weight of the cosine similarity in `scores`: it orders images whose class evidence is about equal (within a few
hundredths of probability) by how much they look like the query, and leaves the class evidence first."""


class RankingMethod:
    """One ranking method: what it needs and how it scores, as one catalogue matrix and one query vector per query
    (a small class per method, registered in RANKING_METHODS; `Method` binds one to a model)."""

    name: ClassVar[str]
    needs_model: ClassVar[bool] = True
    """It scores with a trained model on the same features (class scores or the embedding): refused without one,
    and a database ranks it on the rows stored for a model version (store.base.STORED_METHODS), not the features."""
    euclidean: ClassVar[bool] = False
    """Its similarity is minus a Euclidean distance (l2); the others' are inner products."""
    approximate: ClassVar[bool] = False
    """Its matrix is the features or their unit rows: a screening copy or an HNSW graph can stand in for it."""

    def matrix(self, model: SimilarityModel | None, features: np.ndarray) -> np.ndarray:
        """The one catalogue matrix the method scans."""
        raise NotImplementedError

    def vectors(self, model: SimilarityModel | None, queries: np.ndarray) -> np.ndarray:
        """The query vectors whose inner products with the rows of `matrix` give the similarities."""
        return self.matrix(model, queries)

    def row_vectors(self, model: SimilarityModel | None, rows: np.ndarray) -> np.ndarray:
        """The query vectors of catalogue images given their rows of `matrix`: what `vectors` gives for their
        features, made row by row from the stored rows (the same whichever rows are asked together)."""
        return rows

    def row_terms(self, matrix: np.ndarray) -> np.ndarray | None:
        """What `similarities` needs of each row besides its inner products (None: nothing)."""
        return None

    def similarities(self, vectors: np.ndarray, dots: np.ndarray, row_terms: np.ndarray | None) -> np.ndarray:
        """Similarities (higher is more similar) from the inner products `dots` of the query vectors (`vectors`)
        with some rows, given those rows' `row_terms`."""
        return dots


class L2(RankingMethod):
    """Minus the Euclidean distance between features."""

    name, needs_model, euclidean, approximate = "l2", False, True, True

    def matrix(self, model: SimilarityModel | None, features: np.ndarray) -> np.ndarray:
        return features

    def row_terms(self, matrix: np.ndarray) -> np.ndarray:
        """Squared norms."""
        return np.einsum("ij,ij->i", matrix, matrix)

    def similarities(self, vectors: np.ndarray, dots: np.ndarray, row_terms: np.ndarray | None) -> np.ndarray:
        sq = np.einsum("ij,ij->i", vectors, vectors)[:, None] + row_terms - 2 * dots
        return -np.sqrt(np.maximum(sq, 0))


class Cosine(RankingMethod):
    """The cosine of the features: inner products of unit rows."""

    name, needs_model, approximate = "cosine", False, True

    def matrix(self, model: SimilarityModel | None, features: np.ndarray) -> np.ndarray:
        return l2_normalize(features)


class Scores(RankingMethod):
    """The probability that query and image share a class (calibrated class probabilities), plus TIE_BREAK x their
    cosine so that same-class images come in order of visual similarity: class probabilities beside unit rows,
    the query's unit row weighted by TIE_BREAK."""

    name = "scores"

    def matrix(self, model: SimilarityModel | None, features: np.ndarray) -> np.ndarray:
        return np.hstack([model.probabilities(features), l2_normalize(features)])

    def vectors(self, model: SimilarityModel | None, queries: np.ndarray) -> np.ndarray:
        return np.hstack([model.probabilities(queries), TIE_BREAK * l2_normalize(queries)])

    def row_vectors(self, model: SimilarityModel | None, rows: np.ndarray) -> np.ndarray:
        classes = len(model.classes)
        return np.hstack([rows[:, :classes], TIE_BREAK * rows[:, classes:]])


class Learned(RankingMethod):
    """The cosine in the discriminant embedding learned on the training split (no class scores)."""

    name = "learned"

    def matrix(self, model: SimilarityModel | None, features: np.ndarray) -> np.ndarray:
        return l2_normalize(model.embed(features))


RANKING_METHODS: dict[str, RankingMethod] = {kind.name: kind for kind in (L2(), Cosine(), Scores(), Learned())}
"""The ranking methods by name, in the order tables list them."""
METHODS = tuple(RANKING_METHODS)
FEATURE_METHODS = tuple(name for name, kind in RANKING_METHODS.items() if not kind.needs_model)
"""The methods on the features alone: they need no model, and a database with vector search ranks them itself."""


def ranking_method(name: str) -> RankingMethod:
    """The method of that name; a one-line error for an unknown one."""
    if name not in RANKING_METHODS:
        raise BadInput(f"unknown ranking method {name!r}: choose from {', '.join(METHODS)}")
    return RANKING_METHODS[name]


@dataclass(frozen=True)
class Method:
    """One ranking method and the model it was chosen with (None: none trained on these features yet)."""

    name: str
    model: SimilarityModel | None = None

    @property
    def kind(self) -> RankingMethod:
        return RANKING_METHODS[self.name]

    @property
    def needs_model(self) -> bool:
        return self.kind.needs_model

    def matrix(self, features: np.ndarray) -> np.ndarray:
        """The one catalogue matrix the method scans (RankingMethod.matrix)."""
        return self.kind.matrix(self.model, features)

    def vectors(self, queries: np.ndarray) -> np.ndarray:
        """The query vectors whose inner products with the rows of `matrix` give the similarities."""
        return self.kind.vectors(self.model, queries)

    def row_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The query vectors of catalogue images given their rows of `matrix` (RankingMethod.row_vectors)."""
        return self.kind.row_vectors(self.model, rows)

    def row_terms(self, matrix: np.ndarray) -> np.ndarray | None:
        """What `similarities` needs of each row besides its inner products: squared norms for l2, else None."""
        return self.kind.row_terms(matrix)

    def similarities(self, vectors: np.ndarray, dots: np.ndarray, row_terms: np.ndarray | None) -> np.ndarray:
        """Similarities (higher is more similar; l2: minus the distance) from the inner products `dots` of the
        query vectors (`vectors`) with some rows, given those rows' `row_terms`."""
        return self.kind.similarities(vectors, dots, row_terms)


def scoring_method(name: str, model: SimilarityModel | None = None) -> Method:
    """The named method with `model`; a one-line error for an unknown name or a method that needs a model."""
    if ranking_method(name).needs_model and model is None:
        raise NotReady(f"method {name!r} needs a trained model: run 'image-similarity train' first")
    return Method(name, model)
