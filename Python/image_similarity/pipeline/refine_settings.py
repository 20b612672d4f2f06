"""How refine.py trains a network, apart from the training itself: the command line reads the defaults without
loading torch (SQL Server's runtime profile in CI has none: docs/sqlserver-setup.md)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """How refine trains. Every field is stored with the network; a rerun with equal settings resumes."""

    epochs: int = 6
    batch_size: int = 32
    image_size: int = 160  # training crops; featurize still feeds the base network its own size (224)
    head_lr: float = 3e-3
    backbone_lr: float = 3e-4
    weight_decay: float = 0.02
    label_smoothing: float = 0.1
    dropout: float = 0.2
    freeze: float = 0.4  # share of the backbone's parameter tensors, from the input side, left as they are
    val_fraction: float = 0.15
    patience: int = 3  # epochs without a better validation score before stopping
    flip_average: bool = True  # featurize as the mean of the image's and its mirror image's features
