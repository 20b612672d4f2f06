"""Refine: fine-tune a pretrained backbone on the training split's labels and store it in the database.

The refined network is a new backbone name (`<base>_refined_<version>`) usable wherever a backbone is. Only the
training split is used: a seeded, stratified validation part is carved out of it (near duplicates kept on one
side) to pick the best epoch and stop early; the test split is never read. Images are decoded once into a
small uint8 cache, then augmented with torch ops every epoch (random resized crop, flip, colour jitter). The
weights, and after every finished epoch the whole training state (weights, AdamW moments, history), are
stored as plain arrays in `networks`/`network_arrays`: a rerun with the same settings resumes after the last
finished epoch and ends with the same network as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..core.images import BadImageError, decode_image
from ..errors import BadInput, NotReady
from ..features import precision as precisions
from ..features.backbones import BACKBONES, DEFAULT_BACKBONE, FeatureExtractor, load_backbone
from ..store import Store
from ..store.base import NetworkRecord
from .classes import ClassCount, as_params, learnable, unlabelled
from .networks import RefineNet, decode_arrays, load_strict
from .refine_settings import Settings
from .split import split_images

CACHE_RATIO = 256 / 224  # cached short side per input pixel, as the backbones' resize/crop
MAX_ASPECT = 2.0  # the cache keeps at most this long side per short side (centre)


@dataclass
class Images:
    """Decoded training images: uint8 (3, H, W) tensors with their class indices."""

    tensors: list[torch.Tensor]
    targets: torch.Tensor


def _cache(data: bytes, short: int, resample: Image.Resampling) -> torch.Tensor:
    """Decode and resize so the short side is `short` (long side at most MAX_ASPECT times it): uint8 (3, H, W)."""
    image = decode_image(data)
    width, height = image.size
    scale = short / min(width, height)
    box_w, box_h = min(width, MAX_ASPECT * min(width, height)), min(height, MAX_ASPECT * min(width, height))
    box = ((width - box_w) / 2, (height - box_h) / 2, (width + box_w) / 2, (height + box_h) / 2)
    size = (max(short, round(box_w * scale)), max(short, round(box_h * scale)))
    array = np.asarray(image.resize(size, resample, box=box), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop of 25%..100% of the area, aspect 3:4..4:3, resized to `size`, flipped half the time: float."""
    _, height, width = image.shape
    uniform = torch.rand(6, generator=generator).tolist()
    area = height * width * (0.25 + 0.75 * uniform[0])
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniform[1])
    w = min(width, round(math.sqrt(area * ratio)))
    h = min(height, round(math.sqrt(area / ratio)))
    top, left = int(uniform[2] * (height - h + 1)), int(uniform[3] * (width - w + 1))
    crop = image[:, top:top + h, left:left + w].float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1) if uniform[4] < 0.5 else out


def _jitter(batch: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Mild colour jitter per image (brightness, contrast, saturation) on a float 0..255 batch (N, 3, S, S)."""
    factors = 1 + strength * (2 * torch.rand(3, batch.shape[0], 1, 1, 1, generator=generator) - 1)
    batch = batch * factors[0]
    gray = batch.mean((1, 2, 3), keepdim=True)
    batch = (batch - gray) * factors[1] + gray
    luma = (batch * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return ((batch - luma) * factors[2] + luma).clamp(0, 255)


def _centre(image: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` square of a cached image (its short side is `size * CACHE_RATIO`): float (3, S, S)."""
    _, height, width = image.shape
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top:top + size, left:left + size].float()


def _state_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


def _optimizer_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    return {f"{index}.{name}": value.detach().cpu().numpy().copy()
            for index, state in optimizer.state_dict()["state"].items() for name, value in state.items()}


def _training_images(store: Store) -> tuple[list, list[str], dict[str, ClassCount]]:
    """(image rows of the training split's classes with enough photos, their sorted names, the classes left out
    with their counts): the rule of classes.py, as train applies it."""
    subsets = store.split()
    if not subsets:
        raise NotReady("no train/test split: run 'image-similarity split' first")
    rows = [im for im in store.images() if subsets.get(im.id) == "train" and im.label is not None]
    classes, left_out = learnable([im.label for im in rows], [im.dhash for im in rows], "refine")
    return [im for im in rows if im.label not in left_out], classes, left_out


