"""Numeric precision of a network's forward pass: choose one for a device, and the autocast context for it.

Minimal version for refine (issue 14); issue 16 owns this module and its version replaces this one.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(requested: str, device: torch.device) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") for `requested` on `device`; "auto": fp16 on CUDA,
    bf16 on CPUs with native bfloat16 support, else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on the device; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])
