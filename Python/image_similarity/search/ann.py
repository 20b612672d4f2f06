"""Approximate nearest neighbours for large catalogues: an HNSW graph index (faiss), an optional extra."""
from __future__ import annotations

import numpy as np

from ..errors import Unavailable

MISSING = "approximate search needs faiss: pip install 'image-similarity[ann]' (faiss-cpu)"
EF_SEARCH = 128
"""Candidates a graph search looks at unless told."""
INDEXES = ("auto", "exact", "hnsw")
"""exact: score every image; hnsw: approximate l2/cosine search on a graph index (needs faiss; in a database with
vector search, its index, for any method); auto: hnsw for catalogues in memory of at least ANN_THRESHOLD images when
faiss is installed, in a database its index when it has one, else exact (searchers.py)."""
ANN_THRESHOLD = 200_000


def available() -> bool:
    """Whether faiss can be imported."""
    try:
        import faiss  # noqa: F401  # lazy: faiss, an optional dependency (the ann extra)
    except ImportError:
        return False
    return True


class HNSWIndex:
    """An HNSW graph over float32 rows, searched by L2 distance or by inner product (cosine on unit rows)."""

    def __init__(self, vectors: np.ndarray, inner_product: bool = False, links: int = 32,
                 ef_construction: int = 80, ef_search: int = EF_SEARCH) -> None:
        try:
            import faiss  # lazy: faiss, an optional dependency (the ann extra)
        except ImportError as exc:
            raise Unavailable(MISSING) from exc
        metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], links, metric)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.index.hnsw.efSearch = ef_search

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers of the (about) k nearest rows, nearest first, and their squared L2 distances or inner
        products; fewer than k when the graph finds fewer."""
        values, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k)
        found = rows[0] >= 0
        return rows[0][found], values[0][found]
