"""The label audit measured on planted mistakes (issue 31).

    PYTHONPATH=Python python benchmarks/audit.py [DIR ...] [--flip 0.03] [--duplicates 5] [--seed 0]
                                                 [--cache FOLDER] [--json]

For each folder-per-class data set (default: the bundled photos and ../shared/data/fashion-texture-7 when it is
there): ingests and featurizes it once into a cached SQLite file (--cache, default a folder in the system's temp
folder; later runs reuse it), then on a copy: audits the catalogue as it is (its own suspects), plants mistakes,
seeded (--flip: that share of the images get another class's label, drawn at random; --duplicates: that many
photos re-encoded as JPEG quality 70 and stored again under another class), splits, trains, audits again and
reports the audit's precision and recall on the planted mistakes at the default cut-off (and at others, from the
same out-of-fold probabilities), and the test accuracy against the true labels of a model trained on the planted
labels, on the labels after relabelling every suspect to its suggestion, and on the true labels.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from image_similarity.core.images import decode_image
from image_similarity.pipeline.audit import CUTOFF, apply_suggestions, at_cutoff, audit
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest, ingest_bytes
from image_similarity.pipeline.split import split
from image_similarity.pipeline.train import train
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore, Store

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fashion-texture-7"
CUTOFFS = (0.34, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def cached_store(folder: Path, cache: Path, featurizer: Featurizer) -> Path:
    """A SQLite file holding `folder`'s images and features, made on first use and reused after."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{folder.name}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]}.sqlite"
    with SQLiteStore(path) as store:
        ingest(store, folder, progress=False)
        featurize(store, featurizer, progress=False)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def plant(store: Store, featurizer: Featurizer, share: float, duplicates: int, seed: int) -> tuple[set[int], set[int]]:
    """Swap `share` of the labels to another class and store `duplicates` re-encoded photos under another class;
    (ids of flipped images, ids of the planted copies)."""
    rng = np.random.default_rng(seed)
    images = store.images()
    classes = sorted({im.label for im in images})
    chosen = rng.choice(len(images), round(share * len(images)) + duplicates, replace=False)
    flipped = set()
    for n in chosen[:len(chosen) - duplicates]:
        image = images[n]
        store.relabel_image(image.id, str(rng.choice([c for c in classes if c != image.label])))
        flipped.add(image.id)
    copies = set()
    for n in chosen[len(chosen) - duplicates:]:
        image = images[n]
        buffer = io.BytesIO()
        decode_image(store.image_bytes(image.id)).convert("RGB").save(buffer, "JPEG", quality=70)
        label = str(rng.choice([c for c in classes if c != image.label]))
        image_id, reason = ingest_bytes(store, f"{label}/copy-of-{image.id}.jpg", label, buffer.getvalue())
        assert image_id is not None, reason
        copies.add(image_id)
    featurize(store, featurizer, progress=False)
    return flipped, copies


def test_accuracy(store: Store, truth: dict[int, str], seed: int) -> float:
    """Accuracy against the true labels, on the split's test images that are not planted copies, of a model
    trained on the stored labels."""
    model = train(store, seed=seed)
    test = [i for i, s in store.split().items() if s == "test" and i in truth]
    ids, X = store.features(model.backbone, test)
    return float(np.mean(model.predict(X) == np.array([truth[int(i)] for i in ids])))


