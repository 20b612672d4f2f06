"""Numeric precision of a network's forward pass, chosen per machine: bfloat16 autocast on CPUs that measurably run
it fast (AMX, AVX-512 BF16), float16 mixed precision on CUDA, float32 elsewhere."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..core.machine import best_times, measured_choice
from ..errors import BadInput
from .specs import PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_SPEEDUP = 1.3
"""bfloat16 is chosen on a CPU only when it runs the probe network at least this many times faster than float32."""


def resolve(requested: str, device: torch.device) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") that `requested` (one of PRECISIONS) means on `device`."""
    if requested not in PRECISIONS:
        raise BadInput(f"unknown precision {requested!r}: choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_bf16_supported():
        return measured_choice("cpu forward precision", choose_cpu_precision)
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A context running the forward pass at `precision` (a concrete one): autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"not a concrete precision: {precision!r}")
    return torch.autocast(device.type, dtype=DTYPES[precision])


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 BF16 / AMX, or emulated on AVX-512)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check: assume none
        return False


def probe_network() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small stand-in for an image CNN (a depthwise and two pointwise convolutions, channels-last) and its input."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.nn.Conv2d(64, 256, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(256, 64, 1)).eval().to(memory_format=torch.channels_last)
    return net, torch.randn(8, 64, 56, 56).to(memory_format=torch.channels_last)


def bf16_speedup() -> float:
    """How many times faster the probe network runs under CPU bfloat16 autocast than in float32 (one measurement)."""
    net, x = probe_network()
    cpu = torch.device("cpu")

    def forward(precision: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(precision, cpu):
                net(x)
        return run

    timings = best_times({"fp32": forward("fp32"), "bf16": forward("bf16")})
    return timings["fp32"] / timings["bf16"]

def choose_cpu_precision() -> str:
    """bf16 when it measures at least MIN_SPEEDUP times faster than fp32 here, else fp32."""
    return "bf16" if bf16_speedup() >= MIN_SPEEDUP else "fp32"

