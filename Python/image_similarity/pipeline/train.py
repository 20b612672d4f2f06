"""Train: a linear SVM on image features (C chosen by cross-validation), calibrated class probabilities, and a
discriminant embedding for ranking without class scores."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.linalg import eigh
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, cross_val_predict
from sklearn.svm import LinearSVC

from ..core.dedup import near_duplicate_groups
from ..errors import BadInput, NotReady
from ..search.model import SimilarityModel, l2_normalize
from ..search.stored import store_method_vectors
from ..store import Store
from .classes import as_params, learnable, unlabelled

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
SHRINKAGE = 1.0
"""Ridge added to the within-class covariance of the embedding, as a multiple of its mean variance (chosen on
the bundled 3 classes and fashion-texture-7 with both backbones: 1 is best or within noise of it on all four)."""


def group_folds(y: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray,
                                                                                           np.ndarray]]:
    """(fit, held-out) positions of stratified, shuffled folds that keep each group (of near duplicates) whole:
    `folds` of them, fewer when a class has fewer distinct groups, and at least 2. One line when a class would be
    missing from a fold's fitting side (only near duplicates labelled differently can tie a class to one fold)."""
    classes = np.unique(y)
    folds = max(2, min(folds, min(len(np.unique(groups[y == c])) for c in classes)))
    cv = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(y, y, groups))
    missing = sorted({str(c) for fit, _ in cv for c in np.setdiff1d(classes, y[fit])})
    if missing:
        raise BadInput(f"cannot cross-validate {', '.join(missing)}: their photos are near duplicates of photos in "
                       "other classes; give each photo one class")
    return cv


def cross_validated_svm(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, C: Sequence[float] = C_GRID,
                        folds: int = 5, seed: int = 0) -> tuple[LinearSVC, float, float, np.ndarray]:
    """(LinearSVC of the best C fitted on all images, that C, its cross-validated accuracy, its held-out class
    scores (n, n_classes): each image scored by the SVM of the folds without it) on normalised features."""
    X = l2_normalize(X)
    classes = np.unique(y)
    if len(classes) < 2:
        raise BadInput(f"need at least 2 classes to train, found {len(classes)}")
    groups = groups if groups is not None else np.arange(len(y))
    cv = group_folds(y, groups, folds, seed)
    search = GridSearchCV(linear_svm(seed), {"C": list(C)}, cv=cv, n_jobs=1)
    search.fit(X, y, groups=groups)
    svm = search.best_estimator_
    return svm, float(search.best_params_["C"]), float(search.best_score_), held_out_scores(svm, X, y, groups, cv)


def linear_svm(seed: int = 0, C: float = 1.0) -> LinearSVC:
    """The SVM every model is fitted with."""
    return LinearSVC(C=C, dual="auto", max_iter=20000, random_state=seed)


