"""Ranking inside PostgreSQL (pgvector) against the engine's in-memory exact search, for every method.

    PYTHONPATH=Python:tests python benchmarks/database_search.py [--source FILE] [--db URL] [--size 100000]
                                                               [--queries 30] [--json]

The catalogue: the bundled 557 photos (their features and model from --source, a SQLite database of a finished
`image-similarity run`; by default the run is made first, in a temporary folder), and --size generated images
(mixes of two random bundled feature vectors plus noise, scored by the same model). Both go into a PostgreSQL
database (--db, an empty database; by default a throwaway server from tests/support/pgserver.py) with their
rows of scores and learned (search/stored.py). For each size and method, over --queries held-out photos (the test split's
features; each left out of its own answer): the median latency of one query by the in-memory exact searcher, the
database's exact scan, and its HNSW index; whether the exact scan gave the in-memory top 10 (scores to 1e-5, the
largest gap printed; the same images up to ties, and in how many queries in the same order); the HNSW index's
recall@10 against the in-memory top 10 (also with hnsw.ef_search at EF_SEARCH) and its size; the bytes one
image's row of scores or learned takes. At the generated size, HNSW indexes are built for scores and learned only
(those of the features take as long again) and their build time is printed; the generated images are loaded
(by the store's writes: binary COPY) with no index in place, and the load rate and each table's bytes per image
are reported. Each method's figures go to stderr as they are measured, so an interrupted run still yields them.
Every figure comes from one run: compare ratios, as the CPU may be shared.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import SimilarityModel, load_model, train
from image_similarity.resources import sample_dataset
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.methods import METHODS, Method
from image_similarity.search.searchers import DatabaseSearcher, searcher
from image_similarity.search.stored import store_method_vectors
from image_similarity.store import SQLiteStore
from image_similarity.store.base import ImageRow
from image_similarity.store.postgres import PostgresStore

BACKBONE = "efficientnet_lite0"
FIRST_GENERATED = 1_000_000  # ids of generated images start here
MAINTENANCE_WORK_MEM = "2GB"
EF_SEARCH = (40, 100, 200, 800)
"""Besides the store's default (postgres.hnsw_candidates: 400 for the top 10), the HNSW searches are measured
looking at this many candidates (40: the default before)."""


def source_db(folder: Path) -> Path:
    """A SQLite database of the whole job on the bundled photos (ingest, featurize, split, train)."""
    path = folder / "bundled.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, sample_dataset(), progress=False)
        featurize(store, Featurizer(BACKBONE, device="cpu"), progress=False)
        split(store, seed=0)
        train(store, BACKBONE)
    return path


def generate(store: PostgresStore, model: SimilarityModel, features: np.ndarray, n: int, seed: int = 0) -> None:
    """`n` generated images with features and rows of scores and learned, in blocks, by the store's own writes
    (binary COPY)."""
    rng = np.random.default_rng(seed)
    spread = features.std(axis=0)
    for start in range(0, n, 5000):
        count = min(5000, n - start)
        ids = np.arange(FIRST_GENERATED + start, FIRST_GENERATED + start + count)
        a, b = rng.integers(0, len(features), (2, count))
        mix = rng.uniform(0.5, 1.0, (count, 1)).astype(np.float32)
        X = (mix * features[a] + (1 - mix) * features[b]
             + 0.1 * spread * rng.standard_normal((count, features.shape[1]))).astype(np.float32)
        store.db.query("INSERT INTO images (id, name, label, format, width, height, mode, size_bytes, sha256, dhash,"
                       " data) SELECT g, 'generated/' || g, 'generated', 'JPEG', 1, 1, 'RGB', 0, 'generated' || g,"
                       " '0000000000000000', ''::bytea FROM generate_series(%s::bigint, %s::bigint) AS g",
                       (int(ids[0]), int(ids[-1])))
        store.put_features(BACKBONE, ids, X)
        for method in ("scores", "learned"):
            store.put_method_vectors(model.version, method, ids, Method(method, model).matrix(X))
    store.db.query("ANALYZE")


def timed(run, queries: np.ndarray, masks: np.ndarray) -> tuple[float, list]:
    """(median seconds per query, the answers): `run` answers one query (top 10, leaving out its mask's rows)."""
    answers, times = [], []
    for q, mask in zip(queries, masks):
        start = time.perf_counter()
        answers.append(run(q, 10, mask))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), answers


