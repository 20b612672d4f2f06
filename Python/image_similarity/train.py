"""Train: a linear SVM on image features (C chosen by cross-validation) and a learned pair metric for ranking."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.svm import LinearSVC

from .dedup import near_duplicate_groups
from .store import ModelRecord, Store, StoreError

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass
class SimilarityModel:
    """A one-vs-rest linear SVM over L2-normalised features, plus a linear pair metric.

    `coef`/`intercept` score each class; `metric_weights`/`metric_bias` score a pair (a, b) as
    `metric_weights @ (a - b) ** 2 + metric_bias` on normalised features (higher: more likely the same class).
    """

    backbone: str
    classes: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    metric_weights: np.ndarray
    metric_bias: float
    params: dict[str, Any] = field(default_factory=dict)
    version: int | None = None

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores (n, n_classes)."""
        return l2_normalize(X) @ self.coef.T + self.intercept

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class labels."""
        return np.asarray(self.classes)[self.decision_function(X).argmax(axis=1)]

    def to_record(self) -> ModelRecord:
        arrays = {"coef": self.coef, "intercept": self.intercept, "metric_weights": self.metric_weights,
                  "metric_bias": np.array([self.metric_bias])}
        return ModelRecord(backbone=self.backbone, classes=self.classes, arrays=arrays, params=self.params)

    @classmethod
    def from_record(cls, record: ModelRecord) -> SimilarityModel:
        a = record.arrays
        return cls(backbone=record.backbone, classes=record.classes, coef=a["coef"], intercept=a["intercept"],
                   metric_weights=a["metric_weights"], metric_bias=float(a["metric_bias"][0]),
                   params=record.params, version=record.version)


def fit_svm(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, C: Sequence[float] = C_GRID,
            folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(coef, intercept, best C, its cross-validated accuracy) of a LinearSVC on normalised features."""
    X = l2_normalize(X)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to train, found {len(classes)}")
    min_count = min(np.sum(y == c) for c in classes)
    folds = max(2, min(folds, min_count))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    search = GridSearchCV(LinearSVC(dual="auto", max_iter=20000, random_state=seed), {"C": list(C)}, cv=cv, n_jobs=1)
    search.fit(X, y, groups=groups if groups is not None else np.arange(len(y)))
    svm = search.best_estimator_
    coef, intercept = svm.coef_, svm.intercept_
    if len(classes) == 2:  # LinearSVC keeps one row for two classes; make it one row per class
        coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    return coef.astype(np.float32), intercept.astype(np.float32), float(search.best_params_["C"]), \
        float(search.best_score_)


def fit_pair_metric(X: np.ndarray, y: np.ndarray, pairs: int = 10000, C: float = 0.01,
                    seed: int = 0) -> tuple[np.ndarray, float]:
    """Weights on squared feature differences that tell same-class pairs from different-class ones.

    A logistic regression on balanced random pairs, fitted on standardised differences and folded back, so
    the score stays linear in `(a - b) ** 2` of the normalised features.
    """
    X = l2_normalize(X)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(y), size=(2, pairs * 4))
    keep = a != b
    a, b = a[keep], b[keep]
    same = y[a] == y[b]
    chosen = np.concatenate([np.flatnonzero(same)[: pairs // 2], np.flatnonzero(~same)[: pairs // 2]])
    diff = (X[a[chosen]] - X[b[chosen]]) ** 2
    scale = diff.std(axis=0) + 1e-12
    clf = LogisticRegression(C=C, max_iter=3000).fit(diff / scale, same[chosen])
    return (clf.coef_[0] / scale).astype(np.float32), float(clf.intercept_[0])


def train(store: Store, backbone: str | None = None, C: Sequence[float] = C_GRID, seed: int = 0) -> SimilarityModel:
    """Train on the training split's features and store the model as a new version."""
    subsets = store.split()
    if not subsets:
        raise StoreError("no train/test split: run 'image-similarity split' first")
    counts = store.feature_counts()
    if backbone is None:
        if not counts:
            raise StoreError("no features: run 'image-similarity featurize' first")
        backbone = max(counts, key=counts.get)
    rows = {im.id: im for im in store.images()}
    train_ids = [i for i, s in subsets.items() if s == "train" and i in rows]
    ids, X = store.features(backbone, train_ids)
    if len(ids) == 0:
        raise StoreError(f"no features for backbone {backbone!r} in the training split: run featurize first")
    model = fit_model(backbone, X, np.array([rows[i].label for i in ids]), [rows[i].dhash for i in ids], C, seed)
    model.version = store.put_model(model.to_record())
    return model


def fit_model(backbone: str, X: np.ndarray, y: np.ndarray, dhashes: Sequence[str], C: Sequence[float] = C_GRID,
              seed: int = 0) -> SimilarityModel:
    """Fit the SVM (near-duplicate groups kept within one fold) and the pair metric on training features."""
    coef, intercept, best_c, cv_score = fit_svm(X, y, near_duplicate_groups(list(dhashes)), C, seed=seed)
    weights, bias = fit_pair_metric(X, y, seed=seed)
    return SimilarityModel(
        backbone=backbone, classes=sorted(set(y.tolist())), coef=coef, intercept=intercept,
        metric_weights=weights, metric_bias=bias,
        params={"C": best_c, "cv_accuracy": cv_score, "C_grid": list(C), "n_train": len(y), "seed": seed,
                "normalize": "l2"},
    )


def load_model(store: Store, version: int | None = None) -> SimilarityModel:
    """The stored model (latest unless a version is given)."""
    return SimilarityModel.from_record(store.model(version))