def held_out_scores(svm: LinearSVC, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                    cv: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each image's class scores (n, n_classes) from `svm` fitted on the folds without it."""
    held_out = cross_val_predict(svm, X, y, groups=groups, cv=cv, method="decision_function")
    return np.column_stack([-held_out, held_out]) if held_out.ndim == 1 else held_out  # two classes: one score


def fit_svm(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, C: Sequence[float] = C_GRID,
            folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """(coef, intercept, best C, its cross-validated accuracy, temperature) of a LinearSVC on normalised
    features; the temperature calibrates the best C's cross-validated scores (see `fit_temperature`)."""
    svm, best_c, cv_score, held_out = cross_validated_svm(X, y, groups, C, folds, seed)
    coef, intercept = svm.coef_, svm.intercept_
    if len(coef) == 1:  # two classes: one row per class
        coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    temperature = fit_temperature(held_out, np.searchsorted(np.unique(y), y))
    return coef.astype(np.float32), intercept.astype(np.float32), best_c, cv_score, temperature


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The temperature T whose softmax(scores / T) has the least log loss on held-out scores (class indices y)."""
    def log_loss(log_t: float) -> float:
        return -float(np.mean(log_softmax(scores / np.exp(log_t), axis=1)[np.arange(len(y)), y]))
    return float(np.exp(minimize_scalar(log_loss, bounds=(np.log(1e-3), np.log(1e2)), method="bounded").x))


def fit_embedding(X: np.ndarray, y: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(projection dim x k, mean) of a shrunk linear discriminant embedding of normalised features (k: classes - 1).

    The directions maximise between-class over within-class variance, the within-class covariance shrunk
    towards `shrinkage` times its mean variance (few images per class, many dimensions).
    """
    X = l2_normalize(X).astype(np.float64)
    classes = np.unique(y)
    mean = X.mean(axis=0)
    centred = np.vstack([X[y == c] - X[y == c].mean(axis=0) for c in classes])
    within = centred.T @ centred / max(len(y) - len(classes), 1)
    within += shrinkage * np.trace(within) / len(within) * np.eye(len(within))
    class_means = np.array([X[y == c].mean(axis=0) for c in classes]) - mean
    between = class_means.T @ class_means / len(classes)
    k = len(classes) - 1
    _, vectors = eigh(between, within, subset_by_index=(len(within) - k, len(within) - 1))
    return vectors[:, ::-1].astype(np.float32), mean.astype(np.float32)


def train(store: Store, backbone: str | None = None, C: Sequence[float] = C_GRID, seed: int = 0) -> SimilarityModel:
    """Train on the training split's features and store the model as a new version (in a database with vector
    search, with its rows of scores and learned for every featurized image: search/stored.py)."""
    subsets = store.split()
    if not subsets:
        raise NotReady("no train/test split: run 'image-similarity split' first")
    counts = store.feature_counts()
    if backbone is None:
        if not counts:
            raise NotReady("no features: run 'image-similarity featurize' first")
        backbone = max(counts, key=counts.get)
    rows = {im.id: im for im in store.images()}
    train_ids = [i for i, s in subsets.items() if s == "train" and i in rows and rows[i].label is not None]
    ids, X = store.features(backbone, train_ids)
    if len(ids) == 0:
        raise NotReady(f"no features for backbone {backbone!r} in the training split: run featurize first")
    model = fit_model(backbone, X, np.array([rows[i].label for i in ids]), [rows[i].dhash for i in ids], C, seed)
    if left := unlabelled([im.label for im in rows.values()]):  # only then: params as SQL Server's TrainModel's
        model.params["unlabelled"] = left
    model.version = store.put_model(model.to_record())
    store_method_vectors(store, model)
    return model


def fit_model(backbone: str, X: np.ndarray, y: np.ndarray, dhashes: Sequence[str], C: Sequence[float] = C_GRID,
              seed: int = 0) -> SimilarityModel:
    """Fit the SVM and its calibration (near-duplicate groups kept within one fold) and the embedding on the classes
    with enough photos (classes.learnable); the classes left out are kept in the params."""
    if not C or min(C) <= 0:
        raise BadInput(f"C values must be positive, got {' '.join(f'{c:g}' for c in C)}")
    kept, left_out = learnable(y, dhashes, "train")
    mask = np.isin(y, kept)
    X, y, dhashes = X[mask], y[mask], [h for h, m in zip(dhashes, mask) if m]
    coef, intercept, best_c, cv_score, temperature = fit_svm(X, y, near_duplicate_groups(list(dhashes)), C, seed=seed)
    embedding, mean = fit_embedding(X, y)
    return SimilarityModel(
        backbone=backbone, classes=sorted(set(y.tolist())), coef=coef, intercept=intercept,
        temperature=temperature, embedding=embedding, embedding_mean=mean,
        params={"C": best_c, "cv_accuracy": cv_score, "C_grid": list(C), "n_train": len(y), "seed": seed,
                "normalize": "l2", "temperature": temperature, "embedding_shrinkage": SHRINKAGE,
                "left_out": as_params(left_out)},
    )


def load_model(store: Store, version: int | None = None) -> SimilarityModel:
    """The stored model (latest unless a version is given)."""
    return SimilarityModel.from_record(store.model(version))