def same_top(got: list, want: list, tie: float = 1e-6) -> bool:
    """Whether two top-10 lists agree up to ties: every image of one that scores clearly above the other's 10th
    is in the other (the order of scores equal to float32 precision is the arithmetic's, not the method's)."""
    return all({m.image_id for m in a if m.score > b[-1].score + tie} <= {m.image_id for m in b}
               for a, b in ((got, want), (want, got)))


def measure(store: PostgresStore, model: SimilarityModel, queries: np.ndarray, query_ids: list[int],
            hnsw: tuple[str, ...]) -> dict:
    """Per method: latencies (ms) in memory, by the database's scan and its index; agreement and recall@10. Each
    query is a catalogue image, left out of its own answer (as rank leaves out a query's twins)."""
    ids, X = store.features(BACKBONE)
    catalogue = Catalogue.from_records([ImageRow(int(i), str(i), "", str(i), "0" * 16) for i in ids], X)
    masks = ids[None, :] == np.asarray(query_ids)[:, None]
    del X
    figures: dict[str, Any] = {}
    for method in METHODS:
        scoring = Method(method, model if method in ("scores", "learned") else None)
        memory = searcher(catalogue, method, scoring.model, index="exact")
        memory.search(queries[0], 10, masks[0])  # a warm-up: the screening copy is made on the first search
        memory_s, want = timed(memory.search, queries, masks)
        exact = DatabaseSearcher(store, BACKBONE, scoring, False, catalogue)
        exact_s, got = timed(exact.search, queries, masks)
        gap = max(abs(a.score - b.score) for g, w in zip(got, want) for a, b in zip(g, w))
        row = {"memory_ms": 1e3 * memory_s, "memory_way": memory.strategy, "db_exact_ms": 1e3 * exact_s,
               "db_exact_equals_memory": gap <= 1e-5 and all(map(same_top, got, want)), "max_score_gap": gap,
               "same_order": sum([m.image_id for m in g] == [m.image_id for m in w] for g, w in zip(got, want))}
        if method in hnsw:
            start = time.perf_counter()
            store.create_index(BACKBONE, method, model.version)
            row["hnsw_build_s"] = time.perf_counter() - start
            for ef, suffix in ((None, ""), *((ef, f"_ef{ef}") for ef in EF_SEARCH)):
                index = DatabaseSearcher(store, BACKBONE, scoring, True, catalogue, ef_search=ef)
                hnsw_s, approx = timed(index.search, queries, masks)
                hits = sum(len({m.image_id for m in a} & {m.image_id for m in w}) for a, w in zip(approx, want))
                row |= {f"db_hnsw_ms{suffix}": 1e3 * hnsw_s, f"recall@10{suffix}": hits / (10 * len(queries))}
            row["hnsw_MB"] = store.db.query("SELECT pg_relation_size(%s::regclass)", (
                store._index_name(BACKBONE, method, model.version),))[0][0] / 2 ** 20
        if method in ("scores", "learned"):  # what one image's row takes in the table (TOAST included)
            row["row_bytes"] = float(store.db.query(
                "SELECT AVG(pg_column_size(embedding)) FROM method_vectors WHERE model_version = %s AND method = %s",
                (model.version, method))[0][0])
        figures[method] = row
        print(f"{len(ids)} images, {method}: {json.dumps(row)}", file=sys.stderr, flush=True)  # a partial result
    return figures


