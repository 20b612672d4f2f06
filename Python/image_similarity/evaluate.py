"""Evaluate: classification accuracy, confusion, ROC/AUC, and how well each ranking method finds similar images."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import auc, average_precision_score, confusion_matrix, roc_curve

from .rank import METHODS, Catalogue
from .store import EvaluationRecord, Store, StoreError
from .train import SimilarityModel, load_model

N_NEGATIVES = 100


def classification_metrics(y: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Overall accuracy, accuracy per class, their mean, and the confusion matrix (rows: true)."""
    per_class = {c: float(np.mean(predicted[y == c] == c)) if np.any(y == c) else float("nan") for c in classes}
    return {"accuracy": float(np.mean(predicted == y)),
            "class_avg_accuracy": float(np.nanmean(list(per_class.values()))),
            "per_class": per_class,
            "confusion": confusion_matrix(y, predicted, labels=classes)}


def roc_curves(y: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC curve (fpr, tpr, AUC) per class present with both outcomes."""
    curves = {}
    for k, c in enumerate(classes):
        positive = y == c
        if positive.any() and (~positive).any():
            fpr, tpr, _ = roc_curve(positive, scores[:, k])
            curves[c] = (fpr, tpr, float(auc(fpr, tpr)))
    return curves


def positive_ranks(similarity: np.ndarray, query_labels: np.ndarray, labels: np.ndarray, seed: int = 0,
                   n_negatives: int = N_NEGATIVES) -> np.ndarray:
    """The original solution's test: rank of 1 same-class candidate among it and `n_negatives` others.

    For each query (a row of `similarity` against the candidates), draws one positive and up to
    `n_negatives` negatives with a seeded generator, and returns the positive's 1-based rank (ties count
    against it).
    """
    rng = np.random.default_rng(seed)
    ranks = np.empty(len(query_labels), dtype=np.int64)
    for q, label in enumerate(query_labels):
        same, other = np.flatnonzero(labels == label), np.flatnonzero(labels != label)
        positive = rng.choice(same)
        negatives = rng.choice(other, size=min(n_negatives, len(other)), replace=False)
        ranks[q] = 1 + np.sum(similarity[q, negatives] >= similarity[q, positive])
    return ranks


def retrieval_metrics(similarity: np.ndarray, query_labels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10 (a same-class image in the top k) and mean average precision over the whole catalogue."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    relevant = labels[order] == query_labels[:, None]
    out = {f"recall@{k}": float(np.mean(relevant[:, :k].any(axis=1))) for k in (1, 5, 10)}
    aps = [average_precision_score(labels == lab, s) for lab, s in zip(query_labels, similarity)
           if (labels == lab).any()]
    out["map"] = float(np.mean(aps)) if aps else float("nan")
    return out


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Top-k hit rates and the mean/median rank of the positive."""
    return {"top1": float(np.mean(ranks <= 1)), "top5": float(np.mean(ranks <= 5)),
            "top10": float(np.mean(ranks <= 10)), "mean_rank": float(np.mean(ranks)),
            "median_rank": float(np.median(ranks))}


def evaluate(store: Store, model: SimilarityModel | None = None, out_dir: str | Path | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Evaluate a model (latest by default) on its split; store the figures, write plots, return the summary."""
    model = model or load_model(store)
    subsets = store.split()
    rows = {im.id: im for im in store.images()}
    data = {}
    for subset in ("train", "test"):
        ids, X = store.features(model.backbone, [i for i, s in subsets.items() if s == subset and i in rows])
        if len(ids) == 0:
            raise StoreError(f"no featurized {subset} images for {model.backbone!r}: run split and featurize first")
        data[subset] = (ids, X, np.array([rows[int(i)].label for i in ids]))
    record, results, curves = evaluate_data(model, data, {i: r.dhash for i, r in rows.items()}, seed)
    summary = record.summary
    summary["evaluation_id"] = store.put_evaluation(record)
    if out_dir is not None:
        from .plots import save_evaluation_plots

        summary["plots"] = save_evaluation_plots(out_dir, model.classes, results["test"]["confusion"], curves,
                                                 summary["ranking"])
    return summary


def evaluate_data(model: SimilarityModel, data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  dhashes: dict[int, str], seed: int = 0) -> tuple[EvaluationRecord, dict[str, Any], dict]:
    """(record, classification results per subset, ROC curves) of a model on 'train' and 'test' (ids, X, labels)."""
    summary: dict[str, Any] = {"model_version": model.version, "backbone": model.backbone, "classes": model.classes,
                               "C": model.params.get("C"), "n_train": len(data["train"][0]),
                               "n_test": len(data["test"][0])}
    metrics: list[tuple[str, str, str, float]] = []
    confusion: list[tuple[str, str, str, int]] = []
    results = {}
    for subset, (ids, X, y) in data.items():
        result = classification_metrics(y, model.predict(X), model.classes)
        results[subset] = result
        summary[f"{subset}_accuracy"] = result["accuracy"]
        summary[f"{subset}_class_avg_accuracy"] = result["class_avg_accuracy"]
        metrics += [(subset, "accuracy", "", result["accuracy"]),
                    (subset, "class_avg_accuracy", "", result["class_avg_accuracy"])]
        metrics += [(subset, "accuracy", c, v) for c, v in result["per_class"].items()]
        confusion += [(subset, t, p, int(result["confusion"][i, j]))
                      for i, t in enumerate(model.classes) for j, p in enumerate(model.classes)]
    summary["class_avg_accuracy"] = summary["test_class_avg_accuracy"]
    summary["per_class_test_accuracy"] = results["test"]["per_class"]

    _, X_test, y_test = data["test"]
    curves = roc_curves(y_test, model.decision_function(X_test), model.classes)
    summary["auc"] = {c: a for c, (_, _, a) in curves.items()}
    summary["roc"] = {c: {"fpr": fpr.tolist(), "tpr": tpr.tolist()} for c, (fpr, tpr, _) in curves.items()}
    metrics += [("test", "auc", c, a) for c, a in summary["auc"].items()]

    train_ids, X_train, y_train = data["train"]
    catalogue = Catalogue(train_ids, [""] * len(train_ids), list(y_train), [""] * len(train_ids),
                          [dhashes[int(i)] for i in train_ids], X_train, model)
    ranking = {}
    for method in METHODS:
        similarity = catalogue.similarity(X_test, method)
        figures = ranking_metrics(positive_ranks(similarity, y_test, y_train, seed))
        figures.update(retrieval_metrics(similarity, y_test, y_train))
        ranking[method] = figures
        metrics += [(f"ranking:{method}", k, "", v) for k, v in figures.items()]
    summary["ranking"] = ranking
    summary["best_method"] = max(METHODS, key=lambda m: (ranking[m]["top1"], ranking[m]["map"]))
    record = EvaluationRecord(model_version=model.version, summary=summary, metrics=metrics, confusion=confusion)
    return record, results, curves
