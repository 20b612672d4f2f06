"""The rule for small and lopsided catalogues, defined once: how many photos a class needs for each step.

Photos are counted as distinct photos, near duplicates once (the split and the cross-validation folds keep them
together). A class is learnt (train, refine) from `MIN_TRAIN_PHOTOS` distinct photos in the training split, and
measured (evaluate) from `MIN_TEST_IMAGES` test image; the split keeps `MIN_TRAIN_PHOTOS` of each class in
training before it puts any in test. A class with fewer is left out of that step, named with its count in the
step's report; a step stops (BadInput, one line) only when fewer than `MIN_CLASSES` classes remain to learn.
See docs/small-classes.md.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.dedup import near_duplicate_groups
from ..errors import BadInput

MIN_CLASSES = 2
"""Classes a step that learns needs: one class is nothing to tell apart."""
MIN_TRAIN_PHOTOS = 2
"""Distinct photos of a class in the training split for train and refine to learn it: cross-validation must see
the class on both sides of every fold."""
MIN_TEST_IMAGES = 1
"""Test images of a learnt class for evaluate to measure it."""
SHOWN = 5
"""Classes named in one line; the rest are counted."""


@dataclass(frozen=True)
class ClassCount:
    """How many images a class has, and how many distinct photos (near-duplicate groups) they are."""

    images: int
    photos: int

    def __str__(self) -> str:
        text = f"{self.images} image{'s' * (self.images != 1)}"
        return text + (f", {self.photos} distinct" if self.photos != self.images else "")


def class_counts(labels: Sequence[str], dhashes: Sequence[str]) -> dict[str, ClassCount]:
    """Images and distinct photos per class, sorted by class (a near-duplicate group counts once per class in it)."""
    groups: dict[str, set[int]] = defaultdict(set)
    images: dict[str, int] = defaultdict(int)
    for label, group in zip(labels, near_duplicate_groups(list(dhashes))):
        groups[label].add(int(group))
        images[label] += 1
    return {label: ClassCount(images[label], len(groups[label])) for label in sorted(images)}


def named(counts: dict[str, ClassCount]) -> str:
    """'striped (1 image), ...': the first SHOWN classes with their counts, then how many more."""
    items = [f"{label} ({count})" for label, count in counts.items()]
    more = len(items) - SHOWN
    return ", ".join(items[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def learnable(labels: Sequence[str], dhashes: Sequence[str], step: str) -> tuple[list[str], dict[str, ClassCount]]:
    """(classes `step` learns, {class left out: its count}) of the training images; BadInput, one line, when fewer
    than MIN_CLASSES classes have MIN_TRAIN_PHOTOS distinct photos."""
    counts = class_counts(labels, dhashes)
    left_out = {c: n for c, n in counts.items() if n.photos < MIN_TRAIN_PHOTOS}
    kept = [c for c in counts if c not in left_out]
    if len(kept) < MIN_CLASSES:
        have = f"only {named({c: counts[c] for c in kept})} has" if kept else "none has"
        raise BadInput(f"{step} needs {MIN_CLASSES} classes with at least {MIN_TRAIN_PHOTOS} distinct photos each in "
                       f"the training split, {have} that many" + (f"; too few: {named(left_out)}" if left_out else ""))
    return kept, left_out


def as_params(left_out: dict[str, ClassCount]) -> dict[str, dict[str, int]]:
    """The left-out classes as plain JSON for a model's or network's params."""
    return {c: {"images": n.images, "photos": n.photos} for c, n in left_out.items()}


def from_params(params: dict) -> dict[str, ClassCount]:
    """The left-out classes stored by `as_params` (none for models trained before the rule)."""
    return {c: ClassCount(n["images"], n["photos"]) for c, n in params.get("left_out", {}).items()}


def unlabelled(labels: Sequence[str | None]) -> int:
    """How many images have no label (issue 29): searched like any other, but never learnt or measured."""
    return sum(label is None for label in labels)


def unlabelled_note(count: int) -> str:
    """'left out 12 unlabelled images', or '' for none."""
    return f"left out {count} unlabelled image{'s' * (count != 1)}" if count else ""


NOT_LEARNT = f"left out of train and refine (fewer than {MIN_TRAIN_PHOTOS} distinct photos)"
NOT_MEASURED = "not measured by evaluate (no test image)"


def split_notes(labels: Sequence[str], dhashes: Sequence[str],
                subsets: Sequence[str]) -> dict[str, dict[str, ClassCount]]:
    """What a split means for the later steps: {NOT_LEARNT: classes, NOT_MEASURED: learnt classes}, each class
    with its count of images (no entry when every class is learnt and measured)."""
    counts = class_counts(labels, dhashes)
    training = [(label, h) for label, h, s in zip(labels, dhashes, subsets) if s == "train"]
    train = class_counts([label for label, _ in training], [h for _, h in training])
    tested = Counter(label for label, s in zip(labels, subsets) if s == "test")
    not_learnt = {c: n for c, n in counts.items() if c not in train or train[c].photos < MIN_TRAIN_PHOTOS}
    not_measured = {c: n for c, n in counts.items() if c not in not_learnt and tested[c] < MIN_TEST_IMAGES}
    return {k: v for k, v in ((NOT_LEARNT, not_learnt), (NOT_MEASURED, not_measured)) if v}
