"""The CUDA path end to end, for the day a GPU is lent: featurize (float16 mixed precision against float32 on the CPU),
refine, train and rank, and the web service answering rank requests, each with its figures. Exits with one line
(status 2) where torch sees no CUDA device.

    PYTHONPATH=Python python benchmarks/gpu.py [--per-class N] [--epochs N] [--requests N]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from image_similarity.core import machine
from image_similarity.entrypoints.reports import print_run_step
from image_similarity.pipeline.featurize import Featurizer
from image_similarity.pipeline.ingest import class_files
from image_similarity.pipeline.rank import rank
from image_similarity.pipeline.steps import JOB, REFINED_JOB, Results, Run, run_job
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore

NO_GPU = "benchmarks/gpu.py: no CUDA GPU here (torch {torch}, built for CUDA {cuda}): nothing to check"


def photos(folder: Path, per_class: int) -> Path:
    """A folder with the first `per_class` bundled photos of each class."""
    taken: dict[str, int] = {}
    for _, label, path in class_files(SAMPLE_DATASET):
        if taken.setdefault(label, 0) < per_class:
            (folder / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / label / path.name)
            taken[label] += 1
    return folder


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def featurize_figures(folder: Path) -> None:
    """img/s on CUDA (fp16 autocast, and fp32) against the CPU's chosen runtime, and the features' closeness."""
    gpu, gpu32 = Featurizer(device="cuda"), Featurizer(device="cuda", precision="fp32")
    cpu = Featurizer(device="cpu", precision="fp32", runtime="torch")
    batch = np.stack([cpu.prepare(p.read_bytes()) for p in sorted(folder.rglob("*.jpg"))[:32]])
    exact = cpu.forward(batch)
    for name, featurizer in (("cuda " + gpu.precision, gpu), ("cuda fp32", gpu32)):
        featurizer.forward(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            features = featurizer.forward(batch)
        seconds = (time.perf_counter() - start) / 5
        print(f"featurize {name} ({featurizer.runtime}): {len(batch) / seconds:.1f} img/s, cosine to CPU float32 "
              f"min {cosines(features, exact).min():.5f}")


def service_figures(store: SQLiteStore, featurizer: Featurizer, queries: list[bytes], requests: int) -> None:
    """Rank requests through the web service in this process: requests/s and p50/p95 latency, errors."""
    from fastapi.testclient import TestClient

    from image_similarity.entrypoints.web import create_app

    latencies, errors = [], 0
    with TestClient(create_app(store, featurizer, featurize_added=False)) as client:
        for i in range(requests + 2):
            start = time.perf_counter()
            response = client.post("/api/rank", files={"file": ("q.jpg", queries[i % len(queries)], "image/jpeg")})
            if i >= 2:  # two warm-up requests
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200
    p50, p95 = statistics.median(latencies), sorted(latencies)[int(0.95 * (len(latencies) - 1))]
    print(f"service on cuda: {len(latencies) / sum(latencies):.1f} requests/s to one client, p50 {1e3 * p50:.1f} ms, "
          f"p95 {1e3 * p95:.1f} ms, {errors} errors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the CUDA path end to end and print its figures.")
    parser.add_argument("--per-class", type=int, default=24, help="bundled photos per class (default 24)")
    parser.add_argument("--epochs", type=int, default=2, help="refine epochs (default 2)")
    parser.add_argument("--requests", type=int, default=30, help="service rank requests (default 30)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU.format(torch=torch.__version__, cuda=torch.version.cuda or "none"), file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}; CPU: {machine.describe()['cpu']}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = photos(Path(tmp) / "photos", args.per_class)
        featurize_figures(folder)
        with SQLiteStore(Path(tmp) / "gpu.sqlite") as store:
            run = Run(store, lambda backbone: Featurizer(backbone or "efficientnet_lite0", device="cuda", store=store),
                      folder=folder, device="cuda", epochs=args.epochs)
            done = Results()
            for names in (("ingest", *JOB), REFINED_JOB):
                start = time.perf_counter()
                done = run_job(run, names, show=print_run_step, done=done)
                print(f"-> {' + '.join(names)} on cuda in {time.perf_counter() - start:.1f} s")
            queries = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:8]]
            start = time.perf_counter()
            result = rank(store, queries[0], done.featurizer)
            print(f"rank on cuda ({done.featurizer.backbone}): {1e3 * (time.perf_counter() - start):.1f} ms, "
                  f"top match {result.matches[0].name}")
            service_figures(store, done.featurizer, queries, args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
