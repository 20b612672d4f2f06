"""Featurize: turn every stored image into a feature vector with a pretrained network, batched and resumable."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..core.images import BadImageError, decode_image
from ..errors import BadInput, NotReady
from ..features import runtimes
from ..features.backbones import BACKBONES, DEFAULT_BACKBONE, FeatureExtractor, load_backbone, prepare_image
from ..features.precision import autocast, resolve
from ..search.stored import store_method_vectors
from ..store import VECTOR_SEARCH, Store
from .rank import latest_model

# The backbones compute their padding from the input size in Python: a constant for the fixed input size, so the
# trace's warnings about it are noise. A filter for the process (not catch_warnings, which the decode threads race).
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"image_similarity\.features\.")


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device:
        try:
            return torch.device(device)
        except RuntimeError:
            raise BadInput(f"not a torch device: {device!r} (e.g. cpu, cuda, cuda:1)") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class FeaturizeReport:
    """What a featurize run did."""

    backbone: str
    device: str
    precision: str
    runtime: str = "torch"
    network_hash: str = ""
    added: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


class Featurizer:
    """A pretrained backbone on a device, turning RGB images into float32 feature vectors.

    `precision` (see precision.PRECISIONS) is resolved once: "auto" means bfloat16 autocast on a CPU that measurably
    runs it fast, float16 mixed precision on CUDA, float32 elsewhere. `runtime` (see runtimes.RUNTIMES) too: "auto"
    means ONNX Runtime or OpenVINO (float32) on a CPU where one measurably runs the network faster than torch, else
    torch. A
    name that is not a built-in backbone is looked up among the refined networks in `store` (refine.py);
    `extractor`, when given, is the network itself (its spec names it) and `backbone`, `weights` and `store` are not
    used.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, device: str | None = None,
                 weights: str | os.PathLike | None = None, workers: int | None = None,
                 precision: str = "auto", store: Store | None = None,
                 extractor: FeatureExtractor | None = None, runtime: str = "auto") -> None:
        self.device = pick_device(device)
        self.precision = resolve(precision, self.device)
        self.extractor: FeatureExtractor
        if extractor is not None:
            self.extractor = extractor
        elif backbone in BACKBONES or store is None:
            self.extractor = load_backbone(backbone, weights)
        else:
            from .refine import load_refined

            self.extractor = load_refined(store, backbone)
        self.spec = self.extractor.spec
        self.extractor.to(self.device, memory_format=torch.channels_last)
        self.traced: torch.jit.ScriptModule | None = None
        self.network_hash = runtimes.network_hash(self.extractor)
        self.runtime, self.onnx = runtimes.choose(runtime, self.extractor, self.network_hash, self.device,
                                                  self.precision, precision not in ("auto", "fp32"), self.torch_forward)
        if self.onnx is not None:
            self.precision, self.traced = "fp32", None  # a bfloat16 trace made to be measured is not kept
        self.pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))

    @property
    def backbone(self) -> str:
        return self.spec.name

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode image bytes into the network's uint8 input; BadImageError when they are not an image. A large
        JPEG is decoded at a reduced scale (DCT scaling) that still leaves its shorter side >= the resize size."""
        return prepare_image(decode_image(data, min_side=self.spec.resize), self.spec)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim), on the chosen runtime."""
        images = torch.from_numpy(batch)
        return (self.onnx or self.torch_forward)(images).numpy()

    @torch.inference_mode()
    def torch_forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, dim) on the CPU, computed by torch at the chosen precision."""
        x = images.to(self.device, non_blocking=True)
        network = self.network(x)
        with autocast(self.precision, self.device):
            return network(x).float().cpu()

    def network(self, example: torch.Tensor) -> torch.nn.Module:
        """The extractor; on a CPU at bfloat16, its TorchScript trace, frozen (made once, in float32, from the first
        image; freezing folds each batch norm into its convolution). Under autocast it runs 2.8-3.3x float32 for
        EfficientNet-Lite0 on this project's machines, against 2.2x for plain autocast, with features at cosine
        >= 0.9947 to float32 on the bundled photos (plain autocast: 0.9965; see benchmarks/precision_quality.py).
        torch 2.13 marks `torch.jit.trace` deprecated: measure `torch.export`/`torch.compile` when upgrading."""
        if self.precision != "bf16" or self.device.type != "cpu":
            return self.extractor
        if self.traced is None:
            # one image is enough to trace (the graph takes any batch size) and 10x cheaper than a batch of 32
            self.traced = torch.jit.freeze(torch.jit.trace(self.extractor, example[:1], check_trace=False))
        return self.traced

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Feature vectors of decoded RGB images."""
        return self.forward(np.stack([prepare_image(im, self.spec) for im in images]))

    def submit(self, items: Sequence[tuple[int, bytes]]) -> list[tuple[int, Future]]:
        """Start decoding a batch in the background."""
        return [(image_id, self.pool.submit(self.prepare, data)) for image_id, data in items]


