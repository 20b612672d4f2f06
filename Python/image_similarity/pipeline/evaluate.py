"""Evaluate: classification accuracy, confusion, ROC/AUC, and how well each ranking method finds similar images.

Ranking is measured twice. `ranking` is the original solution's protocol: every test image is a query, its
candidates 1 positive and 100 negatives drawn from the test split (`draw_candidates`), so its figures sit beside
the original's. `catalogue_ranking` ranks the test queries against the training images, as `rank` ranks a
catalogue: the same draw from the training split, plus recall, mAP, precision and look-alike over all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import auc, average_precision_score, confusion_matrix, roc_curve

from ..core.dedup import NEAR_DUPLICATE_DISTANCE, hamming_matrix
from ..errors import BadInput, NotReady
from ..search.catalogue import Catalogue
from ..search.methods import METHODS
from ..search.model import SimilarityModel
from ..search.searchers import scorer
from ..store import EvaluationRecord, Store
from .classes import MIN_TEST_IMAGES, MIN_TRAIN_PHOTOS, from_params, unlabelled
from .train import load_model

N_NEGATIVES = 100
RANKING_BLOCKS = {"ranking": "original protocol: 1 positive + 100 negatives from the test split",
                  "catalogue_ranking": "catalogue: test queries against the training images"}


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


def draw_candidates(query_labels: np.ndarray, labels: np.ndarray, excluded: np.ndarray, seed: int = 0,
                    n_negatives: int = N_NEGATIVES) -> tuple[np.ndarray, np.ndarray]:
    """The original solution's candidates for each query: (positives (n,), negatives (n, n_negatives)).

    As the CNTK image-similarity tutorial and Microsoft's ml-server-image-similarity drew them: one positive,
    an image of the query's class chosen uniformly, and `n_negatives` negatives, each a class chosen uniformly
    among the other classes and then an image of it chosen uniformly (with replacement). `excluded[q, i]`
    marks candidates query q may not get (itself and its near duplicates). A query with no possible positive
    gets positive -1 and is left out of the figures. Seeded: the same inputs and seed give the same draw.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    positives = np.full(len(query_labels), -1, dtype=np.int64)
    negatives = np.zeros((len(query_labels), n_negatives), dtype=np.int64)
    for q, label in enumerate(query_labels):
        same = members.get(label, np.array([], dtype=np.int64))
        same = same[~excluded[q, same]]
        others = [members[c] for c in classes if c != label]
        if len(same) == 0 or not others:
            continue
        positives[q] = rng.choice(same)
        for n, k in enumerate(rng.integers(0, len(others), size=n_negatives)):
            negatives[q, n] = rng.choice(others[k])
    return positives, negatives


