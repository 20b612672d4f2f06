"""A 16-bit copy (float16 or bfloat16) of a large float32 matrix: inner products with every row from half the bytes,
each with a proven bound on its error, so an exact search needs to re-score in float32 only the rows that can still
win; and the choice of scan kernel, by what this machine measurably runs fastest."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.machine import best_times, measured_choice

SAFETY = 1.25  # the bound below, proven for any summation order, times this (rounding of the final scaling etc.)
BLOCK = 8_192  # rows converted at a time: no full-size float32 temporary
MAX_SCAN_RATIO = 0.85
"""A 16-bit kernel is chosen only if its scan measures at most this fraction of the float32 mat-vec's time, so the
bound check and re-scoring cannot make exact search slower than the plain float32 scan."""
FLOAT32_TINY = np.finfo(np.float32).tiny
PROBE_SHAPE = (32_768, 1_024)  # 128 MiB in float32: larger than caches, like a real catalogue


@dataclass(frozen=True)
class Kernel:
    """A 16-bit storage type, by name ("fp16", "bf16"): `unit` its unit roundoff, `tiny` the largest absolute
    rounding error of a number below its normal range (float16: its subnormal spacing; bfloat16: its smallest
    normal, as AMX flushes bfloat16 subnormals to zero)."""

    name: str
    dtype: torch.dtype
    unit: float
    tiny: float


KERNELS = {k.name: k for k in (Kernel("fp16", torch.float16, 2.0 ** -11, 2.0 ** -24),
                               Kernel("bf16", torch.bfloat16, 2.0 ** -8, 2.0 ** -126))}
"""Both mat-vecs accumulate in float32 on CPU (the measured choice checks the bound on a probe before using one)."""


class HalfMatrix:
    """Rows divided by a power of two at least the largest row norm (exact; no overflow: every |row| <= 1) and
    stored in a 16-bit type.

    Error of one inner product of a unit vector v with a stored row x (|x| <= 1), n = dim, u = unit roundoff:
    rounding v and x costs at most (2u + u^2) sum|v_i x_i| <= (2u + u^2)|x| (Cauchy-Schwarz), float32 accumulation
    n 2^-24 |x|, rounding the result to 16 bits u/(1-u) |result|, and numbers below the normal range (2 sqrt(n) + n + 1)
    tiny. The dot's bound is that, times SAFETY, times |v| and the scale.
    """

    def __init__(self, matrix: np.ndarray, kernel: str = "fp16") -> None:
        self.kernel = KERNELS[kernel]
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
        self.scale = 2.0 ** math.ceil(math.log2(norms.max(initial=0.0) or 1.0))
        self.half = torch.empty(matrix.shape, dtype=self.kernel.dtype)
        for start in range(0, len(matrix), BLOCK):
            block = torch.from_numpy(matrix[start:start + BLOCK]) * (1 / self.scale)
            self.half[start:start + BLOCK] = block.to(self.kernel.dtype)
        dim, u = matrix.shape[1], self.kernel.unit
        accumulation = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
        self.row_slack = (SAFETY * ((2 * u + u * u + accumulation) * norms / self.scale
                                    + (2 * math.sqrt(dim) + dim + 1) * self.kernel.tiny)).astype(np.float32)
        self.result_slack = np.float32(SAFETY * u / (1 - u))

    def dot(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approximate inner products of `vector` with every row, and a bound on each one's error."""
        vector = np.asarray(vector, dtype=np.float64)  # float32 squares of tiny entries would underflow to 0
        size = float(np.linalg.norm(vector))
        if size == 0:
            return np.zeros(len(self.row_slack), dtype=np.float32), np.zeros_like(self.row_slack)
        unit = torch.from_numpy((vector / size).astype(np.float32)).to(self.kernel.dtype)
        approx = torch.mv(self.half, unit).float().numpy()
        factor = np.float32(size * self.scale)
        # plus float32's smallest normal: the scaled results and bounds are float32, which may underflow
        return approx * factor, (self.row_slack + self.result_slack * np.abs(approx)) * factor + FLOAT32_TINY


def scan_kernel() -> str:
    """The exact-scan kernel for this machine ("fp32", "fp16" or "bf16"), measured once and cached."""
    return measured_choice("exact scan kernel", choose_kernel)


def choose_kernel() -> str:
    """The fastest 16-bit kernel whose bound holds on the probe, if it scans in at most MAX_SCAN_RATIO of the
    float32 mat-vec's time; else "fp32" (a plain scan)."""
    timings = kernel_timings()
    fastest = min(timings, key=timings.get)
    return fastest if timings[fastest] <= MAX_SCAN_RATIO * timings["fp32"] else "fp32"


def kernel_timings() -> dict[str, float]:
    """Seconds of one scan of a probe matrix: the float32 mat-vec and each 16-bit kernel whose bound holds on it."""
    probe = np.random.default_rng(0).random(PROBE_SHAPE, dtype=np.float32)
    vector = probe[1] + np.float32(0.01)
    matrix, torch_vector = torch.from_numpy(probe), torch.from_numpy(vector)
    runs = {"fp32": lambda: torch.mv(matrix, torch_vector)}  # as fast as numpy's float32 mat-vec
    checked = slice(0, BLOCK)
    exact = probe[checked] @ vector.astype(np.float64)
    for name in KERNELS:
        half = HalfMatrix(probe, name)
        approx, bound = half.dot(vector)
        if np.all(np.abs(approx[checked] - exact) <= bound[checked]):
            runs[name] = lambda half=half: half.dot(vector)
    return best_times(runs)