def finish_batch(featurizer: Featurizer, pending: list[tuple[int, Future]]
                 ) -> tuple[list[int], np.ndarray | None, list[tuple[int, str]]]:
    """Wait for a submitted batch and run the network on its good images: (their ids, their float32 vectors, or
    None when there are none) and (id, reason) of the bad ones. What every context featurizes a batch with."""
    ids, arrays, bad = [], [], []
    for image_id, future in pending:
        try:
            arrays.append(future.result())
            ids.append(image_id)
        except BadImageError as err:
            bad.append((image_id, str(err)))
    return ids, featurizer.forward(np.stack(arrays)) if ids else None, bad


def featurize(store: Store, featurizer: Featurizer | None = None, backbone: str = DEFAULT_BACKBONE,
              batch_size: int = 32, progress: bool = True,
              id_range: tuple[int, int] | None = None) -> FeaturizeReport:
    """Featurize every stored image that has no features for the backbone yet (only ids in `id_range`, both
    ends included, when given: a Spark task's share).

    Refuses (NotReady) a network whose weights hash differs from the one that computed the stored vectors of the
    backbone; vectors of the same network from another runtime or precision are kept together (docs/runtimes.md).
    Streams batches from the store, decodes the next batch while the network runs on the current one, and
    commits each batch on its own: an interrupted run loses at most one batch and resumes where it stopped.
    """
    featurizer = featurizer or Featurizer(backbone, store=store)
    stored_dim, dim = store.feature_dim(featurizer.backbone), featurizer.spec.feature_dim
    if stored_dim not in (None, dim):
        raise NotReady(f"the stored {featurizer.backbone} features have {stored_dim} dimensions and this version "
                       f"computes {dim} (multi-stage features): featurize into a new database")
    others = sorted({h for _, h in store.feature_runtimes(featurizer.backbone)} - {featurizer.network_hash})
    if others:
        raise NotReady(f"the stored {featurizer.backbone} features were computed by another network (weights hash "
                       f"{', '.join(others)}) than this one ({featurizer.network_hash}): featurize with the same "
                       f"weights, or into a new database")
    report = FeaturizeReport(featurizer.backbone, str(featurizer.device), featurizer.precision, featurizer.runtime,
                             featurizer.network_hash)
    todo = len(store.images()) - store.feature_counts().get(featurizer.backbone, 0)
    bar = tqdm(total=max(todo, 0), desc=f"featurize ({featurizer.backbone}, {featurizer.device}, "
               f"{featurizer.runtime}, {featurizer.precision})", unit="img", disable=not progress)

    def finish(pending: list[tuple[int, Future]]) -> None:
        ids, vectors, bad = finish_batch(featurizer, pending)
        if ids:
            store.put_features(featurizer.backbone, ids, vectors, featurizer.precision,
                               (featurizer.runtime, featurizer.network_hash))
            report.added += len(ids)
        for image_id, reason in bad:
            report.skipped.append((image_id, reason))
            store.record_rejected(f"image id {image_id}", "", reason, stage="featurize")
        bar.update(len(pending))

    pending: list[tuple[int, Future]] = []
    for items in store.missing_features(featurizer.backbone, batch_size, id_range):
        started = featurizer.submit(items)
        if pending:
            finish(pending)
        pending = started
    if pending:
        finish(pending)
    bar.close()
    latest = latest_model(store) if report.added and VECTOR_SEARCH in store.capabilities else None
    if latest is not None and latest.backbone == featurizer.backbone:
        store_method_vectors(store, latest)
    return report
