"""A float16 copy of a large float32 matrix: inner products with every row from half the bytes, each with a
proven bound on its error, so an exact search needs to re-score in float32 only the rows that can still win."""
from __future__ import annotations

import math

import numpy as np
import torch

RELATIVE_ERROR = 2.0 ** -8
"""Bound on |approximate - exact| of v . x relative to |v| |x|: float16 rounding of v, of x and of the result
(3 x 2^-11) plus float32 accumulation in torch's float16 mat-vec, about 2.5 times over."""
BLOCK = 8_192  # rows converted at a time: no full-size float32 temporary


class HalfMatrix:
    """Rows divided by a power of two at least the largest row norm (exact; no overflow: every |row| <= 1) and
    stored in float16."""

    def __init__(self, matrix: np.ndarray) -> None:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
        self.scale = 2.0 ** math.ceil(math.log2(norms.max(initial=0.0) or 1.0))
        self.half = torch.empty(matrix.shape, dtype=torch.float16)
        for start in range(0, len(matrix), BLOCK):
            block = torch.from_numpy(matrix[start:start + BLOCK]) * (1 / self.scale)
            self.half[start:start + BLOCK] = block.to(torch.float16)
        # per row, times |v|: the relative bound, plus float16 subnormals' absolute error (2^-25 per term)
        subnormal = self.scale * (np.sqrt(matrix.shape[1]) + 1) * 2.0 ** -24
        self.slack = (RELATIVE_ERROR * norms + subnormal).astype(np.float32)

    def dot(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approximate inner products of `vector` with every row, and a bound on each one's error."""
        size = float(np.linalg.norm(vector))
        if size == 0:
            return np.zeros(len(self.slack), dtype=np.float32), np.zeros_like(self.slack)
        unit = torch.from_numpy(np.asarray(vector / size, dtype=np.float32)).to(torch.float16)
        approx = torch.mv(self.half, unit).float().numpy()
        return approx * np.float32(size * self.scale), self.slack * np.float32(size)
