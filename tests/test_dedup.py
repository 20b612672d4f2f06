"""Tests for image_similarity.core.dedup: dHash, Hamming distances and near-duplicate groups."""

from __future__ import annotations

import io
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_similarity.core import dedup
from image_similarity.core.dedup import (
    NEAR_DUPLICATE_DISTANCE,
    dhash,
    hamming,
    hamming_matrix,
    near_duplicate_groups,
)
from image_similarity.core.images import decode_image

DATA = Path(__file__).resolve().parents[1] / "Resources" / "fashion-texture"


@pytest.fixture(scope="module")
def bundled():
    """(class, RGB image, dhash) for every bundled photo."""
    rows = []
    for path in sorted(DATA.glob("*/*.jpg")):
        image = decode_image(path.read_bytes())
        rows.append((path.parent.name, image, dhash(image)))
    return rows


def random_hashes(rng: np.random.Generator, n: int, bits: int = 256) -> list[str]:
    return [f"{int(''.join(map(str, row)), 2):0{-(-bits // 4)}x}" for row in rng.integers(0, 2, (n, bits))]


def flip(hash_: str, positions) -> str:
    value = int(hash_, 16)
    for position in positions:
        value ^= 1 << int(position)
    return f"{value:0{len(hash_)}x}"


def reference_groups(hashes: list[str], max_distance: int) -> list[set[int]]:
    """Connected components by plain depth-first search over pairwise hamming()."""
    unseen, components = set(range(len(hashes))), []
    while unseen:
        stack, component = [unseen.pop()], set()
        while stack:
            i = stack.pop()
            component.add(i)
            near = {j for j in unseen if hamming(hashes[i], hashes[j]) <= max_distance}
            unseen -= near
            stack.extend(near)
        components.append(component)
    return components


def as_sets(groups: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(groups == g).tolist()) for g in np.unique(groups)}


def test_dhash_bits_row_major_most_significant_first():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 17), dtype=np.uint8)  # already (hash_size + 1, hash_size): no resampling
    bits = "".join("1" if right > left else "0" for row in pixels for left, right in itertools.pairwise(row))
    assert dhash(Image.fromarray(pixels)) == f"{int(bits, 2):064x}"


@pytest.mark.parametrize(("hash_size", "expected"), [(16, "f" * 64), (8, "f" * 16), (3, "1ff")])
def test_dhash_of_gradient(hash_size, expected):
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))).convert("RGB")
    assert dhash(gradient, hash_size) == expected
    assert dhash(gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size) == "0" * len(expected)


def test_dhash_rejects_tiny_hash_size():
    with pytest.raises(ValueError, match="hash_size"):
        dhash(Image.new("RGB", (8, 8)), 1)


def test_hamming():
    assert hamming("00ff", "00ff") == 0
    assert hamming("00ff", "01fe") == 2
    assert hamming("f" * 64, "0" * 64) == 256
    with pytest.raises(ValueError, match="length"):
        hamming("00", "000")


@pytest.mark.parametrize("bits", [256, 64, 9])
def test_hamming_matrix_agrees_with_hamming(bits):
    hashes = random_hashes(np.random.default_rng(bits), 12, bits)
    others = hashes[:5]
    matrix = hamming_matrix(hashes)
    assert matrix.shape == (12, 12)
    assert np.issubdtype(matrix.dtype, np.integer)
    assert (matrix == matrix.T).all() and (np.diag(matrix) == 0).all()
    assert matrix.tolist() == [[hamming(a, b) for b in hashes] for a in hashes]
    assert hamming_matrix(hashes, others).tolist() == [[hamming(a, b) for b in others] for a in hashes]
    assert hamming_matrix([], others).shape == (0, 5)


@pytest.mark.parametrize("bits", [256, 64, 9])
def test_hamming_to_runs_on_the_numpy_sql_servers_runtime_has(bits, monkeypatch):
    """Defect 2 (issue 27): SQL Server's Python runs revoscalepy with numpy 1.22.0, which has no
    np.bitwise_count (numpy 2): the package supports numpy 1.22.0 (pyproject) and counts bits without it."""
    hashes = random_hashes(np.random.default_rng(bits), 40, bits)
    expected = [hamming(hashes[0], h) for h in hashes]
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert dedup.hamming_to(hashes[0], dedup.packed_hashes(hashes)).tolist() == expected
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^\s*"numpy>=1\.22\.0",', pyproject, re.MULTILINE)


def test_hamming_matrix_rejects_mixed_lengths():
    with pytest.raises(ValueError, match="length"):
        hamming_matrix(["00ff", "00ff"], ["0f"])


def test_reencoded_and_resized_photos_stay_near(bundled):
    for _, image, hash_ in bundled[::40]:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=70)
        reencoded = decode_image(buffer.getvalue())
        resized = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.Resampling.LANCZOS)
        trimmed = image.crop((1, 1, image.width - 1, image.height - 1))
        for copy in (reencoded, resized, trimmed):
            assert hamming(hash_, dhash(copy)) <= NEAR_DUPLICATE_DISTANCE


def test_photos_of_other_classes_are_far(bundled):
    labels = np.array([label for label, _, _ in bundled])
    distances = hamming_matrix([hash_ for _, _, hash_ in bundled])
    other_class = labels[:, None] != labels[None, :]
    assert distances[other_class].min() > 2 * NEAR_DUPLICATE_DISTANCE
    assert np.median(distances[other_class]) > 100


def test_bundled_photos_have_no_near_duplicates_at_default_threshold(bundled):
    hashes = [hash_ for _, _, hash_ in bundled]
    assert len(set(hashes)) == len(hashes)
    assert near_duplicate_groups(hashes).tolist() == list(range(len(hashes)))
    # The two closest distinct photos (two similar shirts on white) are 21 bits apart.
    sizes = np.bincount(near_duplicate_groups(hashes, max_distance=21))
    assert (sizes.max(), (sizes > 1).sum()) == (2, 1)


def test_groups_identical_and_transitive():
    rng = np.random.default_rng(1)
    a, far = random_hashes(rng, 2)
    b = flip(a, range(10))  # a~b: 10 bits
    c = flip(b, range(10, 20))  # b~c: 10 bits, but a-c: 20 bits > 16
    assert hamming(a, c) > NEAR_DUPLICATE_DISTANCE
    assert near_duplicate_groups([far, c, a, far, b]).tolist() == [0, 1, 1, 0, 1]
    assert near_duplicate_groups([far, c, a, far, b], max_distance=0).tolist() == [0, 1, 2, 0, 3]
    assert near_duplicate_groups([a, a], max_distance=-1).tolist() == [0, 0]
    assert near_duplicate_groups([]).tolist() == []


def test_groups_match_reference_across_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    seeds = random_hashes(rng, 30)
    hashes = [flip(seed, rng.choice(256, rng.integers(0, 12), replace=False)) for seed in seeds for _ in range(4)]
    hashes += hashes[:10]  # exact duplicates
    rng.shuffle(hashes)
    expected = {frozenset(component) for component in reference_groups(hashes, 8)}
    assert len(expected) < 130
    monkeypatch.setattr(dedup, "_BLOCK_ELEMENTS", 7 * len(hashes))  # many 7-row blocks
    blocked = near_duplicate_groups(hashes, max_distance=8)
    assert as_sets(blocked) == expected
    monkeypatch.undo()
    assert near_duplicate_groups(hashes, max_distance=8).tolist() == blocked.tolist()
