"""Screening scans of a float32 matrix: the matrix itself, or a 16-bit (float16 or bfloat16, half the bytes) or
8-bit integer (a quarter) copy, whose inner products with a query come each with a proven bound on its error, so an
exact search needs to re-score exactly only the rows that can still win; and the choice of kernel, by what this
machine measurably runs fastest."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

try:
    import torch
except ImportError:  # optional for searching: the float32 scan is then numpy's mat-vec (its bound holds in any
    torch = None  # summation order) and no screening kernel is offered. SQL Server's procedures that rank run so in
    # CI's Python 3.10 profile, which has no torch (docs/sqlserver-setup.md); every other install has torch.

from ..core.machine import best_times, measured_choice

SAFETY = 1.25  # the bound below, proven for any summation order, times this (rounding of the final scaling etc.)
BLOCK = 8_192  # rows converted at a time: no full-size float32 temporary
MAX_SCAN_RATIO = 0.85
"""A screening kernel is chosen only if its scan measures at most this fraction of the float32 mat-vec's time, so the
bound check and re-scoring cannot make exact search slower than the plain float32 scan."""
FLOAT32_TINY = np.finfo(np.float32).tiny
PROBE_SHAPE = (32_768, 1_024)  # 128 MiB in float32: larger than caches, like a real catalogue


@dataclass(frozen=True)
class Kernel:
    """A scan's storage type, by name ("fp32", "fp16", "bf16", "int8"): `unit` its unit roundoff, `tiny` the largest
    absolute rounding error of a number below its normal range (float16: its subnormal spacing; bfloat16 and
    float32: their smallest normal, as a kernel may flush subnormals to zero). `dtype`: torch's name of the type."""

    name: str
    dtype: str
    unit: float
    tiny: float


KERNELS = {k.name: k for k in (Kernel("fp16", "float16", 2.0 ** -11, 2.0 ** -24),
                               Kernel("bf16", "bfloat16", 2.0 ** -8, 2.0 ** -126))}
"""The 16-bit kernels; both mat-vecs accumulate in float32 on CPU (the measured choice checks the bound on a probe
before using one)."""


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
        self.dtype = getattr(torch, self.kernel.dtype)
        self.half = torch.empty(matrix.shape, dtype=self.dtype)
        for start in range(0, len(matrix), BLOCK):
            block = torch.from_numpy(matrix[start:start + BLOCK]) * (1 / self.scale)
            self.half[start:start + BLOCK] = block.to(self.dtype)
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
        unit = torch.from_numpy((vector / size).astype(np.float32)).to(self.dtype)
        approx = torch.mv(self.half, unit).float().numpy()
        factor = np.float32(size * self.scale)
        # plus float32's smallest normal: the scaled results and bounds are float32, which may underflow
        return approx * factor, (self.row_slack + self.result_slack * np.abs(approx)) * factor + FLOAT32_TINY


FP32 = Kernel("fp32", "float32", 2.0 ** -24, 2.0 ** -126)
"""The float32 matrix itself; `tiny` is float32's smallest normal (a kernel may flush subnormals to zero)."""


class Float32Rows:
    """The float32 matrix itself (shared, not copied), scanned by torch's mat-vec: as fast as numpy's, and in the
    thread pool the forward pass uses (numpy's BLAS threads spin after a product and slow the next forward pass);
    numpy's where there is no torch (see the import).

    Error of one inner product of v with a row x, n = dim, in any summation order: gamma_n sum|v_i x_i| <=
    gamma_n |v| |x| with gamma_n = n u / (1 - n u), u = 2^-24, plus (2n + 1) tiny for numbers below the normal
    range. The bound is that, times SAFETY.
    """

    kernel = FP32

    def __init__(self, matrix: np.ndarray) -> None:
        self.rows = np.require(matrix, np.float32, ["C", "W"])
        dim = matrix.shape[1]
        gamma = dim * FP32.unit / (1 - dim * FP32.unit)
        self.row_slack = _up(SAFETY * gamma * np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)))
        self.floor = np.float32(SAFETY * (2 * dim + 1) * FP32.tiny)
        self.largest_slack = self.row_slack.max(initial=0)

    def dot(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of `vector` with every row, and a bound on each one's error."""
        vector = np.asarray(vector, dtype=np.float32)
        if torch is None:
            return self.rows @ vector, self.error(vector)
        return torch.mv(torch.from_numpy(self.rows), torch.from_numpy(vector)).numpy(), self.error(vector)

    def error(self, vector: np.ndarray) -> np.ndarray:
        """A bound on the error of each row's float32 inner product with `vector`, in any summation order (so for
        a matrix product's row as well as a mat-vec)."""
        return self.row_slack * _size(vector) + self.floor + FLOAT32_TINY

    def largest_error(self, vector: np.ndarray) -> np.float32:
        """One bound for every row's error (the largest of `error`'s): adding it keeps the order of the products."""
        return self.largest_slack * _size(vector) + self.floor + FLOAT32_TINY


INT8 = Kernel("int8", "int8", 2.0 ** -24, 0.0)
"""8-bit rows: `unit` is float32's, for the rounding of the scaled results; the integer products are exact."""
SMALLEST_STEP = 6.1e-5
"""The smallest quantization step torch and fbgemm give an input (their SMALL_SCALE_THRESHOLD)."""
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)  # deprecated in torch 2.13, still the fastest int8 mat-vec here


