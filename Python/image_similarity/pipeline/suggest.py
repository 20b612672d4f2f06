"""Suggested labels (issue 29): for an unlabelled image, or a query, the class the latest model finds likeliest
and its calibrated probability, computed on demand from the stored features (never stored: a new model changes
them)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..search.catalogue import Catalogue
from ..search.model import SimilarityModel
from ..search.searchers import Match
from ..store import Store


@dataclass(frozen=True)
class Suggestion:
    """An unlabelled image and the label the model suggests for it."""

    id: int
    name: str
    key: str | None
    suggested: str
    probability: float
    metadata: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def suggest(model: SimilarityModel | None, X: np.ndarray) -> list[tuple[str, float]]:
    """(likeliest class, its probability) per row of features; none without a model with probabilities."""
    if model is None or model.temperature is None or len(X) == 0:
        return []
    probabilities = model.probabilities(np.asarray(X, dtype=np.float32))
    best = probabilities.argmax(axis=1)
    return [(model.classes[b], float(p[b])) for b, p in zip(best, probabilities)]


def suggestions(store: Store, model: SimilarityModel, ids: Sequence[int] | None = None) -> list[Suggestion]:
    """The suggestions for the unlabelled images featurized with the model's backbone (only `ids` when given),
    by id."""
    wanted = None if ids is None else set(ids)
    rows = {im.id: im for im in store.images() if im.label is None and (wanted is None or im.id in wanted)}
    found, X = store.features(model.backbone, sorted(rows))
    return [Suggestion(int(i), rows[int(i)].name, rows[int(i)].key, label, p, rows[int(i)].metadata)
            for i, (label, p) in zip(found, suggest(model, X))]


def catalogue_suggestions(catalogue: Catalogue, model: SimilarityModel | None) -> dict[int, tuple[str, float]]:
    """image id -> (suggested label, probability) of the catalogue's unlabelled rows (it holds their features)."""
    rows = [k for k, label in enumerate(catalogue.labels) if label is None]
    if not rows or catalogue.features is None:
        return {}
    return {int(catalogue.ids[k]): guess for k, guess in zip(rows, suggest(model, catalogue.features[rows]))}


def with_suggestions(matches: list[Match], found: dict[int, tuple[str, float]]) -> list[Match]:
    """The matches, those in `found` (image id -> (label, probability)) with the suggestion."""
    return [replace(m, suggested=found[m.image_id][0], probability=found[m.image_id][1])
            if m.label is None and m.image_id in found else m for m in matches]


def suggest_matches(store: Store, model: SimilarityModel | None, matches: list[Match]) -> list[Match]:
    """The matches, the unlabelled ones with the model's suggested label and probability (their features read now,
    and nothing else)."""
    wanted = [m.image_id for m in matches if m.label is None]
    if model is None or not wanted:
        return matches
    found, X = store.features(model.backbone, wanted)
    return with_suggestions(matches, {int(i): guess for i, guess in zip(found, suggest(model, X))})
