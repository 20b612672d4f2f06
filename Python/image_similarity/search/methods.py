"""Scoring methods: how each ranking method scores a query against catalogue images. Every method's similarity is
increasing in the inner product of a query vector with a row of one catalogue matrix, so a scan is one
matrix-vector product whatever the method."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInput, NotReady
from .model import SimilarityModel, l2_normalize

METHODS = ("l2", "cosine", "scores", "learned")
"""l2 and cosine on features (no model needed); scores: the probability that query and image share a class
(calibrated class probabilities), plus TIE_BREAK x their cosine so that same-class images come in order of
visual similarity; learned: cosine in the discriminant embedding learned on the training split (no class scores)."""
TIE_BREAK = 0.01
"""Weight of the cosine similarity in `scores`: it orders images whose class evidence is about equal (within a few
hundredths of probability) by how much they look like the query, and leaves the class evidence first."""
FEATURE_METHODS = ("l2", "cosine")
"""The methods on the features alone: they need no model, and a database with vector search ranks them itself."""


@dataclass(frozen=True)
class Method:
    """One ranking method and the model it was chosen with (None: none trained on these features yet)."""

    name: str
    model: SimilarityModel | None = None

    def matrix(self, features: np.ndarray) -> np.ndarray:
        """The one catalogue matrix the method scans: the features (l2), unit rows (cosine), class probabilities
        beside TIE_BREAK-weighted unit rows on the query side (scores), or unit rows of the embedding (learned)."""
        if self.name == "l2":
            return features
        if self.name == "cosine":
            return l2_normalize(features)
        if self.name == "scores":
            return np.hstack([self.model.probabilities(features), l2_normalize(features)])
        return l2_normalize(self.model.embed(features))

    def vectors(self, queries: np.ndarray) -> np.ndarray:
        """The query vectors whose inner products with the rows of `matrix` give the similarities."""
        if self.name == "l2":
            return queries
        if self.name == "cosine":
            return l2_normalize(queries)
        if self.name == "scores":  # P(same class) + TIE_BREAK * cosine, as one inner product
            return np.hstack([self.model.probabilities(queries), TIE_BREAK * l2_normalize(queries)])
        return l2_normalize(self.model.embed(queries))

    def row_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The query vectors of catalogue images given their rows of `matrix`: what `vectors` gives for their
        features, made row by row from the stored rows (the same whichever rows are asked together)."""
        if self.name != "scores":
            return rows
        classes = len(self.model.classes)
        return np.hstack([rows[:, :classes], TIE_BREAK * rows[:, classes:]])

    def row_terms(self, matrix: np.ndarray) -> np.ndarray | None:
        """What `similarities` needs of each row besides its inner products: squared norms for l2, else None."""
        return np.einsum("ij,ij->i", matrix, matrix) if self.name == "l2" else None

    def similarities(self, vectors: np.ndarray, dots: np.ndarray, row_terms: np.ndarray | None) -> np.ndarray:
        """Similarities (higher is more similar; l2: minus the distance) from the inner products `dots` of the
        query vectors (`vectors`) with some rows, given those rows' `row_terms`."""
        if self.name == "l2":
            sq = np.einsum("ij,ij->i", vectors, vectors)[:, None] + row_terms - 2 * dots
            return -np.sqrt(np.maximum(sq, 0))
        return dots


def scoring_method(name: str, model: SimilarityModel | None = None) -> Method:
    """The named method with `model`; a one-line error for an unknown name or a method that needs a model."""
    if name not in METHODS:
        raise BadInput(f"unknown ranking method {name!r}: choose from {', '.join(METHODS)}")
    if model is None and name not in FEATURE_METHODS:
        raise NotReady(f"method {name!r} needs a trained model: run 'image-similarity train' first")
    return Method(name, model)
