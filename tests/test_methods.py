"""The ranking methods' registry: each method declares what it needs, and the store's list of methods ranked on
rows stored per model version agrees with it."""
from __future__ import annotations

import pytest

from image_similarity.errors import BadInput, NotReady
from image_similarity.search.methods import FEATURE_METHODS, METHODS, RANKING_METHODS, ranking_method, scoring_method
from image_similarity.store.base import STORED_METHODS


def test_the_methods_that_need_a_model_are_the_ones_a_database_ranks_on_stored_rows():
    assert METHODS == ("l2", "cosine", "scores", "learned")
    assert [m for m in METHODS if ranking_method(m).needs_model] == list(STORED_METHODS)
    assert FEATURE_METHODS == ("l2", "cosine")
    assert all(kind.name == name for name, kind in RANKING_METHODS.items())


def test_an_unknown_method_or_a_missing_model_is_one_line():
    with pytest.raises(BadInput, match=r"^unknown ranking method 'dot': choose from l2, cosine, scores, learned$"):
        ranking_method("dot")
    with pytest.raises(NotReady, match="^method 'learned' needs a trained model"):
        scoring_method("learned")
    assert scoring_method("cosine").model is None
