"""What runs a network's forward pass on a CPU, chosen per machine by measurement as the precision is: torch (float32,
or the bfloat16 trace where that precision was chosen), ONNX Runtime's CPU provider or OpenVINO's CPU plugin, both
running an ONNX export of the very same module (backbones.FeatureExtractor: there is no second definition of any
network) at float32. Exports are cached on disk beside the measured choices, named by a hash of the network's
weights, so a refined network gets its own."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.machine import cache_dir, measured_choice, write_atomically
from ..errors import BadInput, Unavailable
from .backbones import FeatureExtractor
from .precision import MIN_SPEEDUP as REDUCED_PRECISION_SPEEDUP
from .specs import RUNTIMES

EXPORTED = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
"""The runtimes that run the network's ONNX export (at float32, on the CPU), by module name: their names for people."""
MIN_SPEEDUP = 1.05
"""An exported runtime is chosen only when it runs the network at least this many times faster than torch (the
reference) at float32."""
ROUNDS = 5
PROBE_BATCH = 32
"""Images per timed call: featurize's batch (pipeline/steps.BATCH_SIZE). The runtimes rank differently by batch size
(MobileNetV2 on the AMD EPYC: ONNX Runtime and OpenVINO tie at 8, ONNX Runtime is 1.14x OpenVINO at 32, torch's
bfloat16 trace the fastest at 8 and the slowest at 32: docs/runtimes.md)."""
PAUSE_S = 0.05
"""Between two timed calls: the previous runtime's idle worker threads stop spinning and sleep meanwhile, so they do
not slow the next runtime's call."""
OPSET = 17
EXPORTS = "onnx"
"""The folder of the exports inside the cache folder (core.machine.cache_dir)."""

# torch marks the TorchScript-based exporter deprecated; it is the one that needs no onnxscript (docs/runtimes.md)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch\.onnx\.|image_similarity\.features\.)")

_said: set[str] = set()


def say_once(line: str) -> None:
    """Print a fallback's one line to stderr, once per process."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


def network_hash(extractor: FeatureExtractor) -> str:
    """16 hex digits of SHA-256 over what the network computes from: its spec, flip averaging and every weight."""
    digest = hashlib.sha256(f"{extractor.spec}|flip_average={extractor.flip_average}".encode())
    for key, tensor in extractor.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{key}|{value.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def export_path(digest: str) -> Path | None:
    """Where the export of the network with hash `digest` is cached (None: exports are kept per process)."""
    folder = cache_dir()
    return folder / EXPORTS / f"{digest}-torch{torch.__version__}-opset{OPSET}.onnx" if folder else None


def export(extractor: FeatureExtractor, digest: str) -> bytes:
    """The ONNX model of `extractor` (uint8 NHWC images of any batch size in, float32 features out), written to the
    cache when there is one. Unavailable when torch cannot export it."""
    side = extractor.spec.input_size
    example = torch.zeros(2, side, side, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        torch.onnx.export(extractor, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    except Exception as err:  # any exporter failure means: run on torch
        raise Unavailable(f"the ONNX export of {extractor.spec.name} failed ({_line(err)})") from err
    path = export_path(digest)
    if path is not None:
        with contextlib.suppress(OSError):  # a cache this process may not write (another user's): kept in memory
            write_atomically(path, buffer.getvalue())
    return buffer.getvalue()


def _line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


class OnnxNetwork:
    """An ONNX Runtime session on the CPU running a network's export, called as the module is: a uint8 image tensor
    in, float32 features out. Sessions may run concurrently (ONNX Runtime's run is thread-safe)."""

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime  # lazy: an optional runtime, imported only where the network runs

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # as many as torch has: a Spark task's cores, a server's setting
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["features"], {"images": images.cpu().numpy()})[0])