def space(store: PostgresStore, images: int) -> dict[str, float]:
    """Bytes per image of the features table and of method_vectors (both methods' rows), TOAST included, and of
    method_vectors' primary key; HNSW indexes are measured on their own."""
    features, rows, key = store.db.query("SELECT pg_table_size('features'), pg_table_size('method_vectors'),"
                                         " pg_relation_size('method_vectors_pkey')")[0]
    return {"features": features / images, "method_vectors": rows / images, "method_vectors_pkey": key / images}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="SQLite database of a finished run on the bundled photos")
    parser.add_argument("--db", help="an empty PostgreSQL database (default: a throwaway server)")
    parser.add_argument("--size", type=int, default=100_000, help="generated catalogue size (0: bundled only)")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        source = args.source or source_db(Path(folder))
        server = None
        if args.db is None:
            from support import pgserver  # tests/ on PYTHONPATH, as the usage line says

            server = pgserver.admin_url()
            url = pgserver.create_database(next(server), "database_search")
        else:
            url = args.db
        try:
            results = run(source, url, args.size, args.queries)
        finally:
            if server is not None:
                server.close()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for size, figures in results["sizes"].items():
            print(f"{size} images (writing scores + learned rows of the bundled catalogue: "
                  f"{results['write_s']:.2f} s)" if size == str(results["bundled"]) else
                  f"{size} images (generated ones loaded at {results['load_images_per_s']:.0f} a second)")
            print("  bytes per image: " + " ".join(f"{k}={v:.0f}" for k, v in results["bytes_per_image"][size].items()))
            for method, row in figures.items():
                print(f"  {method:8s} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items()))
    return 0


def run(source: Path, url: str, size: int, n_queries: int) -> dict:
    """Copy the bundled catalogue and model into PostgreSQL, measure, add `size` generated images, measure."""
    with SQLiteStore(source) as src, PostgresStore(url) as store:
        # HNSW builds in memory while the graph fits in maintenance_work_mem, much more slowly on disk beyond it
        # (100k rows of scores: about 1 GB); this connection's setting only, the connection is autocommit
        store.db.query("SELECT set_config('maintenance_work_mem', %s, false)", (MAINTENANCE_WORK_MEM,))
        ids, X = src.features(BACKBONE)
        rows = {image.id: image for image in src.images()}
        for image_id in ids:
            image = rows[int(image_id)]
            store.db.query("INSERT INTO images (id, name, label, format, width, height, mode, size_bytes, sha256,"
                           " dhash, data) VALUES (%s, %s, %s, 'JPEG', 1, 1, 'RGB', 0, %s, %s, ''::bytea)",
                           (int(image_id), image.name, image.label, image.sha256, image.dhash))
        store.put_features(BACKBONE, ids, X)
        store.put_model(src.model())
        model = load_model(store)
        start = time.perf_counter()
        store_method_vectors(store, model)
        write_s = time.perf_counter() - start
        test = [i for i, s in src.split().items() if s == "test"][:n_queries]
        queries = src.features(BACKBONE, test)[1]
        results = {"bundled": len(ids), "write_s": write_s, "queries": len(queries), "sizes": {}}
        results["sizes"][str(len(ids))] = measure(store, model, queries, test, METHODS)
        results["bytes_per_image"] = {str(len(ids)): space(store, len(ids))}
        if size:
            for method in METHODS:  # the bundled size's indexes would answer for the larger catalogue, and every
                # row COPY writes would go into each of them (about 30 images a second instead of thousands)
                store.db.script(f"DROP INDEX IF EXISTS {store._index_name(BACKBONE, method, model.version)}")
            start = time.perf_counter()
            generate(store, model, X, size)
            results["generate_s"] = time.perf_counter() - start
            results["load_images_per_s"] = size / results["generate_s"]
            print(f"{size} generated images loaded in {results['generate_s']:.1f} s", file=sys.stderr, flush=True)
            results["sizes"][str(len(ids) + size)] = measure(store, model, queries, test, ("scores", "learned"))
            results["bytes_per_image"][str(len(ids) + size)] = space(store, len(ids) + size)
    return results


if __name__ == "__main__":
    sys.exit(main())
