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


@dataclass
class _Training:
    """What stays fixed for a whole training: the network and its optimizer, the input normalisation (mean, std),
    the gradient scaler, where and in which precision it computes, the settings, the seed, the decoded images."""

    module: RefineNet
    optimizer: torch.optim.AdamW
    norm: tuple[torch.Tensor, torch.Tensor]
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    settings: Settings
    seed: int
    train: Images
    val: Images


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


def _training_data(store: Store, rows: Sequence, classes: list[str], settings: Settings, seed: int,
                   resample: Image.Resampling, progress: bool) -> tuple[Images, Images]:
    """(training, validation) images: the rows split by the seed (near duplicates on one side), each decoded once."""
    validation_ids = {i for i, s in split_images(rows, settings.val_fraction, seed).items() if s == "test"}
    train = _decode_images(store, [r for r in rows if r.id not in validation_ids], classes, settings.image_size,
                           resample, progress)
    val = _decode_images(store, [r for r in rows if r.id in validation_ids], classes, settings.image_size,
                         resample, progress)
    if not train.tensors:
        raise BadInput("no decodable training images to refine on")
    return train, val


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


def _set_learning_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
    """Set each parameter group's learning rate, in order."""
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def _logits(training: _Training, batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The head's logits for a float 0..255 batch; dropout on the pooled features only when `generator` is given."""
    mean, std = training.norm
    dropout = training.settings.dropout
    x = ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
    features = training.module.net.pooled(x)
    if generator is not None and dropout > 0:
        keep = torch.rand(features.shape, generator=generator).to(features.device) >= dropout
        features = features * keep / (1 - dropout)
    return training.module.head(features.float())


def _augmented_batch(training: _Training, ids: list[int],
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images `ids` randomly cropped, flipped and colour-jittered, and their targets, on the device."""
    size = training.settings.image_size
    batch = _jitter(torch.stack([_random_crop(training.train.tensors[i], size, generator) for i in ids]), generator)
    return batch.to(training.device), training.train.targets[ids].to(training.device)


def _step(training: _Training, batch: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> float:
    """One optimizer step on a batch (dropout drawn from `generator`, the loss scaled for fp16): the batch's loss."""
    with precisions.autocast(training.precision, training.device):
        logits = _logits(training, batch, generator)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=training.settings.label_smoothing)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    return float(loss.detach())


def _train_epoch(training: _Training, epoch: int, progress: bool) -> float:
    """One pass over the training images in the epoch's seeded order, the learning rates scaled by the schedule
    step by step and restored after: the mean loss."""
    settings, images = training.settings, training.train
    steps = math.ceil(len(images.tensors) / settings.batch_size)
    base_lrs = [group["lr"] for group in training.optimizer.param_groups]
    generator = torch.Generator().manual_seed(training.seed * 1_000_003 + epoch)
    order = torch.randperm(len(images.tensors), generator=generator).tolist()
    total_loss = 0.0
    for step in tqdm(range(steps), desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress):
        ids = order[step * settings.batch_size:(step + 1) * settings.batch_size]
        batch, targets = _augmented_batch(training, ids, generator)
        scale = _learning_rate_scale(epoch * steps + step, settings.epochs * steps, steps)
        _set_learning_rates(training.optimizer, [lr * scale for lr in base_lrs])
        total_loss += _step(training, batch, targets, generator) * len(ids)
    _set_learning_rates(training.optimizer, base_lrs)
    return total_loss / len(images.tensors)


def _evaluate(training: _Training) -> tuple[float | None, float | None]:
    """(accuracy, mean loss) on the validation images; (None, None) when there are none."""
    images, size, batch_size = training.val, training.settings.image_size, training.settings.batch_size
    if not images.tensors:
        return None, None
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(images.tensors), batch_size):
            batch = torch.stack([_centre(t, size) for t in images.tensors[start:start + batch_size]])
            batch = batch.to(training.device)
            targets = images.targets[start:start + batch_size].to(training.device)
            with precisions.autocast(training.precision, training.device):
                logits = _logits(training, batch, None)
            loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
    return correct / len(images.tensors), loss / len(images.tensors)