class OpenVinoNetwork:
    """A network's export compiled by OpenVINO for the CPU at float32 (its default hint on a bfloat16 CPU is bfloat16,
    whose MobileNetV2 features fell to cosine 0.988: docs/runtimes.md), called as the module is. One inference
    request per calling thread, so calls may run concurrently."""

    def __init__(self, model: bytes, threads: int) -> None:
        import openvino  # lazy: an optional runtime, imported only where the network runs

        core = openvino.Core()
        self.compiled = core.compile_model(core.read_model(model), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        self.local = threading.local()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        # the output lives in the request's memory, which its next call overwrites: copied
        return torch.from_numpy(request.infer({0: images.cpu().numpy()})[0].copy())


NETWORKS: dict[str, Callable[[bytes, int], Callable[[torch.Tensor], torch.Tensor]]] = {
    "onnxruntime": OnnxNetwork, "openvino": OpenVinoNetwork}


def runtime_version(runtime: str) -> str:
    """The installed version of an exported runtime (a key of EXPORTED); Unavailable when it is not installed."""
    try:
        module = __import__(runtime)
    except ImportError as err:
        raise Unavailable(f"{EXPORTED[runtime]} is not installed ({err})") from None
    version = getattr(module, "__version__", "")
    return version.split("-")[0]  # OpenVINO's carries its build after a dash


def exported_network(runtime: str, extractor: FeatureExtractor, digest: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The extractor's export run by `runtime` (a key of EXPORTED) with torch's thread count: the cached export, else
    a new one (also when the runtime cannot load the cached file, e.g. a truncated one). Unavailable when that
    fails."""
    runtime_version(runtime)
    make, threads = NETWORKS[runtime], torch.get_num_threads()
    path = export_path(digest)
    try:
        cached = path.read_bytes() if path is not None and path.is_file() else None
    except OSError:  # a cache this process may not read (PL/Python as the postgres user): export anew
        cached = None
    if cached is not None:
        try:
            return make(cached, threads)
        except Exception:  # noqa: BLE001 - the runtimes raise their own exception types
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    model = export(extractor, digest)
    try:
        return make(model, threads)
    except Exception as err:  # the runtimes raise their own exception types
        raise Unavailable(f"{EXPORTED[runtime]} cannot load the export of {extractor.spec.name} ({_line(err)})"
                          ) from err


def best_of_rounds(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds of the fastest of `rounds` calls of each run, at the process's threads, after one warm-up call each.
    The runs take turns round after round, so they share the machine's noise, with a pause before every call."""
    best = {name: float("inf") for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fastest(torch_forward: Callable[[torch.Tensor], object], exported: dict[str, Callable[[torch.Tensor], object]],
            input_size: int, precision: str) -> str:
    """"torch" or the key of `exported` that runs a batch of PROBE_BATCH images fastest, all taking turns. torch (the
    reference) is kept unless the fastest exported runtime (float32) is at least MIN_SPEEDUP times faster; torch at a
    reduced `precision` is kept only when it is at least precision.MIN_SPEEDUP times faster than that runtime, as it
    must be against torch's float32."""
    images = torch.randint(0, 256, (PROBE_BATCH, input_size, input_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    runs = {"torch": lambda: torch_forward(images)} | {name: (lambda run=run: run(images))
                                                        for name, run in exported.items()}
    times = best_of_rounds(runs, ROUNDS)
    best = min(exported, key=times.__getitem__)
    if precision == "fp32":
        return best if times["torch"] >= MIN_SPEEDUP * times[best] else "torch"
    return "torch" if times[best] >= REDUCED_PRECISION_SPEEDUP * times["torch"] else best


def structure(extractor: FeatureExtractor) -> str:
    """What the speed of a network depends on, not its weights: its layers and what its features are made of."""
    sizes = "x".join(str(p.numel()) for p in extractor.net.parameters())
    shape = hashlib.sha256(sizes.encode()).hexdigest()[:8]
    return (f"{type(extractor.net).__name__}/{shape} taps={len(extractor.spec.tap_dims)} "
            f"flip={int(extractor.flip_average)}")


def choose(requested: str, extractor: FeatureExtractor, digest: str, device: torch.device, precision: str,
           fixed_precision: bool, torch_forward: Callable[[torch.Tensor], object]
           ) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The runtime `requested` (one of RUNTIMES) means here for the network `extractor` of hash `digest`, and the
    network on it when that is an exported runtime. "auto" on a CPU measures torch at `precision` against every
    installed exported runtime (float32) once per machine and network structure; it is torch on CUDA and when a
    reduced precision was asked for (`fixed_precision`). A missing runtime or a failed export leaves that runtime
    out, with one line; with none left the network runs on torch."""
    if requested not in RUNTIMES:
        raise BadInput(f"unknown runtime {requested!r}: choose from {', '.join(RUNTIMES)}")
    if requested in EXPORTED and (device.type != "cpu" or fixed_precision):
        raise BadInput(f"the {requested} runtime runs float32 on the CPU: use --device cpu and --precision auto or "
                       "fp32")
    if requested == "torch" or device.type != "cpu" or fixed_precision:
        return "torch", None
    versions: dict[str, str] = {}
    instead = "the network runs on torch" if requested != "auto" else "the runtime is chosen among the others"
    for runtime in EXPORTED if requested == "auto" else (requested,):
        try:
            versions[runtime] = runtime_version(runtime)
        except Unavailable as err:
            say_once(f"{err}: {instead}")

    @functools.cache
    def network(runtime: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The network on `runtime`, loaded once; None (with one line) where it cannot be."""
        try:
            return exported_network(runtime, extractor, digest)
        except Unavailable as err:
            say_once(f"{err}: {instead}")
            return None

    if requested != "auto":
        made = network(requested) if versions else None
        return (requested, made) if made is not None else ("torch", None)

    def measure() -> str:
        loaded = {runtime: run for runtime in versions if (run := network(runtime)) is not None}
        return fastest(torch_forward, loaded, extractor.spec.input_size, precision) if loaded else "torch"

    if not versions:
        return "torch", None
    candidates = " or ".join(f"{runtime} {version} fp32" for runtime, version in versions.items())
    chosen = measured_choice(f"network runtime of {structure(extractor)}: torch {precision} or {candidates}", measure)
    made = network(chosen) if chosen != "torch" else None
    return (chosen, made) if made is not None else ("torch", None)
