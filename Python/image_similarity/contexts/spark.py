"""The `spark` compute context: featurize and neighbors spread over an Apache Spark cluster (or `local[*]`).

A third place that runs the same step functions as the local and sql contexts. The driver splits the work:
featurize into ranges of image ids, neighbors into blocks of catalogue rows. Each task opens the store
itself (the `--db` URL; its driver, and the package, must be installed on the executors), runs
`featurize.featurize` on its id range or `neighbors.store_blocks` on its blocks, and commits batch by batch with
inserts that keep rows already stored: a retried or speculative task never duplicates or loses a row, and a
killed job resumes like a local run. Networks and catalogues are loaded once per executor Python process.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..errors import BadInput, NotReady, Unavailable
from ..pipeline.featurize import Featurizer, FeaturizeReport, featurize
from ..pipeline.neighbors import (
    DEFAULT_K,
    DEFAULT_MEMORY,
    NeighborsReport,
    block_ranges,
    block_rows,
    check,
    store_blocks,
)
from ..pipeline.rank import latest_model
from ..pipeline.steps import BATCH_SIZE
from ..pipeline.train import load_model
from ..search.catalogue import Catalogue
from ..search.searchers import ExactSearcher, scorer
from ..store import Store, StoreError, connect
from .spark_settings import DEFAULT_MASTER

MISSING = "--context spark needs PySpark and Java 17: pip install 'image-similarity[spark]'"
FAULT_ENV = "IMAGE_SIMILARITY_SPARK_FAULT"
"""For tests of retries: a task's first attempt kills its Python worker after storing this many batches."""

TASK_BATCHES = 4

FEATURIZERS: dict[tuple, Featurizer] = {}
"""Networks loaded in this executor process, kept for the tasks that follow."""
CATALOGUES: dict[str, tuple[ExactSearcher, set[int]]] = {}
"""The catalogue's exact searcher and already-stored image ids of the current neighbors job in this executor process."""


def parse_conf(pairs: Iterable[str]) -> dict[str, str]:
    """Spark settings from `--conf key=value` options."""
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--conf takes KEY=VALUE, got {pair!r}")
        conf[key.strip()] = value
    return conf


def check_store(db: str, master: str) -> None:
    """A one-line error for a store the executors cannot reach: a SQLite file with a remote master."""
    if not master.startswith("local") and not db.startswith(("postgresql://", "postgres://", "mssql://")):
        raise StoreError(f"a SQLite file cannot be shared with the executors of {master}: use --db postgresql://... "
                         "or mssql://..., or --master local[*]")


