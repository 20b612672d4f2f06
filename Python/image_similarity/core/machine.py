"""What this machine is (CPU model and flags, torch version, threads) and choices measured on it once, cached per
process and in a small JSON file keyed by all of that, so a speed-up is chosen by measurement, never assumed.
torch is imported by the functions that describe or measure it, not above: searching needs only one_blas_thread, and
the in-database procedures that run no network run without torch (docs/sqlserver-setup.md)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from threadpoolctl import ThreadpoolController

CACHE_ENV = "IMAGE_SIMILARITY_CACHE"
"""Folder of the choices file (default ~/.cache/image-similarity); set it empty to keep choices per process."""
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "f16c")

_measured: dict[str, str] = {}


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU model name and its feature flags (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def describe() -> dict:
    """Where code runs: CPU model, the speed-relevant CPU flags present, torch version, threads."""
    import torch  # lazy: the in-database procedures that run no network run without torch (module docstring)

    model, flags = cpu_info()
    return {"cpu": model, "cpu_flags": [f for f in REPORTED_FLAGS if f in flags], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


KERNEL_CAPS = ("ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
"""Environment variables that cap or pick the kernels oneDNN and OpenBLAS run (torch's own cap,
ATEN_CPU_CAPABILITY, shows in its reported CPU capability)."""


def machine_key() -> str:
    """What a measured choice depends on: CPU model and flags, the kernels torch, oneDNN and OpenBLAS are allowed
    to run, torch version and thread count."""
    import torch  # lazy: the in-database procedures that run no network run without torch (module docstring)

    model, flags = cpu_info()
    flags_digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    caps = "".join(f" | {name}={os.environ[name]}" for name in KERNEL_CAPS if os.environ.get(name))
    return (f"{model} (flags {flags_digest}, {torch.backends.cpu.get_cpu_capability()}{caps}) | "
            f"torch {torch.__version__} | {torch.get_num_threads()} threads")


def cache_dir() -> Path | None:
    """The folder of this machine's measured choices and network exports (None: keep them per process)."""
    folder = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "image-similarity"))
    return Path(folder) if folder else None


def _cache_file() -> Path | None:
    folder = cache_dir()
    return folder / "choices.json" if folder else None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measured_choice(name: str, measure: Callable[[], str]) -> str:
    """The choice `name` for this machine: `measure()` run once, then remembered in this process and the cache file
    (a corrupt or unwritable file is re-measured or skipped, never an error: the choice is then kept per process)."""
    key = f"{name} @ {machine_key()}"
    if key in _measured:
        return _measured[key]
    path = _cache_file()
    stored = _read(path) if path else {}
    choice = stored.get(key)
    if not isinstance(choice, str):
        choice = measure()
        if path:
            write_atomically(path, json.dumps({**stored, key: choice}, indent=1, sort_keys=True).encode())
    _measured[key] = choice
    return choice


def write_atomically(path: Path, data: bytes) -> bool:
    """Replace `path` with `data` whole (a reader never sees half a file); False when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
    except OSError:
        return False
    return True


@cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController().select(user_api="blas")


_hold: dict = {"lock": threading.Lock(), "holders": 0, "limiter": None}


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS held to one thread, for the products of a single query. Its idle threads spin for a while
    after a multi-threaded product and slow whatever torch runs next (here: the next query's forward pass, about
    twice as slow); one thread costs a 10k-row product about 1 ms. The limit is process-wide: with concurrent
    searches (the web service) the first to enter applies it and the last to leave restores the threads."""
    with _hold["lock"]:
        if not _hold["holders"]:
            _hold["limiter"] = _blas().limit(limits=1)
        _hold["holders"] += 1
    try:
        yield
    finally:
        with _hold["lock"]:
            _hold["holders"] -= 1
            if not _hold["holders"]:
                _hold["limiter"].restore_original_limits()


def best_times(runs: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Seconds of the fastest of `repeats` calls of each run after one warm-up, on one torch thread. The runs take
    turns, so they share the machine's noise; one thread and the minimum are what other load disturbs least (a
    multi-threaded kernel waits for its slowest thread, and on a busy machine that is a preempted one)."""
    import torch  # lazy: the in-database procedures that run no network run without torch (module docstring)

    best = {name: float("inf") for name in runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best


def forget() -> None:
    """Drop the choices remembered in this process (the cache file stays)."""
    _measured.clear()
