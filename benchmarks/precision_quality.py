"""Does the faster precision change the results? The whole job (ingest, featurize, split, train, evaluate) on the
bundled photos at float32 and at bfloat16 (or float16), side by side, with the features' cosine to float32.

    PYTHONPATH=Python python benchmarks/precision_quality.py [--precision bf16] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.search.methods import METHODS
from image_similarity.store import SQLiteStore

FIGURES = {"ranking": ("top1", "top5", "top10"), "catalogue_ranking": ("top1", "top10", "map")}
"""The ranking figures compared, per block of the evaluation (the original protocol's has no mAP)."""


def whole_job(path: Path, precision: str) -> tuple[np.ndarray, dict]:
    """(features, evaluation summary) of the whole job at one precision on CPU."""
    with SQLiteStore(path) as store:
        ingest(store, SAMPLE_DATASET, progress=False)
        featurizer = Featurizer(device="cpu", precision=precision, runtime="torch")
        featurize(store, featurizer, progress=False)
        split(store, seed=0)
        train(store, featurizer.backbone)
        summary = evaluate(store)
        return store.features(featurizer.backbone)[1], summary


def compare(precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: whole_job(Path(tmp) / f"{p}.sqlite", p) for p in ("fp32", precision)}
    (base, _), (fast, _) = runs["fp32"], runs[precision]
    cosine = np.einsum("ij,ij->i", base, fast) / (np.linalg.norm(base, axis=1) * np.linalg.norm(fast, axis=1))
    figures = {}
    for p, (_, summary) in runs.items():
        figures[p] = {"test_accuracy": summary["test_accuracy"], "class_avg_accuracy": summary["class_avg_accuracy"],
                      **{f"{block}:{m}:{k}": summary[block][m][k] for block, keys in FIGURES.items()
                         for m in METHODS for k in keys}}
    largest = max(abs(figures[precision][k] - figures["fp32"][k]) for k in figures["fp32"])
    return {"precision": precision, "images": len(base), "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()), "figures": figures, "largest_difference": largest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluation figures at float32 and at a faster precision.")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    result = compare(args.precision)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    p = result["precision"]
    print(f"{result['images']} bundled photos; feature cosine to fp32: min {result['cosine_min']:.5f}, "
          f"mean {result['cosine_mean']:.5f}")
    print(f"  {'figure':32} {'fp32':>8} {p:>8}")
    for key, value in result["figures"]["fp32"].items():
        print(f"  {key:32} {value:8.4f} {result['figures'][p][key]:8.4f}")
    print(f"largest difference: {result['largest_difference']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
