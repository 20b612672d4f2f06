"""Audit (issue 31): the labelled images that are probably mislabelled, judged by out-of-fold class probabilities
(no image judges itself, near duplicates share a fold), near duplicates stored under different labels, and
classes too small to learn; then relabel or remove them."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import softmax

from ..core.dedup import near_duplicate_groups
from ..errors import BadInput, NotFound, NotReady
from ..search.model import l2_normalize
from ..store import Store
from .train import (
    C_GRID,
    cross_validated_svm,
    fit_temperature,
    group_folds,
    held_out_scores,
    linear_svm,
)

CUTOFF = 0.5
"""Flag an image when the out-of-fold probability of another class is at least this: the calibrated model finds
that class more likely than the image's own label and every other class together (see docs/audit.md)."""
MIN_CLASS_IMAGES = 10
"""Classes with fewer images are reported as too small to learn and left out of the probability model."""
FOLDS = 5


@dataclass(frozen=True)
class Twin:
    id: int
    name: str
    label: str


@dataclass(frozen=True)
class Suspect:
    """One image whose label the audit doubts, with the evidence."""

    id: int
    name: str
    label: str
    suggested: str
    """The class the model prefers."""
    probability: float
    """The out-of-fold probability of `suggested` (pooled over the image's near duplicates when they disagree)."""
    label_probability: float
    """The out-of-fold probability of the image's own label."""
    reasons: list[str]
    """'disputed' (the model prefers `suggested` at or above the cut-off) and/or 'twin under another label'."""
    twins: list[Twin] = field(default_factory=list)
    """Its near duplicates (dhash), with their labels."""