def measure(folder: Path, cache: Path, featurizer: Featurizer, share: float, duplicates: int,
            seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "work.sqlite"
        with sqlite3.connect(cached_store(folder, cache, featurizer)) as src, sqlite3.connect(path) as dst:
            src.backup(dst)
        with SQLiteStore(path) as store:
            truth = {im.id: im.label for im in store.images()}
            own = audit(store, seed=seed)
            flipped, copies = plant(store, featurizer, share, duplicates, seed)
            planted = flipped | copies
            split(store, seed=seed)
            before = test_accuracy(store, truth, seed)
            report = audit(store, seed=seed, cutoff=min(CUTOFFS))
            own_ids = {s.id for s in own.suspects}
            at = {}
            for cutoff in CUTOFFS:
                found = {s.id for s in at_cutoff(report, cutoff).suspects}
                hits = len(found & planted)
                at[f"{cutoff:g}"] = {"flagged": len(found), "planted_found": hits,
                                     "precision": hits / len(found) if found else float("nan"),
                                     "precision_without_own": hits / len(found - own_ids) if found - own_ids
                                     else float("nan"),
                                     "recall": hits / len(planted), "recall_flips": len(found & flipped) / len(flipped),
                                     "recall_copies": len(found & copies) / len(copies) if copies else float("nan")}
            fixed = at_cutoff(report, CUTOFF)
            chosen = {s.id for s in fixed.suspects}
            apply_suggestions(store, fixed)
            labels_now = {im.id: im.label for im in store.images()}
            right = sum(labels_now[i] == truth[i] for i in chosen if i in truth)
            after = test_accuracy(store, truth, seed)
            for image_id, label in truth.items():
                store.relabel_image(image_id, label)
            for image_id in copies:
                store.remove_image(image_id)
            clean = test_accuracy(store, truth, seed)
    return {"data": str(folder), "images": len(truth), "classes": len(set(truth.values())),
            "flipped": len(flipped), "copies": len(copies), "cutoff": CUTOFF, "at_cutoff": at[f"{CUTOFF:g}"],
            "by_cutoff": at, "relabelled_to_truth": right, "accuracy_planted": before, "accuracy_corrected": after,
            "accuracy_true_labels": clean,
            "own_suspects": [{"id": s.id, "name": s.name, "label": s.label, "suggested": s.suggested,
                              "probability": round(s.probability, 3), "reasons": s.reasons} for s in own.suspects],
            "own_conflicts": [[f"{t.id} {t.name} ({t.label})" for t in group] for group in own.conflicts],
            "seconds": time.perf_counter() - start}


def print_result(r: dict[str, Any]) -> None:
    a = r["at_cutoff"]
    print(f"{r['data']}: {r['images']} images, {r['classes']} classes; planted {r['flipped']} label flips and "
          f"{r['copies']} copies under another class ({r['seconds']:.0f} s)")
    print(f"  at the default cut-off {r['cutoff']:g}: {a['flagged']} flagged, {a['planted_found']} planted: precision "
          f"{a['precision']:.3f} ({a['precision_without_own']:.3f} not counting the catalogue's own suspects), recall "
          f"{a['recall']:.3f} (flips {a['recall_flips']:.3f}, copies {a['recall_copies']:.3f})")
    print("  by cut-off: " + "; ".join(f"{c}: P {v['precision']:.2f} R {v['recall']:.2f} ({v['flagged']})"
                                       for c, v in r["by_cutoff"].items()))
    print(f"  test accuracy (true labels): planted labels {r['accuracy_planted']:.4f}, after relabelling the suspects "
          f"{r['accuracy_corrected']:.4f} ({r['relabelled_to_truth']} relabelled to their true class), "
          f"true labels {r['accuracy_true_labels']:.4f}")
    print(f"  the catalogue's own suspects before planting ({len(r['own_suspects'])}):")
    for s in r["own_suspects"]:
        print(f"    {s['id']:>5} {s['name']}: {s['label']} -> {s['suggested']} ({s['probability']:.3f}) "
              f"[{'; '.join(s['reasons'])}]")
    for group in r["own_conflicts"]:
        print(f"  its near duplicates under different labels: {', '.join(group)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", type=Path, nargs="*", help="folder-per-class data sets (default: bundled + shared)")
    parser.add_argument("--flip", type=float, default=0.03, help="share of labels swapped (default: 0.03)")
    parser.add_argument("--duplicates", type=int, default=5, help="copies stored under another class (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted mistakes, split and folds")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "image-similarity-audit-bench",
                        help="folder of the featurized data sets, reused between runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    dirs = args.dirs or [SAMPLE_DATASET, *([SHARED.resolve()] if SHARED.exists() else [])]
    featurizer = Featurizer(device="cpu")
    results = [measure(d, args.cache, featurizer, args.flip, args.duplicates, args.seed) for d in dirs]
    if args.json:
        print(json.dumps(results, indent=2))
    for r in results if not args.json else ():
        print_result(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