def session(master: str = DEFAULT_MASTER, conf: dict[str, str] | None = None) -> Any:
    """A SparkSession on `master` with `conf`; local masters run executors on this Python."""
    try:
        from pyspark.sql import SparkSession  # lazy: pyspark, an optional dependency (the spark extra)
    except ImportError:
        raise Unavailable(MISSING) from None
    if master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName("image-similarity")
    for key, value in {"spark.ui.showConsoleProgress": "false", **(conf or {})}.items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except Exception as err:  # py4j/Java start-up failures: no Java, bad master URL
        raise Unavailable(f"cannot start Spark on {master}: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """The cause of a Spark failure on one line: the last Python or Java exception line in its message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (causes or lines or [type(err).__name__])[-1][:300]


def run_job(rdd: Any, total: int, done: Callable[[], int], desc: str, progress: bool) -> list:
    """Collect an RDD while the driver shows progress from `done()` (polled from the store each second)."""
    outcome: dict[str, Any] = {}

    def collect() -> None:
        try:
            outcome["rows"] = rdd.collect()
        except Exception as err:  # noqa: BLE001 - reported below, on the driver's thread
            outcome["error"] = err

    worker = threading.Thread(target=collect, daemon=True)
    worker.start()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        while worker.is_alive():
            worker.join(1.0)
            if progress:
                bar.update(min(done(), total) - bar.n)
    if "error" in outcome:
        raise Unavailable(f"Spark job failed: {one_line(outcome['error'])}")
    return outcome["rows"]


def id_ranges(ids: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Sorted ids cut into at most `parts` (first id, last id) ranges of about equal counts."""
    chunks = [c for c in np.array_split(np.sort(ids), max(1, min(parts, len(ids)))) if len(c)]
    return [(int(c[0]), int(c[-1])) for c in chunks]


class _CrashAfter:
    """A store whose put_features kills the Python worker after `batches` calls (FAULT_ENV, tests only)."""

    def __init__(self, store: Store, batches: int) -> None:
        self.store, self.left = store, batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def put_features(self, *args: Any) -> None:
        self.store.put_features(*args)
        self.left -= 1
        if self.left == 0:
            os._exit(1)


def _task_store(store: Store) -> Store:
    """The store as a task uses it: wrapped by the fault of FAULT_ENV on a first attempt."""
    from pyspark import TaskContext  # lazy: pyspark, an optional dependency (the spark extra)

    batches = int(os.environ.get(FAULT_ENV) or 0)
    return _CrashAfter(store, batches) if batches and TaskContext.get().attemptNumber() == 0 else store


def _featurizer(backbone: str, device: str | None, weights: str | None, precision: str, runtime: str) -> Featurizer:
    """This executor process's network, loaded by its first task; torch (and ONNX Runtime) get the task's cores."""
    from pyspark import TaskContext  # lazy: pyspark, an optional dependency (the spark extra)

    cpus = max(1, int(TaskContext.get().cpus()))
    torch.set_num_threads(cpus)
    key = (backbone, device, weights, precision, runtime)
    if key not in FEATURIZERS:
        FEATURIZERS[key] = Featurizer(backbone, device=device, weights=weights, workers=cpus, precision=precision,
                                      runtime=runtime)
    return FEATURIZERS[key]


def _featurize_task(db: str, backbone: str, device: str | None, weights: str | None, precision: str, runtime: str,
                    batch_size: int, ranges: Iterator[tuple[int, int]],
                    ) -> Iterator[tuple[int, list[tuple[int, str]], str, str, str, str]]:
    """Executor: featurize the images of each id range with the local step; (added, skipped, device, precision,
    runtime, network hash)."""
    featurizer = _featurizer(backbone, device, weights, precision, runtime)
    with connect(db) as store:
        task_store = _task_store(store)
        for first, last in ranges:
            report = featurize(task_store, featurizer, batch_size=batch_size, progress=False, id_range=(first, last))
            yield report.added, report.skipped, report.device, report.precision, report.runtime, report.network_hash


def featurize_on_spark(spark: Any, db: str, backbone: str, device: str | None = None, weights: str | None = None,
                       batch_size: int = BATCH_SIZE, progress: bool = True, precision: str = "auto",
                       runtime: str = "auto") -> FeaturizeReport:
    """Featurize every stored image without features, spread over the executors by id ranges; each executor
    resolves `precision` and `runtime` on its own hardware and task cores, as a local run does (both are stored per
    vector)."""
    with connect(db) as store:
        ids = np.array([im.id for im in store.images()], dtype=np.int64)
        before = store.feature_counts().get(backbone, 0)
        # tasks of at least TASK_BATCHES batches (decoding overlaps the network within a task), 4 per core at most,
        # in whole waves of one task per core: a last task alone would leave the other cores idle
        cores = spark.sparkContext.defaultParallelism
        waves = min(-(-len(ids) // (TASK_BATCHES * batch_size * cores)), 4)
        tasks = min(waves * cores, -(-len(ids) // batch_size))
        ranges = id_ranges(ids, tasks)
        rdd = spark.sparkContext.parallelize(ranges, max(1, len(ranges))).mapPartitions(
            lambda part: _featurize_task(db, backbone, device, weights, precision, runtime, batch_size, part))
        results = run_job(rdd, len(ids) - before, lambda: store.feature_counts().get(backbone, 0) - before,
                          f"featurize on Spark ({backbone})", progress)
    report = FeaturizeReport(backbone, *(results[0][2:] if results else (str(device or "cpu"), precision, runtime)))
    for added, skipped, *_ in results:
        report.added += added
        report.skipped += skipped
    return report


def _neighbors_task(db: str, job: str, backbone: str, method: str, k: int, version: int,
                    ranges: Iterator[tuple[int, int]]) -> Iterator[int]:
    """Executor: store the neighbours of each block with the local step; the catalogue is loaded once per job."""
    from pyspark import TaskContext  # lazy: pyspark, an optional dependency (the spark extra)

    with connect(db) as store, threadpool_limits(max(1, int(TaskContext.get().cpus()))):  # BLAS: the task's cores
        if job not in CATALOGUES:
            CATALOGUES.clear()
            model = load_model(store, version) if version else None
            CATALOGUES[job] = (scorer(Catalogue.from_store(store, backbone), method, model),
                               store.neighbor_ids(backbone, method, version))
        exact, done = CATALOGUES[job]
        yield store_blocks(store, backbone, exact, list(ranges), k, version, done)


def neighbors_on_spark(spark: Any, db: str, backbone: str, method: str = "cosine", k: int = DEFAULT_K,
                       model_version: int | None = None, memory: int = DEFAULT_MEMORY, refresh: bool = False,
                       progress: bool = True) -> NeighborsReport:
    """The local `neighbors` step with its blocks spread over the executors: the same blocks, the same table."""
    with connect(db) as store:
        model = load_model(store, model_version) if model_version else latest_model(store)
        _, version = check(store, backbone, method, k, model)
        n = store.feature_counts().get(backbone, 0)
        if not n:
            raise NotReady(f"empty catalogue: no images featurized with {backbone!r}; run featurize first")
        if refresh:
            store.delete_neighbors(backbone, method, version)
        before = len(store.neighbor_ids(backbone, method, version))
        rows = block_rows(n, memory)
        ranges = block_ranges(n, rows)
        job = uuid.uuid4().hex
        rdd = spark.sparkContext.parallelize(ranges, len(ranges)).mapPartitions(
            lambda part: _neighbors_task(db, job, backbone, method, k, version, part))
        added = run_job(rdd, n - before, lambda: len(store.neighbor_ids(backbone, method, version)) - before,
                        f"neighbors on Spark ({method}, top {k})", progress)
    return NeighborsReport(backbone, method, version, k, n, sum(added), before, rows)
