"""Split: a stratified, seeded train/test split that keeps near-duplicate images on one side."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.dedup import NEAR_DUPLICATE_DISTANCE, near_duplicate_groups
from ..errors import BadInput, NotReady
from ..store import ImageRow, Store
from .classes import MIN_TRAIN_PHOTOS, ClassCount, split_notes, unlabelled

TEST_FRACTION = 0.25
"""The share of each class a split holds out for testing, unless told otherwise."""


def split_images(images: Sequence[ImageRow], test_fraction: float = TEST_FRACTION, seed: int = 0,
                 max_distance: int = NEAR_DUPLICATE_DISTANCE) -> dict[int, str]:
    """image id -> 'train' or 'test'.

    Near-duplicate groups (dhash within `max_distance`) are the unit of assignment, so no test image has a
    twin in training. Groups are stratified by their majority label: each class gets about `test_fraction`
    of its images in test, and keeps at least MIN_TRAIN_PHOTOS groups (or all it has) in training, so that a class
    too small to be both learnt and measured is learnt (classes.py).
    """
    if not 0 < test_fraction < 1:
        raise BadInput(f"test fraction must be between 0 and 1, got {test_fraction}")
    groups = near_duplicate_groups([im.dhash for im in images], max_distance)
    members: dict[int, list[ImageRow]] = defaultdict(list)
    for image, group in zip(images, groups):
        members[int(group)].append(image)
    by_class: dict[str, list[int]] = defaultdict(list)
    for group, rows in sorted(members.items()):
        by_class[Counter(r.label for r in rows).most_common(1)[0][0]].append(group)

    rng = np.random.default_rng(seed)
    subsets: dict[int, str] = {}
    for label in sorted(by_class):
        class_groups = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        total = sum(len(members[g]) for g in class_groups)
        target, n_test = round(test_fraction * total), 0
        for i, group in enumerate(class_groups):
            size = len(members[group])
            reserved = i >= len(class_groups) - MIN_TRAIN_PHOTOS
            to_test = not reserved and abs(n_test + size - target) < abs(n_test - target)
            n_test += size if to_test else 0
            for row in members[group]:
                subsets[row.id] = "test" if to_test else "train"
    return subsets


def split(store: Store, test_fraction: float = TEST_FRACTION, seed: int = 0) -> dict[str, int]:
    """Split the stored labelled images and save the split; return the count per subset, and of the unlabelled
    images left out ("unlabelled")."""
    return split_report(store, test_fraction, seed).counts


def notes(store: Store) -> dict[str, dict[str, ClassCount]]:
    """The stored split's classes that a later step leaves out (classes.split_notes)."""
    return _notes([im for im in store.images() if im.label is not None], store.split())


def _notes(labelled: list[ImageRow], subsets: dict[int, str]) -> dict[str, dict[str, ClassCount]]:
    images = [im for im in labelled if im.id in subsets]
    return split_notes([im.label for im in images], [im.dhash for im in images], [subsets[im.id] for im in images])


@dataclass(frozen=True)
class SplitReport:
    """What a split did: the count per subset (and of the unlabelled images left out), and the classes a later step
    leaves out."""

    counts: dict[str, int]
    notes: dict[str, dict[str, ClassCount]]


def split_report(store: Store, test_fraction: float = TEST_FRACTION, seed: int = 0) -> SplitReport:
    """Split the stored labelled images and save the split, reading them once; report it (`split`, `notes`)."""
    images = store.images()
    labelled = [im for im in images if im.label is not None]
    if not images:
        raise NotReady("no images stored: run 'image-similarity ingest DIR' first")
    if not labelled:
        raise NotReady(f"no labelled images stored ({len(images)} unlabelled): ingest some with labels first")
    subsets = split_images(labelled, test_fraction, seed)
    store.put_split(subsets, seed, test_fraction)
    counts = {**Counter(subsets.values()), "unlabelled": unlabelled([im.label for im in images])}
    return SplitReport(counts, _notes(labelled, subsets))
