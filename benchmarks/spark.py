"""Benchmark of the Spark compute context (issue 17): featurize on Spark vs the local step, and neighbors of a
synthetic clustered catalogue locally (time, memory bound, peak RSS) and on Spark (time, equality).

Both contexts run in the same process one after the other, so their ratio shares the machine's noise. Spark's
start-up is left out (the session, and each executor's Python worker importing the engine: paid once per worker);
each executor's network load is counted, as the local one is.

    PYTHONPATH=Python python benchmarks/spark.py [--images 557] [--vectors 100000] [--master local[2]] [--json]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import clustered, photo_store  # noqa: E402

from image_similarity.contexts import spark  # noqa: E402
from image_similarity.core.dedup import HASH_SIZE  # noqa: E402
from image_similarity.pipeline.featurize import Featurizer, featurize  # noqa: E402
from image_similarity.pipeline.neighbors import BYTES_PER_PAIR, DEFAULT_MEMORY, block_rows, neighbors  # noqa: E402
from image_similarity.store import SQLiteStore  # noqa: E402

BACKBONE, DIM, K = "efficientnet_lite0", 1280, 10


def warm_up(session) -> None:
    """Start the executors' Python workers and import the engine in them: Spark's start-up, as this process's own
    imports are not part of the local figure."""
    sc = session.sparkContext
    sc.parallelize(range(sc.defaultParallelism), sc.defaultParallelism).foreach(
        lambda _: __import__("image_similarity.pipeline.featurize"))


def featurize_figures(session, n: int, workdir: Path) -> dict:
    """Images/s of the local featurize step and of the same step on Spark, network loads included."""
    with photo_store(workdir / "local.sqlite", n):
        pass
    shutil.copy(workdir / "local.sqlite", workdir / "spark.sqlite")
    warm_up(session)
    start = time.perf_counter()
    with SQLiteStore(workdir / "local.sqlite") as store:
        local = Featurizer(BACKBONE, device="cpu")
        featurize(store, local, progress=False)
    local_s = time.perf_counter() - start
    start = time.perf_counter()  # the executors compute as the local step did (the same runtime and precision)
    spark.featurize_on_spark(session, str(workdir / "spark.sqlite"), BACKBONE, device="cpu", progress=False,
                             precision=local.precision, runtime=local.runtime)
    spark_s = time.perf_counter() - start
    with SQLiteStore(workdir / "local.sqlite") as a, SQLiteStore(workdir / "spark.sqlite") as b:
        diff = float(np.abs(a.features(BACKBONE)[1] - b.features(BACKBONE)[1]).max())
    return {"images": n, "local_ips": n / local_s, "spark_ips": n / spark_s, "ratio": local_s / spark_s,
            "max_abs_diff": diff}


def vector_store(path: Path, n: int) -> None:
    """A store of n synthetic images (a few bytes each, random dHashes) with clustered features of DIM."""
    rng = np.random.default_rng(1)
    with SQLiteStore(path) as store, store.conn:
        store.conn.executemany(
            "INSERT INTO images (id, name, label, format, width, height, mode, size_bytes, sha256, dhash, data,"
            " added_at) VALUES (?, ?, 'x', 'PNG', 1, 1, 'RGB', 1, ?, ?, x'00', '')",
            [(i + 1, f"img{i}", f"{i:064x}", rng.integers(0, 256, HASH_SIZE ** 2 // 8, dtype=np.uint8).tobytes().hex())
             for i in range(n)])
    vectors = clustered(n, DIM)
    with SQLiteStore(path) as store:
        for start in range(0, n, 20_000):
            store.put_features(BACKBONE, np.arange(start, min(start + 20_000, n)) + 1, vectors[start:start + 20_000])


def _local_neighbors(path: str) -> tuple[float, float]:
    """In a fresh process: the local neighbors step; (seconds, peak RSS MiB)."""
    start = time.perf_counter()
    with SQLiteStore(path) as store:
        neighbors(store, BACKBONE, "cosine", K, progress=False)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def neighbors_figures(session, n: int, workdir: Path) -> dict:
    """Local and Spark neighbors of n clustered vectors: times, the stated memory bound, peak RSS, equality."""
    vector_store(workdir / "vectors.sqlite", n)
    shutil.copy(workdir / "vectors.sqlite", workdir / "vectors-spark.sqlite")
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        local_s, peak = pool.submit(_local_neighbors, str(workdir / "vectors.sqlite")).result()
    start = time.perf_counter()
    spark.neighbors_on_spark(session, str(workdir / "vectors-spark.sqlite"), BACKBONE, "cosine", K, progress=False)
    spark_s = time.perf_counter() - start
    sql = "SELECT image_id, rank, neighbor_id, score FROM neighbors ORDER BY image_id, rank"
    with SQLiteStore(workdir / "vectors.sqlite") as a, SQLiteStore(workdir / "vectors-spark.sqlite") as b:
        left, right = a.conn.execute(sql).fetchall(), b.conn.execute(sql).fetchall()
    same_ids = [r[:3] for r in left] == [r[:3] for r in right]
    score_diff = max(abs(x[3] - y[3]) for x, y in zip(left, right)) if same_ids else float("nan")
    catalogue_mib = n * (2 * DIM * 4 + HASH_SIZE ** 2 * 4) / 2 ** 20  # features, unit rows, hash signs
    rows = block_rows(n)
    return {"vectors": n, "dim": DIM, "k": K, "local_s": local_s, "spark_s": spark_s, "ratio": local_s / spark_s,
            "block_rows": rows, "bound_mib": catalogue_mib + rows * n * BYTES_PER_PAIR / 2 ** 20,
            "block_mib": DEFAULT_MEMORY / 2 ** 20, "peak_rss_mib": peak, "rows": len(left), "equal_ids": same_ids,
            "max_score_diff": score_diff}


def on_paper(result: dict, images: int = 10_000_000, cores: int = 16, machines: tuple[int, ...] = (1, 10, 100)) -> dict:
    """Hours for `images` on N machines of `cores` cores, scaled from this run's per-core Spark rates (the all-pairs
    work of neighbors grows with the square of the catalogue), and the catalogue each neighbors executor holds."""
    f, n = result["featurize"], result["neighbors"]
    here = 2  # cores of the machine measured
    pair_flops = 2 * (n["dim"] + HASH_SIZE ** 2)  # one score and one hash distance per pair
    flops_per_core = pair_flops * n["vectors"] ** 2 / n["spark_s"] / here
    return {"images": images, "cores": cores,
            "featurize_h": {m: images / (f["spark_ips"] / here * cores * m) / 3600 for m in machines},
            "neighbors_h": {m: pair_flops * images ** 2 / (flops_per_core * cores * m) / 3600 for m in machines},
            "catalogue_gib": images * (2 * n["dim"] * 4 + HASH_SIZE ** 2 * 4) / 2 ** 30,
            "gflops_per_core": flops_per_core / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=557, help="photos to featurize (default: 557, all bundled)")
    parser.add_argument("--vectors", type=int, default=100_000, help="catalogue size for neighbors (default: 100000)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default: local[2])")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="a Spark setting, as spark-submit takes it (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    session = spark.session(args.master, {"spark.ui.enabled": "false", **spark.parse_conf(args.conf)})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"master": args.master, "conf": args.conf, "featurize": featurize_figures(session, args.images, Path(tmp)),
                      "neighbors": neighbors_figures(session, args.vectors, Path(tmp))}
    finally:
        session.stop()
    result["paper"] = on_paper(result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    f, n = result["featurize"], result["neighbors"]
    print(f"featurize {f['images']} photos: local {f['local_ips']:.1f} img/s, Spark {args.master} "
          f"{f['spark_ips']:.1f} img/s = {f['ratio']:.2f}x local (max |diff| {f['max_abs_diff']:.1e})")
    print(f"neighbors {n['vectors']:,} x {n['dim']} clustered, top {n['k']} cosine: local {n['local_s']:.1f} s "
          f"(bound {n['bound_mib']:.0f} MiB = catalogue + {n['block_rows']} rows/block; peak RSS "
          f"{n['peak_rss_mib']:.0f} MiB), Spark {args.master} {n['spark_s']:.1f} s = {n['ratio']:.2f}x local; "
          f"{n['rows']:,} rows, equal ids {n['equal_ids']}, max score diff {n['max_score_diff']:.1e}")
    paper = result["paper"]
    print(f"on paper, {paper['images']:,} images on N machines of {paper['cores']} cores (this run's per-core Spark "
          f"rates; neighbors at {paper['gflops_per_core']:.1f} GFLOP/s per core, catalogue "
          f"{paper['catalogue_gib']:.0f} GiB per executor):")
    for m in paper["featurize_h"]:
        print(f"  N = {m:>3}: featurize {paper['featurize_h'][m]:8.1f} h, neighbors {paper['neighbors_h'][m]:10.1f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