def _decode_images(store: Store, rows: Sequence, classes: list[str], size: int, resample: Image.Resampling,
                   progress: bool) -> Images:
    """Decode each image once into the cache; bad ones are skipped and recorded (stage "refine")."""
    tensors, targets = [], []
    for row in tqdm(rows, desc="refine: decode", unit="img", disable=not progress, leave=False):
        try:
            tensors.append(_cache(store.image_bytes(row.id), round(size * CACHE_RATIO), resample))
            targets.append(classes.index(row.label))
        except BadImageError as err:
            store.record_rejected(f"image id {row.id}", row.label, str(err), stage="refine")
    return Images(tensors, torch.tensor(targets, dtype=torch.long))


def _fingerprint(rows: Sequence) -> str:
    text = json.dumps([(im.id, im.label, im.sha256) for im in rows])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _freeze(module: RefineNet, share: float) -> None:
    """Leave the first `share` of the backbone's parameter tensors (in forward order) untrained."""
    parameters = list(module.net.parameters())
    for parameter in parameters[:round(share * len(parameters))]:
        parameter.requires_grad_(False)


def _optimizer(module: RefineNet, settings: Settings) -> torch.optim.AdamW:
    backbone = [p for p in module.net.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": backbone, "lr": settings.backbone_lr},
                              {"params": list(module.head.parameters()), "lr": settings.head_lr}],
                             weight_decay=settings.weight_decay)


def _learning_rate_scale(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over the first epoch, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _logits(module: RefineNet, norm: tuple[torch.Tensor, torch.Tensor], batch: torch.Tensor,
            dropout: float, generator: torch.Generator | None) -> torch.Tensor:
    mean, std = norm
    x = ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
    features = module.net.pooled(x)
    if generator is not None and dropout > 0:
        keep = torch.rand(features.shape, generator=generator).to(features.device) >= dropout
        features = features * keep / (1 - dropout)
    return module.head(features.float())


def _evaluate(module: RefineNet, norm, images: Images, size: int, batch_size: int, device: torch.device,
              precision: str) -> tuple[float | None, float | None]:
    """(accuracy, mean loss) on the validation images; (None, None) when there are none."""
    if not images.tensors:
        return None, None
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(images.tensors), batch_size):
            batch = torch.stack([_centre(t, size) for t in images.tensors[start:start + batch_size]]).to(device)
            targets = images.targets[start:start + batch_size].to(device)
            with precisions.autocast(precision, device):
                logits = _logits(module, norm, batch, 0.0, None)
            loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
    return correct / len(images.tensors), loss / len(images.tensors)


def _is_better(val: tuple[float | None, float | None], best: dict | None) -> bool:
    if best is None or val[0] is None:
        return True
    return (val[0], -val[1]) > (best["val_accuracy"], -best["val_loss"])


def _network_record(store: Store, base: str, seed: int, settings: Settings, rows: Sequence, classes: list[str],
                    left_out: dict[str, ClassCount]) -> NetworkRecord:
    """The network these settings, seed and training images refine: the stored one (ready, or to resume), else a
    new one."""
    params = {"base": base, "seed": seed, "classes": classes, "training_images": len(rows),
              "training_fingerprint": _fingerprint(rows), **dataclasses.asdict(settings),
              **({"left_out": as_params(left_out)} if left_out else {})}
    for record in reversed(store.networks()):  # resumed whatever unlabelled images were added meanwhile
        if record.base == base and {k: v for k, v in record.params.items() if k != "unlabelled"} == params:
            return record
    left = unlabelled([im.label for im in store.images()])
    return store.create_network(base, {**params, **({"unlabelled": left} if left else {})})


def _new_module(extractor: FeatureExtractor, classes: int, seed: int,
                settings: Settings) -> tuple[RefineNet, torch.optim.AdamW]:
    """The backbone with a new head (small, from the seed), frozen as the settings say, and its optimizer."""
    module = RefineNet(extractor.net, extractor.spec.dim, classes)
    with torch.no_grad():
        shape = module.head.weight.shape
        module.head.weight.copy_(0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        module.head.bias.zero_()
    module.requires_grad_(True)
    _freeze(module, settings.freeze)
    return module, _optimizer(module, settings)


def _resume(store: Store, record: NetworkRecord, module: RefineNet, optimizer: torch.optim.AdamW) -> None:
    """Load the last finished epoch's weights and optimizer state."""
    load_strict(record.name, module, decode_arrays(record.name, "state", store.network_arrays(record.name, "state")),
                kind="state")
    moments = decode_arrays(record.name, "optimizer", store.network_arrays(record.name, "optimizer"))
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in moments.items():
        index, _, name = key.partition(".")
        state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)


