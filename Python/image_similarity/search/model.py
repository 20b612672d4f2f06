"""The similarity model: a linear SVM's class scores, their calibration and a discriminant embedding over
L2-normalised features, and how it is stored (pipeline/train.py fits it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import softmax

from ..errors import NotReady
from ..store import ModelRecord


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass
class SimilarityModel:
    """A one-vs-rest linear SVM over L2-normalised features, its calibration, and a discriminant embedding.

    `coef`/`intercept` score each class; `temperature` turns the scores into class probabilities (a softmax of
    score / temperature, fitted on cross-validated scores); `embedding` (dim x k) projects centred normalised
    features (`embedding_mean`) onto the directions that best separate the training classes. Models trained
    before these existed load with `temperature`/`embedding` None; the methods that need them ask to retrain.
    """

    backbone: str
    classes: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    temperature: float | None = None
    embedding: np.ndarray | None = None
    embedding_mean: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    version: int | None = None

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores (n, n_classes)."""
        return l2_normalize(X) @ self.coef.T + self.intercept

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class labels."""
        return np.asarray(self.classes)[self.decision_function(X).argmax(axis=1)]

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (n, n_classes)."""
        self._require(self.temperature, "class probabilities")
        return softmax(self.decision_function(X) / self.temperature, axis=1).astype(np.float32)

    def embed(self, X: np.ndarray) -> np.ndarray:
        """Features in the discriminant embedding (n, k)."""
        self._require(self.embedding, "the learned embedding")
        return (l2_normalize(X) - self.embedding_mean) @ self.embedding

    def _require(self, part: Any, what: str) -> None:
        if part is None:
            raise NotReady(f"model version {self.version} has no {what} (trained by an older release): "
                             "run 'image-similarity train' again")

    def to_record(self) -> ModelRecord:
        arrays = {"coef": self.coef, "intercept": self.intercept, "temperature": np.array([self.temperature]),
                  "embedding": self.embedding, "embedding_mean": self.embedding_mean}
        return ModelRecord(backbone=self.backbone, classes=self.classes, arrays=arrays, params=self.params)

    @classmethod
    def from_record(cls, record: ModelRecord) -> SimilarityModel:
        a = record.arrays
        return cls(backbone=record.backbone, classes=record.classes, coef=a["coef"], intercept=a["intercept"],
                   temperature=float(a["temperature"][0]) if "temperature" in a else None,
                   embedding=a.get("embedding"), embedding_mean=a.get("embedding_mean"),
                   params=record.params, version=record.version)
