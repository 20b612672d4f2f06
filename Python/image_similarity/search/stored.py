"""The catalogue rows of scores and learned kept in a database with vector search, per model version, so that the
database ranks those methods itself (store.nearest); a store without vector search keeps none (it ranks in memory)."""
from __future__ import annotations

from ..store import VECTOR_SEARCH, Store
from ..store.base import STORED_METHODS
from .methods import Method
from .model import SimilarityModel

BATCH = 1000
"""Images whose rows are computed and stored in one transaction."""


def store_method_vectors(store: Store, model: SimilarityModel) -> int:
    """Store the rows of scores and learned under `model` for every image featurized with its backbone that has
    none yet (reading only those images' features); the number of rows stored (0 without vector search)."""
    if VECTOR_SEARCH not in store.capabilities:
        return 0
    images = [image.id for image in store.images()]
    added = 0
    for method in STORED_METHODS:
        stored = store.method_vector_ids(model.version, method)
        missing = [i for i in images if i not in stored]
        for start in range(0, len(missing), BATCH):
            ids, features = store.features(model.backbone, missing[start:start + BATCH])
            if len(ids):
                store.put_method_vectors(model.version, method, ids, Method(method, model).matrix(features))
            added += len(ids)
    return added
