"""Answer quality on any folder-per-class data set: frozen (and refined) backbones side by side.

    PYTHONPATH=Python python benchmarks/quality.py DIR [--backbones efficientnet_lite0 mobilenet_v2]
                                                     [--refine [--epochs N]] [--db FILE] [--seed 0] [--json]

Ingests DIR (one sub-folder per class) into a temporary SQLite database (or --db, kept and reused: every step
resumes), splits it (seed 0), and for each backbone, frozen and (with --refine) refined on the training split:
featurizes, trains, evaluates, and prints test accuracy, class-averaged accuracy, and per ranking method top-1,
top-5, top-10 and median rank under the original protocol (each test image against 1 positive + 100 negatives
drawn from the test split), the precision@10 and look-alike@10 of ranking the training images (how many of the top
10 share the query's class, and how much more alike the same-class ones look than an average image of the class),
and the wall time of each network's steps, as a ratio to the first frozen backbone's measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from image_similarity.features.backbones import DEFAULT_BACKBONE
from image_similarity.pipeline.evaluate import evaluate
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.refine import refine
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.search.methods import METHODS
from image_similarity.store import SQLiteStore, Store

RANKING_FIGURES = ("top1", "top5", "top10", "median_rank")
CATALOGUE_FIGURES = ("precision@10", "look_alike@10")


def measure(store: Store, network: str, seed: int, progress: bool) -> dict[str, Any]:
    """Featurize, train and evaluate one network on the store's split; its figures and wall time."""
    start = time.perf_counter()
    featurize(store, Featurizer(network, device="cpu", store=store), progress=progress)
    model = train(store, network, seed=seed)
    summary = evaluate(store, model, seed=seed)
    return {"network": network, "test_accuracy": summary["test_accuracy"],
            "class_avg_accuracy": summary["class_avg_accuracy"], "best_method": summary["best_method"],
            "ranking": {m: {k: summary["ranking"][m][k] for k in RANKING_FIGURES} for m in METHODS},
            "catalogue": {m: {k: summary["catalogue_ranking"][m][k] for k in CATALOGUE_FIGURES} for m in METHODS},
            "n_train": summary["n_train"], "n_test": summary["n_test"], "seconds": time.perf_counter() - start}


def run(folder: Path, backbones: list[str], refined: bool, db: Path, seed: int = 0, epochs: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Every row of the benchmark: per backbone, frozen then (if asked) refined on the CPU with refine's
    settings (`epochs`: refine's default unless given)."""
    rows = []
    with SQLiteStore(db) as store:
        report = ingest(store, folder, progress=progress)
        counts = split(store, seed=seed)
        for backbone in backbones:
            rows.append({"backbone": backbone, "variant": "frozen", **measure(store, backbone, seed, progress)})
            if refined:
                start = time.perf_counter()
                network = refine(store, base=backbone, epochs=epochs, seed=seed, progress=progress, device="cpu")
                refine_seconds = time.perf_counter() - start
                row = measure(store, network, seed, progress)
                row["seconds"] += refine_seconds
                rows.append({"backbone": backbone, "variant": "refined", "refine_seconds": refine_seconds, **row})
    baseline = rows[0]["seconds"]
    for row in rows:
        row["time_vs_first"] = row["seconds"] / baseline
    return {"data": str(folder), "images": report.added + report.already_stored, "skipped": len(report.skipped),
            "split": counts, "seed": seed, "refine_epochs": epochs, "rows": rows}


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_table(result: dict[str, Any]) -> None:
    """The benchmark as a Markdown table: one line per network and ranking method."""
    split_counts = result["split"]
    print(f"{result['data']}: {result['images']} images ({result['skipped']} skipped), split seed {result['seed']}: "
          f"{split_counts.get('train', 0)} train / {split_counts.get('test', 0)} test")
    print("ranking: original protocol (each test image against 1 positive + 100 negatives from the test split); "
          "P@10 and look-alike@10: ranking the training images")
    print()
    print("| backbone | network | test acc. | class-avg. | method | top-1 | top-5 | top-10 | median rank "
          "| P@10 | look-alike@10 | time (vs first) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        head = [row["backbone"], row["variant"], _percent(row["test_accuracy"]), _percent(row["class_avg_accuracy"])]
        timing = f"{row['seconds']:.0f} s ({row['time_vs_first']:.2f}x)"
        for method in METHODS:
            r, c = row["ranking"][method], row["catalogue"][method]
            cells = head + [method + (" (best)" if method == row["best_method"] else ""), _percent(r["top1"]),
                            _percent(r["top5"]), _percent(r["top10"]), f"{r['median_rank']:g}",
                            _percent(c["precision@10"]), f"{c['look_alike@10']:.3f}", timing]
            print("| " + " | ".join(cells) + " |")
            head, timing = ["", "", "", ""], ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="folder with one sub-folder of images per class")
    parser.add_argument("--backbones", nargs="+", default=[DEFAULT_BACKBONE, "mobilenet_v2"],
                        help="pretrained networks to compare (default: efficientnet_lite0 mobilenet_v2)")
    parser.add_argument("--refine", action="store_true", help="also fine-tune each backbone on the training split")
    parser.add_argument("--epochs", type=int, help="with --refine: most refine epochs (default: refine's)")
    parser.add_argument("--db", type=Path, help="SQLite file to keep and reuse (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, training and draws (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"{args.dir} is not a folder")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.dir, args.backbones, args.refine, args.db or Path(tmp) / "quality.sqlite", args.seed,
                     args.epochs, progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