def positive_ranks(similarity: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """The 1-based rank of each query's positive among it and its negatives (ties count against it), for the
    queries with a positive (`similarity`: queries x candidates, higher is more similar)."""
    kept = np.flatnonzero(positives >= 0)
    positive = similarity[kept, positives[kept]]
    return 1 + np.sum(np.take_along_axis(similarity[kept], negatives[kept], axis=1) >= positive[:, None], axis=1)


def retrieval_metrics(similarity: np.ndarray, query_labels: np.ndarray, labels: np.ndarray,
                      look: np.ndarray | None = None, top: int = 10) -> dict[str, float]:
    """Recall@1/5/10 (a same-class image in the top k) and mean average precision over the whole catalogue,
    precision@`top` (share of the top that shares the query's class) and, given `look` (queries x catalogue,
    how alike two images look), look_alike@`top`: how much more alike the same-class images in the top look to
    the query than the average image of its class (0: the order within a class is arbitrary)."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    relevant = labels[order] == query_labels[:, None]
    out = {f"recall@{k}": float(np.mean(relevant[:, :k].any(axis=1))) for k in (1, 5, 10)}
    aps = [average_precision_score(labels == lab, s) for lab, s in zip(query_labels, similarity)
           if (labels == lab).any()]
    out["map"] = float(np.mean(aps)) if aps else float("nan")
    out[f"precision@{top}"] = float(np.mean(relevant[:, :top]))
    if look is not None:
        gains = [look[q, order[q, :top][relevant[q, :top]]].mean() - look[q, labels == lab].mean()
                 for q, lab in enumerate(query_labels) if relevant[q, :top].any()]
        out[f"look_alike@{top}"] = float(np.mean(gains)) if gains else float("nan")
    return out


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Top-k hit rates and the mean/median rank of the positive (NaN without any query)."""
    if len(ranks) == 0:
        return dict.fromkeys(("top1", "top5", "top10", "mean_rank", "median_rank"), float("nan"))
    return {"top1": float(np.mean(ranks <= 1)), "top5": float(np.mean(ranks <= 5)),
            "top10": float(np.mean(ranks <= 10)), "mean_rank": float(np.mean(ranks)),
            "median_rank": float(np.median(ranks))}


def evaluate(store: Store, model: SimilarityModel | None = None, out_dir: str | Path | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Evaluate a model (latest by default) on its split; store the figures, write plots, return the summary."""
    model = model or load_model(store)
    subsets = store.split()
    rows = {im.id: im for im in store.images()}
    if not subsets:
        raise NotReady("no train/test split: run 'image-similarity split' first")
    data = {}
    for subset in ("train", "test"):
        wanted = [i for i, s in subsets.items() if s == subset and i in rows and rows[i].label is not None]
        ids, X = store.features(model.backbone, wanted)
        if wanted and len(ids) == 0:
            raise NotReady(f"no featurized {subset} images for {model.backbone!r}: run featurize first")
        data[subset] = (ids, X, np.array([rows[int(i)].label for i in ids], dtype=str))
    record, results, curves = evaluate_data(model, data, {i: r.dhash for i, r in rows.items()}, seed)
    summary = record.summary
    if left := unlabelled([im.label for im in rows.values()]):  # only then: a summary as EvaluateModel's
        summary["unlabelled"] = left
    summary["evaluation_id"] = store.put_evaluation(record)
    if out_dir is not None:
        from .figures import save_evaluation_plots  # lazy: matplotlib, only when plots are written

        summary["plots"] = save_evaluation_plots(out_dir, model.classes, results["test"]["confusion"], curves,
                                                 {b: summary[b] for b in RANKING_BLOCKS})
    return summary


def evaluate_data(model: SimilarityModel, data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  dhashes: dict[int, str], seed: int = 0) -> tuple[EvaluationRecord, dict[str, Any], dict]:
    """(record, classification results per subset, ROC curves) of a model on 'train' and 'test' (ids, X, labels):
    on the images of the classes it learnt; the summary's `not_measured` says why each other class is not."""
    data, not_measured = measurable(model, data)
    summary: dict[str, Any] = {"model_version": model.version, "backbone": model.backbone, "classes": model.classes,
                               "C": model.params.get("C"), "n_train": len(data["train"][0]),
                               "n_test": len(data["test"][0]), "not_measured": not_measured}
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

    test_ids, X_test, y_test = data["test"]
    curves = roc_curves(y_test, model.decision_function(X_test), model.classes)
    summary["auc"] = {c: a for c, (_, _, a) in curves.items()}
    summary["roc"] = {c: {"fpr": fpr.tolist(), "tpr": tpr.tolist()} for c, (fpr, tpr, _) in curves.items()}
    metrics += [("test", "auc", c, a) for c, a in summary["auc"].items()]

    train_ids, X_train, y_train = data["train"]
    test_hashes, train_hashes = [dhashes[int(i)] for i in test_ids], [dhashes[int(i)] for i in train_ids]
    test_set, training_set = _catalogue(data["test"], test_hashes), _catalogue(data["train"], train_hashes)
    # the original protocol: candidates from the test split, never the query or its near duplicates
    drawn = draw_candidates(y_test, y_test, hamming_matrix(test_hashes) <= NEAR_DUPLICATE_DISTANCE, seed)
    # the catalogue: test queries against the training images (near duplicates never cross the split)
    drawn_train = draw_candidates(y_test, y_train, hamming_matrix(test_hashes, train_hashes) <= NEAR_DUPLICATE_DISTANCE,
                                  seed)
    look = scorer(training_set, "cosine").similarity(X_test)
    summary["ranking"], summary["catalogue_ranking"] = {}, {}
    for method in METHODS:
        similarity = scorer(test_set, method, model).similarity(X_test)
        summary["ranking"][method] = ranking_metrics(positive_ranks(similarity, *drawn))
        similarity = scorer(training_set, method, model).similarity(X_test)
        figures = ranking_metrics(positive_ranks(similarity, *drawn_train))
        figures.update(retrieval_metrics(similarity, y_test, y_train, look))
        summary["catalogue_ranking"][method] = figures
    for block in ("ranking", "catalogue_ranking"):
        metrics += [(f"{block}:{m}", k, "", v) for m, figures in summary[block].items() for k, v in figures.items()]
    summary["n_ranking_queries"] = int(np.sum(drawn[0] >= 0))
    ranking = summary["ranking"]
    summary["best_method"] = max(METHODS, key=lambda m: tuple(np.nan_to_num(
        (ranking[m]["top1"], ranking[m]["top10"], -ranking[m]["mean_rank"]), nan=-np.inf)))
    record = EvaluationRecord(model_version=model.version, summary=summary, metrics=metrics, confusion=confusion)
    return record, results, curves


def measurable(model: SimilarityModel, data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict[str, str]]:
    """(the subsets' images of the classes the model learnt, {class not measured: why}); BadInput when no test or
    no training image of them is left (classes.py's rule)."""
    left_out = from_params(model.params)
    kept = {subset: tuple(a[np.isin(y, model.classes)] for a in (ids, X, y)) for subset, (ids, X, y) in data.items()}
    present = set().union(*(y.tolist() for _, _, y in data.values()))
    reasons = {c: "not learnt" + (f" ({left_out[c]})" if c in left_out else "") for c in present - set(model.classes)}
    test_labels = kept["test"][2]
    reasons.update({c: "no test image" for c in model.classes if np.sum(test_labels == c) < MIN_TEST_IMAGES})
    for subset, (ids, _, _) in kept.items():
        if len(ids) == 0:
            raise BadInput(f"evaluate: no {subset} image of the classes model version {model.version} learnt "
                           f"({', '.join(model.classes)}): a class needs {MIN_TRAIN_PHOTOS + MIN_TEST_IMAGES} distinct "
                           "photos to be learnt and measured; add photos and run split and train again")
    return kept, dict(sorted(reasons.items()))


def _catalogue(subset: tuple[np.ndarray, np.ndarray, np.ndarray], dhashes: list[str]) -> Catalogue:
    """The images of one subset (ids, X, labels) as a catalogue to rank."""
    ids, X, y = subset
    blank = [""] * len(ids)
    return Catalogue(ids, blank, list(y), blank, dhashes, X)