@dataclass(frozen=True)
class AuditReport:
    backbone: str
    images: int
    classes: dict[str, int]
    cutoff: float
    folds: int
    C: float
    suspects: list[Suspect]
    """Likeliest mistakes first: by the probability of the suggested class, then the lower own-label probability."""
    small_classes: dict[str, int]
    """Classes with fewer than MIN_CLASS_IMAGES images: not judged, and never suggested."""
    conflicts: list[list[Twin]]
    """Groups of near duplicates stored under more than one label."""
    unlabelled: int = 0
    """Featurized images without a label: not judged (issue 29)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(store: Store, backbone: str | None = None, cutoff: float = CUTOFF, folds: int = FOLDS, seed: int = 0,
          min_class_images: int = MIN_CLASS_IMAGES, C: float | None = None) -> AuditReport:
    """Audit every labelled, featurized image of the catalogue (train and test alike) on `backbone`'s features
    (default: the latest model's, else the most complete), with the SVM's `C` (default: chosen by train's
    cross-validated grid, which takes about five times longer)."""
    if not 0 < cutoff <= 1:
        raise BadInput(f"the cut-off is a probability above 0 and at most 1, got {cutoff}")
    backbone = backbone or default_backbone(store)
    rows = {im.id: im for im in store.images()}
    ids, X = store.features(backbone)
    if len(ids) == 0:
        raise NotReady(f"no {backbone} features: run 'image-similarity featurize' first")
    labelled = np.array([rows[int(i)].label is not None for i in ids], dtype=bool)
    left_out = int((~labelled).sum())
    ids, X = ids[labelled], X[labelled]
    images = [rows[int(i)] for i in ids]
    labels = np.array([im.label for im in images])
    counts = dict(sorted(Counter(labels.tolist()).items()))
    small = {c: n for c, n in counts.items() if n < min_class_images}
    judged = ~np.isin(labels, list(small))
    if len(set(labels[judged].tolist())) < 2:
        raise NotReady(f"need 2 classes of at least {min_class_images} images to audit, have {counts}")
    groups = near_duplicate_groups([im.dhash for im in images])
    classes, probs, best_c = out_of_fold_probabilities(X[judged], labels[judged], groups[judged], folds, seed, C)
    members: dict[int, list[int]] = defaultdict(list)
    for n, g in enumerate(groups):
        members[int(g)].append(n)
    conflicts = [ns for ns in members.values() if len({labels[n] for n in ns}) > 1]
    pooled = np.full((len(images), len(classes)), np.nan)
    pooled[judged] = probs
    for ns in conflicts:  # one photo under several labels: pool the evidence of its copies
        judged_ns = [n for n in ns if judged[n]]
        if judged_ns:
            pooled[ns] = pooled[judged_ns].mean(axis=0)
    conflicted = {n for ns in conflicts for n in ns}
    suspects = []
    for n, image in enumerate(images):
        if np.isnan(pooled[n, 0]):
            continue
        top = int(np.argmax(pooled[n]))
        own = float(pooled[n, classes.index(image.label)]) if image.label in classes else 0.0
        if classes[top] == image.label:
            continue
        reasons = (["disputed"] if pooled[n, top] >= cutoff else []) + (["twin under another label"]
                                                                        if n in conflicted else [])
        if reasons:
            twins = [Twin(images[m].id, images[m].name, images[m].label) for m in members[int(groups[n])] if m != n]
            suspects.append(Suspect(image.id, image.name, image.label, classes[top], float(pooled[n, top]), own,
                                    reasons, twins))
    suspects.sort(key=lambda s: (-s.probability, s.label_probability, s.id))
    used_folds = len(group_folds(labels[judged], groups[judged], folds))  # fewer when a class is smaller
    return AuditReport(backbone, len(images), counts, cutoff, used_folds, best_c, suspects, small,
                       [[Twin(images[n].id, images[n].name, images[n].label) for n in ns] for ns in conflicts],
                       left_out)


def at_cutoff(report: AuditReport, cutoff: float) -> AuditReport:
    """The report as `audit` makes it at a cut-off at or above the report's own, without computing it again."""
    if not report.cutoff <= cutoff <= 1:
        raise BadInput(f"the cut-off must be from {report.cutoff:g} to 1, got {cutoff}")
    suspects = [replace(s, reasons=reasons) for s in report.suspects
                if (reasons := [r for r in s.reasons if r != "disputed" or s.probability >= cutoff])]
    return replace(report, cutoff=cutoff, suspects=suspects)


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = FOLDS, seed: int = 0,
                              C: float | None = None) -> tuple[list[str], np.ndarray, float]:
    """(classes, probabilities (n, classes), C): each image's calibrated class probabilities from the linear SVM
    that train fits (C by its cross-validated grid unless given), trained on the other folds; near-duplicate
    groups stay in one fold."""
    if C is None:
        _, C, _, held_out = cross_validated_svm(X, y, groups, C_GRID, folds, seed)
    else:
        held_out = held_out_scores(linear_svm(seed, C), l2_normalize(X), y, groups, group_folds(y, groups, folds, seed))
    classes = sorted(set(y.tolist()))
    temperature = fit_temperature(held_out, np.searchsorted(classes, y))
    return classes, softmax(held_out / temperature, axis=1), float(C)


def default_backbone(store: Store) -> str:
    """The latest model's backbone, else the one with the most features."""
    try:
        return store.model().backbone
    except NotReady:
        counts = store.feature_counts()
        if not counts:
            raise NotReady("no features: run 'image-similarity featurize' first") from None
        return max(counts, key=counts.get)


def relabel(store: Store, image_id: int, label: str, new_class: bool = False) -> tuple[str | None, str]:
    """Give an image another label, or an unlabelled image its first (issue 29); (old label or None, new label).
    The label must be a stored class unless `new_class`."""
    rows = {im.id: im for im in store.images()}
    if image_id not in rows:
        raise NotFound(f"no image with id {image_id}")
    classes = sorted({im.label for im in rows.values() if im.label is not None})
    if not new_class and label not in classes:
        raise BadInput(f"unknown label {label!r}: use one of {', '.join(classes)} (or allow a new class)")
    if not label.strip() or "/" in label or "\\" in label or not label.isprintable():
        raise BadInput(f"bad label {label!r}: no slashes, control characters or blank labels")
    store.relabel_image(image_id, label)
    return rows[image_id].label, label


def remove(store: Store, image_id: int) -> None:
    """Remove an image with its features, split row and neighbours."""
    if not store.remove_image(image_id):
        raise NotFound(f"no image with id {image_id}")


def apply_suggestions(store: Store, report: AuditReport) -> int:
    """Relabel every suspect to the class the model suggests; the number relabelled."""
    for suspect in report.suspects:
        store.relabel_image(suspect.id, suspect.suggested)
    return len(report.suspects)
