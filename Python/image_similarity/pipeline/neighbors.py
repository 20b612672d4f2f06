"""Neighbors: the top k most similar catalogue images of every catalogue image, stored for one-query reads.

The same methods and the same exclusion of an image's own near duplicates as `rank`, computed exactly in blocks
of query rows: each block bounds its rows' scores against the whole catalogue by one float32 matrix product,
re-scores each row's candidates in float64 as `rank` does (so a table is the same, bit for bit, whatever the block
size, resume point or compute context), keeps each row's best k, and is stored in one transaction. Memory is bounded by the catalogue held in memory (its features and the method's
matrix: search.searchers.scorer) plus one block of scores (`BYTES_PER_PAIR` bytes per query row and catalogue
image, at most `memory` bytes). Images whose neighbours are already stored are skipped, so an interrupted run
resumes and a re-run adds nothing.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..core.dedup import NEAR_DUPLICATE_DISTANCE, hash_signs, sign_distances
from ..errors import BadInput, NotReady
from ..search.catalogue import Catalogue
from ..search.methods import ranking_method
from ..search.model import SimilarityModel
from ..search.searchers import ExactSearcher, scorer
from ..store import Store
from .rank import latest_model

DEFAULT_K = 10
DEFAULT_MEMORY = 512 * 2 ** 20
"""Bytes for one block's scores and duplicate masks (the catalogue itself comes on top)."""
BYTES_PER_PAIR = 24
"""Per query row and catalogue image: float32 scores and their temporaries, float32 and int32 hash distances."""


@dataclass
class NeighborsReport:
    """What a neighbors run did."""

    backbone: str
    method: str
    model_version: int
    k: int
    images: int
    added: int = 0
    already_stored: int = 0
    block_rows: int = 0


class Twins:
    """An image's own near duplicates (identical bytes or dHash within NEAR_DUPLICATE_DISTANCE), as `rank`
    excludes them, for many query rows at once: the catalogue's hashes as +-1 rows, made once."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.signs = hash_signs(catalogue.dhashes)
        self.sha_codes = np.unique(catalogue.sha256, return_inverse=True)[1]

    def of(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), n) mask: True where a catalogue image is a query row's duplicate or near duplicate."""
        near = sign_distances(self.signs[positions], self.signs) <= NEAR_DUPLICATE_DISTANCE
        return near | (self.sha_codes[positions][:, None] == self.sha_codes[None, :])


def block_rows(n: int, memory: int = DEFAULT_MEMORY) -> int:
    """Query rows per block so that one block's scores take at most `memory` bytes."""
    return max(1, memory // (max(n, 1) * BYTES_PER_PAIR))


def neighbor_rows(searcher: ExactSearcher, twins: Twins, positions: np.ndarray,
                  k: int) -> list[tuple[int, int, int, float]]:
    """(image id, rank, neighbour id, score) of the best k of each catalogue row in `positions`: rank's exact
    search (float64 re-scoring, ties to the earlier row), so the rows do not depend on which rows share a block."""
    ids = searcher.catalogue.ids
    rows = []
    for query, (best, scores) in zip(ids[positions], searcher.best_of_rows(positions, k, twins.of(positions))):
        rows += [(int(query), r + 1, int(ids[b]), float(s)) for r, (b, s) in enumerate(zip(best, scores))]
    return rows


def block_ranges(n: int, rows: int) -> list[tuple[int, int]]:
    """(start, end) catalogue positions of each block of `rows` query rows."""
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def block_neighbors(searcher: ExactSearcher, ranges: Sequence[tuple[int, int]], k: int,
                    done: set[int]) -> Iterator[list[tuple[int, int, int, float]]]:
    """For each block, the (image id, rank, neighbour id, score) rows of its images not in `done` (maybe none)."""
    catalogue = searcher.catalogue
    twins = Twins(catalogue)
    stored = np.fromiter(done, dtype=np.int64, count=len(done))
    for start, end in ranges:
        positions = np.arange(start, end)
        positions = positions[~np.isin(catalogue.ids[positions], stored)]
        yield neighbor_rows(searcher, twins, positions, k) if len(positions) else []


def store_blocks(store: Store, backbone: str, searcher: ExactSearcher, ranges: Sequence[tuple[int, int]], k: int,
                 model_version: int, done: set[int], bar: tqdm | None = None) -> int:
    """Compute and store the neighbours of each block's images not in `done`, one transaction per block;
    returns the images stored. Rows stored meanwhile by another task are kept (the insert skips them)."""
    added = 0
    for rows in block_neighbors(searcher, ranges, k, done):
        if rows:
            store.put_neighbors(backbone, searcher.method.name, model_version, rows)
        images = len({r[0] for r in rows})
        added += images
        if bar is not None:
            bar.update(images)
    return added


def check(store: Store, backbone: str, method: str, k: int,
          model: SimilarityModel | None) -> tuple[SimilarityModel | None, int]:
    """The model the method uses (None for l2 and cosine) and the version its rows are stored under."""
    kind = ranking_method(method)
    if k < 1:
        raise BadInput(f"--top must be at least 1, got {k}")
    if not kind.needs_model:
        return None, 0
    if model is None or model.backbone != backbone:
        raise NotReady(f"method {method!r} needs a model trained on {backbone}: run 'image-similarity train' first")
    return model, model.version


def neighbors(store: Store, backbone: str, method: str = "cosine", k: int = DEFAULT_K,
              model: SimilarityModel | None = None, memory: int = DEFAULT_MEMORY, refresh: bool = False,
              progress: bool = True) -> NeighborsReport:
    """Store the top k neighbours of every featurized image for a backbone and method (model: the latest).

    `refresh` first removes this backbone's and method's stored neighbours (after the catalogue changed).
    """
    model, version = check(store, backbone, method, k, model or latest_model(store))
    catalogue = Catalogue.from_store(store, backbone)
    exact = scorer(catalogue, method, model)
    if refresh:
        store.delete_neighbors(backbone, method, version)
    done = store.neighbor_ids(backbone, method, version)
    rows = block_rows(len(catalogue), memory)
    report = NeighborsReport(backbone, method, version, k, len(catalogue), block_rows=rows,
                             already_stored=int(np.isin(catalogue.ids, list(done)).sum()))
    with tqdm(total=len(catalogue) - report.already_stored, desc=f"neighbors ({method}, top {k})", unit="img",
              disable=not progress) as bar:
        report.added = store_blocks(store, backbone, exact, block_ranges(len(catalogue), rows), k, version, done, bar)
    return report