class Int8Matrix:
    """Rows as int8 times a per-row scale (the row's largest magnitude / 127), scanned by torch's dynamically
    quantized linear layer (fbgemm on x86: the query quantized to 7 bits, exact int32 products, scaled back).

    With x = s x' + e (row) and q = q~ + f (the query as the layer quantizes it), q.x - q~.(s x') = q.e + f.(s x'),
    so by Cauchy-Schwarz the error is at most |q| |e| + |f| s |x'|: |e| and s |x'| are kept per row; |f| is at most
    sqrt(m) steps of the query's quantization grid, m its nonzero entries (zero is on the grid; the step is its
    range, zero included, over 127, but at least SMALLEST_STEP; a whole step rather than half of one, for the
    clamping of a rounded zero point; a query whose range is below 1 is first scaled up by a power of two, exactly,
    so the floor does not bind). The layer's float32 scales and results round a few times
    (6 x 2^-24 of the result, 2^-23 of |q| s |x'|). The bound is that, times SAFETY. torch 2.13 marks quantized
    tensors deprecated: without them this kernel is simply not among those measured.
    """

    kernel = INT8

    def __init__(self, matrix: np.ndarray) -> None:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        peak = np.abs(matrix).max(axis=1, initial=0.0).astype(np.float64)
        scale = np.where(peak > 0, peak / 127, 1.0)
        quantized = torch.quantize_per_channel(torch.from_numpy(matrix), torch.from_numpy(scale),
                                               torch.zeros(len(matrix), dtype=torch.long), 0, torch.qint8)
        ints = quantized.int_repr().numpy()
        self.residual = np.empty(len(matrix), dtype=np.float32)  # |e|, rounded up
        self.stored = np.empty(len(matrix), dtype=np.float32)  # s |x'|, rounded up
        for start in range(0, len(matrix), BLOCK):
            rows = slice(start, start + BLOCK)
            kept = scale[rows, None] * ints[rows].astype(np.float64)
            self.residual[rows] = _up(np.linalg.norm(matrix[rows] - kept, axis=1))
            self.stored[rows] = _up(np.linalg.norm(kept, axis=1))
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def dot(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approximate inner products of `vector` with every row, and a bound on each one's error."""
        vector = np.asarray(vector, dtype=np.float32)
        span = float(vector.max(initial=0.0)) - float(vector.min(initial=0.0))
        # a query of range below 1 is scaled up by a power of two (exactly), so that its step stays above the floor
        lift = 2.0 ** min(-math.frexp(span)[1], 100) if 0 < span < 1 else 1.0
        vector, span = vector * np.float32(lift), span * lift
        approx = torch.ops.quantized.linear_dynamic(torch.from_numpy(vector)[None], self.packed, True)[0].numpy()
        size = float(np.linalg.norm(vector.astype(np.float64)))
        step = max(span / 127, SMALLEST_STEP)
        query_error = np.float32(_up(math.sqrt(np.count_nonzero(vector)) * step + 2.0 ** -23 * size))
        bound = SAFETY * (np.float32(_up(size)) * self.residual + query_error * self.stored
                          + np.float32(6 * 2.0 ** -24) * np.abs(approx))
        unlift = np.float32(1 / lift)
        return approx * unlift, bound * unlift + FLOAT32_TINY


def _size(vector: np.ndarray) -> np.float32:
    """A vector's norm as float32, rounded up."""
    return np.float32(_up(np.linalg.norm(np.asarray(vector, dtype=np.float64))))


def _up(values: np.ndarray | float) -> np.ndarray:
    """float64 norms as float32, rounded up past their own rounding error."""
    return (np.asarray(values) * (1 + 2.0 ** -20)).astype(np.float32) + FLOAT32_TINY


SCREENING = (*KERNELS, INT8.name)
"""The screening kernels, by name."""


def screening_copy(matrix: np.ndarray, kernel: str) -> Float32Rows | HalfMatrix | Int8Matrix:
    """What an exact search scans `matrix` through, by kernel name: "fp32" (the matrix itself), "fp16", "bf16" or
    "int8" (a copy)."""
    if kernel == FP32.name:
        return Float32Rows(matrix)
    return Int8Matrix(matrix) if kernel == INT8.name else HalfMatrix(matrix, kernel)


def scan_kernel() -> str:
    """The exact-scan kernel for this machine ("fp32", "fp16", "bf16" or "int8"), measured once and cached."""
    if torch is None:
        return FP32.name
    # the candidates are part of the name: a cache measured before a kernel existed is measured again
    return measured_choice(f"exact scan kernel of fp32, {', '.join(SCREENING)}", choose_kernel)


def choose_kernel() -> str:
    """The fastest screening kernel whose bound holds on the probe, if it scans in at most MAX_SCAN_RATIO of the
    float32 mat-vec's time; else "fp32" (a plain scan)."""
    timings = kernel_timings()
    fastest = min(timings, key=timings.get)
    return fastest if timings[fastest] <= MAX_SCAN_RATIO * timings["fp32"] else "fp32"


def kernel_timings() -> dict[str, float]:
    """Seconds of one scan of a probe matrix: the float32 mat-vec and each screening kernel that runs here and
    whose bound holds on the probe."""
    probe = np.random.default_rng(0).random(PROBE_SHAPE, dtype=np.float32)
    vector = probe[1] + np.float32(0.01)
    matrix, torch_vector = torch.from_numpy(probe), torch.from_numpy(vector)
    runs = {"fp32": lambda: torch.mv(matrix, torch_vector)}  # as fast as numpy's float32 mat-vec
    checked = slice(0, BLOCK)
    exact = probe[checked] @ vector.astype(np.float64)
    for name in SCREENING:
        try:
            copy = screening_copy(probe, name)
            approx, bound = copy.dot(vector)
        except (RuntimeError, AttributeError, NotImplementedError):  # a torch without this kernel here
            continue
        if np.all(np.abs(approx[checked] - exact) <= bound[checked]):
            runs[name] = lambda copy=copy: copy.dot(vector)
    return best_times(runs)
