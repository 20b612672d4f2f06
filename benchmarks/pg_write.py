"""Write rate of PostgreSQL's vector rows: the store's writes (binary COPY) against one INSERT a row.

Usage: PYTHONPATH=Python:tests python benchmarks/pg_write.py [--rows 20000] [--rounds 2] [--db URL] [--json]

Writes --rows random float32 rows of the size of scores over EfficientNet-Lite0 features with 3 classes (1587
values) into method_vectors, and as many features (1584), in blocks of search.stored.BATCH rows, each block one
transaction as train and featurize write them: by the store's `put_method_vectors` / `put_features` (binary COPY
through a temporary table), and by what they did before, one INSERT a row with the vector bound as a float8 array
(for the features still SQLStore.put_features). The ways alternate in rounds on emptied tables, so a shared CPU
weighs on each alike; the rows per second of every round are printed. Needs --db (an empty database) or a
throwaway server from tests/support/pgserver.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from image_similarity.search.stored import BATCH
from image_similarity.store.postgres import PostgresStore
from image_similarity.store.sql import SQLStore

DIM, CLASSES, VERSION = 1584, 3, 1


def insert_rows(store: PostgresStore, method: str, ids: np.ndarray, rows: np.ndarray) -> None:
    """The method rows' write before the binary COPY: one INSERT a row, the vector bound as a float8 array."""
    with store.db.transaction():
        store.db.query_many("INSERT INTO method_vectors (model_version, method, image_id, embedding)"
                            " VALUES (%s, %s, %s, %s::float8[]::vector) ON CONFLICT DO NOTHING",
                            [(VERSION, method, int(i), r.tolist()) for i, r in zip(ids, rows)])


WAYS = {
    "method_vectors": {"insert": insert_rows,
                       "copy": lambda store, method, ids, rows: store.put_method_vectors(VERSION, method, ids, rows)},
    "features": {"insert": lambda store, backbone, ids, rows: SQLStore.put_features(store, backbone, ids, rows),
                 "copy": lambda store, backbone, ids, rows: store.put_features(backbone, ids, rows)},
}
"""Per table, each way to write a block of rows: (store, method or backbone, ids, rows)."""


def prepare(store: PostgresStore, n: int) -> None:
    """`n` images and a model version for the rows to refer to."""
    store.db.query("INSERT INTO images (id, name, label, format, width, height, mode, size_bytes, sha256, dhash, data)"
                   " SELECT g, 'generated/' || g, 'generated', 'JPEG', 1, 1, 'RGB', 0, 'generated' || g,"
                   " '0000000000000000', ''::bytea FROM generate_series(1, %s::bigint) AS g", (n,))
    store.db.query("INSERT INTO models (version, backbone, classes, params) VALUES (%s, 'efficientnet_lite0',"
                   " '[]', '{}')", (VERSION,))


def measure(store: PostgresStore, n: int, rounds: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Rows per second of each way, per table, round by round."""
    rng = np.random.default_rng(seed)
    data = {"method_vectors": ("scores", rng.standard_normal((n, CLASSES + DIM)).astype(np.float32)),
            "features": ("efficientnet_lite0", rng.standard_normal((n, DIM)).astype(np.float32))}
    ids = np.arange(1, n + 1)
    rates: dict[str, dict[str, list[float]]] = {table: {way: [] for way in ways} for table, ways in WAYS.items()}
    for _ in range(rounds):
        for table, ways in WAYS.items():
            key, rows = data[table]
            for way, write in ways.items():
                store.db.script("TRUNCATE method_vectors, feature_precisions, features")
                start = time.perf_counter()
                for block in range(0, n, BATCH):
                    write(store, key, ids[block:block + BATCH], rows[block:block + BATCH])
                rates[table][way].append(n / (time.perf_counter() - start))
                print(f"{table} {way}: {rates[table][way][-1]:.0f} rows/s", file=sys.stderr, flush=True)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--db", help="an empty PostgreSQL database (default: a throwaway server)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    server = None
    if args.db is None:
        from support import pgserver  # tests/ on PYTHONPATH, as the usage line says

        server = pgserver.admin_url()
        url = pgserver.create_database(next(server), "pg_write", routines=False)
    else:
        url = args.db
    try:
        with PostgresStore(url) as store:
            prepare(store, args.rows)
            rates = measure(store, args.rows, args.rounds)
    finally:
        if server is not None:
            server.close()
    if args.json:
        print(json.dumps(rates, indent=1))
    else:
        for table, ways in rates.items():
            for way, values in ways.items():
                print(f"{table:15s} {way:7s} " + " ".join(f"{v:8.0f}" for v in values) + " rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
