"""Refine benchmark: frozen vs refined features on a folder-per-class data set, in one run.

    PYTHONPATH=Python python benchmarks/refine.py [DIR] [--db FILE] [--epochs N] [--seed 0] [--json]

Ingests DIR (default: the bundled sample), featurizes with the base backbone, splits (seed), trains and
evaluates on the frozen features, refines, featurizes with the refined network, trains and evaluates again,
then prints test accuracy (overall and class-averaged) of both, refine's epoch times and the wall time of
each step. The machine's load makes seconds noisy: compare the accuracies, and times only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.refine import refine
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.resources import sample_dataset
from image_similarity.store import connect


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, nargs="?", help="one sub-folder per class (default: bundled sample)")
    parser.add_argument("--db", help="database (default: a new temporary SQLite file)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, help="refine epochs (default: refine's)")
    parser.add_argument("--seed", type=int, default=0, help="split and refine seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    folder = args.dir or sample_dataset()
    out = Path(tempfile.mkdtemp(prefix="refine-bench-"))
    times: dict[str, float] = {}

    def timed(step, function, *a, **k):
        started = time.perf_counter()
        result = function(*a, **k)
        times[step] = round(time.perf_counter() - started, 1)
        return result

    with connect(args.db or str(out / "bench.sqlite")) as store:
        timed("ingest", ingest, store, folder, progress=False)
        timed("featurize_frozen", featurize, store, backbone=args.backbone, progress=False)
        counts = split(store, seed=args.seed)
        results = {}
        for kind in ("frozen", "refined"):
            if kind == "refined":
                name = timed("refine", refine, store, args.backbone, epochs=args.epochs, seed=args.seed,
                             progress=not args.json)
                timed("featurize_refined", featurize, store, backbone=name, progress=False)
            backbone = args.backbone if kind == "frozen" else name
            model = timed(f"train_{kind}", train, store, backbone, seed=args.seed)
            summary = timed(f"evaluate_{kind}", evaluate, store, model, out_dir=out / kind, seed=args.seed)
            results[kind] = {"backbone": backbone, "test_accuracy": summary["test_accuracy"],
                             "class_avg_accuracy": summary["class_avg_accuracy"]}
        network = store.network(name)
    report = {"data": str(folder), "split": counts, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "results": results, "refine": {"params": network.params, "best": network.metrics["best"],
                                              "epochs": network.metrics["history"]}, "seconds": times}
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"data {folder}: {counts.get('train', 0)} train / {counts.get('test', 0)} test, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    for kind, r in results.items():
        print(f"  {kind:<8} {r['backbone']:<30} test accuracy {100 * r['test_accuracy']:.1f}%, "
              f"class-averaged {100 * r['class_avg_accuracy']:.1f}%")
    best = network.metrics["best"]
    m = network.metrics
    print(f"  refine: {len(m['history'])} epochs, best {best['epoch']} (validation accuracy {best['val_accuracy']}),"
          f" on {m['device']} {m['precision']}, {m['train_images']} train / {m['val_images']} validation images")
    print("  epoch seconds: " + ", ".join(f"{e['seconds']:.0f}" for e in network.metrics["history"]))
    print("  step seconds: " + ", ".join(f"{k} {v:g}" for k, v in times.items()))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
