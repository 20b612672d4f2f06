"""Refined networks as a database stores them: a backbone with a linear head over the training labels, rebuilt
from its record and arrays and loaded strictly (refine.py trains them; featurize.py and SQL Server's procedures
load them as feature extractors)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from torch import nn

from ..errors import BadInput, NotReady
from ..features.backbones import BACKBONES, FeatureExtractor, build_network
from ..store import Store
from ..store.base import NetworkRecord


class RefineNet(nn.Module):
    """A backbone and a new linear head over the training labels."""

    def __init__(self, net: nn.Module, dim: int, classes: int) -> None:
        super().__init__()
        self.net = net
        self.head = nn.Linear(dim, classes)


def decode_arrays(name: str, kind: str, rows: dict[str, tuple[str, str, bytes]]) -> dict[str, torch.Tensor]:
    """Stored arrays as tensors; a corrupt row is a one-line ValueError naming the network and key."""
    tensors = {}
    for key, (dtype, shape, data) in rows.items():
        try:
            dims = json.loads(shape)
            if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
                raise BadInput(f"shape {shape!r}")
            array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims)
        except (ValueError, TypeError) as err:
            raise BadInput(f"network {name}: stored {kind} array {key!r} is corrupt ({err})") from None
        tensors[key] = torch.from_numpy(array.copy())
    return tensors


def load_strict(name: str, module: nn.Module, tensors: dict[str, torch.Tensor], kind: str = "weights") -> None:
    """`load_state_dict(strict=True)` after checking every key, shape and dtype: one-line ValueError otherwise."""
    expected = module.state_dict()
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise BadInput(f"network {name}: stored {kind} do not fit {type(module.net).__name__}: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in expected.items():
        if tensors[key].shape != value.shape or tensors[key].dtype != value.dtype:
            raise BadInput(f"network {name}: stored {kind} array {key!r} is {tuple(tensors[key].shape)} "
                             f"{tensors[key].dtype}, expected {tuple(value.shape)} {value.dtype}")
    module.load_state_dict(tensors, strict=True)


def _build(record: NetworkRecord) -> RefineNet:
    if record.base not in BACKBONES:
        raise BadInput(f"network {record.name}: unknown base backbone {record.base!r}")
    return RefineNet(build_network(record.base), BACKBONES[record.base].dim, len(record.params["classes"]))


def load_refined(store: Store, name: str) -> FeatureExtractor:
    """A refined network from the store as a frozen feature extractor (eval mode, CPU), loaded strictly."""
    return refined_extractor(store.network(name), store.network_arrays(name, "weights"))


def refined_extractor(record: NetworkRecord, weights: dict[str, tuple[str, str, bytes]]) -> FeatureExtractor:
    """A refined network from its record and its "weights" arrays (key -> (dtype, JSON shape, bytes)), wherever
    they were read (a store, or SQL Server's procedure: contexts/inproc.py), as a frozen feature extractor (eval
    mode, CPU), loaded strictly."""
    name = record.name
    if record.status != "ready":
        raise NotReady(f"network {name} is still training: run 'image-similarity refine' again to finish it")
    module = _build(record)
    load_strict(name, module, decode_arrays(name, "weights", weights))
    spec = dataclasses.replace(BACKBONES[record.base], name=name, tap_dims=())  # trained on the last map alone
    flip_average = bool(record.params.get("flip_average", False))  # networks refined before it existed: False
    model = FeatureExtractor(spec, module.net, flip_average).to(memory_format=torch.channels_last).eval()
    model.requires_grad_(False)
    return model
