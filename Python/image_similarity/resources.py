"""Where the bundled sample data set lives."""
from __future__ import annotations

from pathlib import Path

from .errors import NotFound

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATASET = REPO_ROOT / "Resources" / "fashion-texture"


def sample_dataset() -> Path:
    """The bundled fashion-texture folder (557 photos, 3 classes); FileNotFoundError outside a checkout."""
    if not SAMPLE_DATASET.is_dir():
        raise NotFound(f"bundled data not found at {SAMPLE_DATASET}: pass a folder of class sub-folders")
    return SAMPLE_DATASET