def _epoch(training: _Training, epoch: int, progress: bool) -> dict:
    """Train one epoch and evaluate it: the epoch's metrics entry (epochs count from 1)."""
    started = time.perf_counter()
    loss = _train_epoch(training, epoch, progress)
    val_accuracy, val_loss = _evaluate(training)
    return {"epoch": epoch + 1, "loss": loss, "val_accuracy": val_accuracy, "val_loss": val_loss,
            "seconds": round(time.perf_counter() - started, 2)}


def _is_better(val: tuple[float | None, float | None], best: dict | None) -> bool:
    if best is None or val[0] is None:
        return True
    return (val[0], -val[1]) > (best["val_accuracy"], -best["val_loss"])


def _checkpoint(store: Store, name: str, training: _Training, metrics: dict, entry: dict) -> tuple[dict, bool]:
    """Add the epoch's entry to the metrics and store them: the network ready with its best weights when finished
    (last epoch, or `patience` epochs without a better one), else the whole state to resume: (metrics, finished)."""
    settings = training.settings
    improved = _is_better((entry["val_accuracy"], entry["val_loss"]), metrics["best"])
    metrics = {**metrics, "history": [*metrics["history"], entry], "best": entry if improved else metrics["best"],
               "train_images": len(training.train.tensors), "val_images": len(training.val.tensors),
               "device": str(training.device), "precision": training.precision}
    finished = entry["epoch"] == settings.epochs or entry["epoch"] - metrics["best"]["epoch"] >= settings.patience
    arrays = {"weights": _state_arrays(training.module)} if improved else {}
    if finished:
        store.put_network(name, "ready", metrics, arrays, drop=("state", "optimizer"))
    else:
        arrays.update(state=_state_arrays(training.module), optimizer=_optimizer_arrays(training.optimizer))
        store.put_network(name, "training", metrics, arrays)
    return metrics, finished


def _checked_settings(base: str, epochs: int | None, settings: Settings | None) -> Settings:
    """The settings to refine `base` with (`epochs`, when given, overriding theirs), checked."""
    if base not in BACKBONES:
        raise BadInput(f"refine starts from a pretrained backbone ({', '.join(BACKBONES)}), not {base!r}")
    settings = settings or Settings()
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    if settings.epochs < 1:
        raise BadInput(f"epochs must be at least 1, got {settings.epochs}")
    return settings


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
    settings = _checked_settings(base, epochs, settings)
    rows, classes, left_out = _training_images(store)
    record = _network_record(store, base, seed, settings, rows, classes, left_out)
    if record.status == "ready":
        return record.name

    torch_device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = precisions.resolve(precision, torch_device)
    extractor = load_backbone(base)
    module, optimizer = _new_module(extractor, len(classes), seed, settings)
    module.to(torch_device).eval()  # batch-norm statistics stay as pretrained; dropout is applied by hand
    metrics = record.metrics or {"history": [], "best": None}
    done = len(metrics["history"])
    if done:  # after the move: the optimizer's state is loaded onto the device of the parameters it belongs to
        _resume(store, record, module, optimizer)
    train, val = _training_data(store, rows, classes, settings, seed, extractor.spec.resample, progress)

    training = _Training(module, optimizer, norm=(extractor.mean.to(torch_device), extractor.std.to(torch_device)),
                         scaler=torch.amp.GradScaler("cuda", enabled=chosen == "fp16"), device=torch_device,
                         precision=chosen, settings=settings, seed=seed, train=train, val=val)
    bar = tqdm(total=settings.epochs, initial=done, desc=f"refine {record.name} ({torch_device}, {chosen})",
               unit="epoch", disable=not progress)
    for epoch in range(done, settings.epochs):
        entry = _epoch(training, epoch, progress)
        metrics, finished = _checkpoint(store, record.name, training, metrics, entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}",
                        val_acc="-" if entry["val_accuracy"] is None else f"{100 * entry['val_accuracy']:.1f}%")
        bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
        if finished:
            break
    bar.close()
    return record.name