def refine(store: Store, base: str = DEFAULT_BACKBONE, *, epochs: int | None = None, seed: int = 0,
           progress: bool = True, device: str | None = None, precision: str = "auto",
           settings: Settings | None = None,
           on_epoch: Callable[[int, dict], None] | None = None) -> str:
    """Fine-tune `base` on the training split and store it; return the refined network's name.

    `epochs` overrides `settings.epochs`. A rerun with the same settings, seed and training images resumes an
    unfinished run after its last finished epoch, or returns the finished network. `on_epoch(epoch, metrics)`
    is called after each epoch's checkpoint is committed (epochs count from 1).
    """
    if base not in BACKBONES:
        raise BadInput(f"refine starts from a pretrained backbone ({', '.join(BACKBONES)}), not {base!r}")
    settings = settings or Settings()
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    if settings.epochs < 1:
        raise BadInput(f"epochs must be at least 1, got {settings.epochs}")
    rows, classes, left_out = _training_images(store)
    record = _network_record(store, base, seed, settings, rows, classes, left_out)
    if record.status == "ready":
        return record.name

    torch_device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = precisions.resolve(precision, torch_device)
    extractor = load_backbone(base)
    module, optimizer = _new_module(extractor, len(classes), seed, settings)

    metrics = record.metrics or {"history": [], "best": None}
    done = len(metrics["history"])
    if done:
        _resume(store, record, module, optimizer)

    validation_ids = {i for i, s in split_images(rows, settings.val_fraction, seed).items() if s == "test"}
    spec = extractor.spec
    train = _decode_images(store, [r for r in rows if r.id not in validation_ids], classes, settings.image_size,
                           spec.resample, progress)
    val = _decode_images(store, [r for r in rows if r.id in validation_ids], classes, settings.image_size,
                         spec.resample, progress)
    if not train.tensors:
        raise BadInput("no decodable training images to refine on")

    module.to(torch_device).eval()  # batch-norm statistics stay as pretrained; dropout is applied by hand
    norm = (extractor.mean.to(torch_device), extractor.std.to(torch_device))
    scaler = torch.amp.GradScaler("cuda", enabled=chosen == "fp16")
    steps = math.ceil(len(train.tensors) / settings.batch_size)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    bar = tqdm(total=settings.epochs, initial=done, desc=f"refine {record.name} ({torch_device}, {chosen})",
               unit="epoch", disable=not progress)
    for epoch in range(done, settings.epochs):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(train.tensors), generator=generator).tolist()
        total_loss = 0.0
        for step in tqdm(range(steps), desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress):
            chosen_ids = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            batch = _jitter(torch.stack([_random_crop(train.tensors[i], settings.image_size, generator)
                                         for i in chosen_ids]), generator).to(torch_device)
            targets = train.targets[chosen_ids].to(torch_device)
            scale = _learning_rate_scale(epoch * steps + step, settings.epochs * steps, steps)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale
            with precisions.autocast(chosen, torch_device):
                logits = _logits(module, norm, batch, settings.dropout, generator)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += float(loss.detach()) * len(chosen_ids)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr
        val_accuracy, val_loss = _evaluate(module, norm, val, settings.image_size, settings.batch_size,
                                           torch_device, chosen)
        entry = {"epoch": epoch + 1, "loss": total_loss / len(train.tensors), "val_accuracy": val_accuracy,
                 "val_loss": val_loss, "seconds": round(time.perf_counter() - started, 2)}
        improved = _is_better((val_accuracy, val_loss), metrics["best"])
        metrics = {**metrics, "history": [*metrics["history"], entry], "best": entry if improved else metrics["best"],
                   "train_images": len(train.tensors), "val_images": len(val.tensors), "device": str(torch_device),
                   "precision": chosen}
        finished = epoch + 1 == settings.epochs or epoch + 1 - metrics["best"]["epoch"] >= settings.patience
        arrays = {"weights": _state_arrays(module)} if improved else {}
        if finished:
            store.put_network(record.name, "ready", metrics, arrays, drop=("state", "optimizer"))
        else:
            arrays.update(state=_state_arrays(module), optimizer=_optimizer_arrays(optimizer))
            store.put_network(record.name, "training", metrics, arrays)
        bar.set_postfix(loss=f"{entry['loss']:.3f}",
                        val_acc="-" if val_accuracy is None else f"{100 * val_accuracy:.1f}%")
        bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        if finished:
            break
    bar.close()
    return record.name
