"""Pretrained ImageNet CNN backbones used as frozen feature extractors.

Self-contained re-implementations of torchvision's MobileNetV2 / ResNet builders and of EfficientNet-Lite0
(as converted by the ``efficientnet-lite-pytorch`` package). Their state-dict layouts match the official
checkpoint files, which are always loaded strictly: there is no random-weight fallback.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import BadInput
from .specs import BACKBONES, DEFAULT_BACKBONE, BackboneSpec, WeightsNotFoundError


def prepare_image(image: Image.Image, spec: BackboneSpec) -> np.ndarray:
    """Resize the shorter side to ``spec.resize`` and centre crop ``spec.input_size``: uint8 (S, S, 3).

    Done as one antialiased resize of the source region that survives the crop, so extreme aspect ratios
    never build a huge intermediate image.
    """
    image = image.convert("RGB")
    width, height = image.size
    half = spec.input_size * min(width, height) / spec.resize / 2
    box = (width / 2 - half, height / 2 - half, width / 2 + half, height / 2 + half)
    side = spec.input_size
    return np.asarray(image.resize((side, side), spec.resample, box=box), dtype=np.uint8)


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class _Backbone(nn.Module):
    """A classification network split into feature maps and the linear classifier."""

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The last feature map, then the outputs of the tapped stages (deepest first; see BackboneSpec.tap_dims)."""
        raise NotImplementedError

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, globally average-pooled: the classifier's input."""
        return self.feature_maps(x)[0].mean((2, 3))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# --- EfficientNet-Lite0 (keys and numerics of efficientnet_lite_pytorch.EfficientNet "efficientnet-lite0") ---

class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: ceil(size / stride) outputs, extra pad on the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            pad = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [pad // 2, pad - pad // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _lite_bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _lite_bn(mid)
        self._project_conv = _SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _lite_bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite0(_Backbone):
    """EfficientNet-Lite0: MBConv blocks without squeeze-excite, ReLU6, TF "SAME" padding, BN eps 1e-3."""

    # (repeats, kernel, stride, expand, out channels) per stage
    STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _lite_bn(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in self.STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(cin, 1280, 1, bias=False)
        self._bn1 = _lite_bn(1280)
        self._fc = nn.Linear(1280, 1000)

    TAPS = (14, 10)  # the last blocks of the 192- and 112-channel stages

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        taps = {}
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self.TAPS:
                taps[index] = x
        return [F.relu6(self._bn1(self._conv_head(x))), *(taps[i] for i in self.TAPS)]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(features)


# --- MobileNetV2 (torchvision layout) ---

class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(nn.Sequential(*_conv_bn(cin, mid), nn.ReLU6(inplace=True)))
        layers += [nn.Sequential(*_conv_bn(mid, mid, 3, stride, groups=mid), nn.ReLU6(inplace=True)),
                   *_conv_bn(mid, cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(_Backbone):
    """torchvision's MobileNetV2 (width 1.0)."""

    # (expand, out channels, repeats, stride) per stage, as in torchvision
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, 32, 3, 2), nn.ReLU6(inplace=True))]
        cin = 32
        for expand, cout, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(nn.Sequential(*_conv_bn(cin, 1280), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    TAPS = (16, 13)  # the last layers of the 160- and 96-channel stages

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAPS:
                taps[index] = x
        return [x, *(taps[i] for i in self.TAPS)]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


# --- ResNet (torchvision layout, v1.5: stride on the 3x3 conv) ---

class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, planes)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = _conv_bn(planes, planes * 4)
        self.downsample = _downsample(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None


class ResNet(_Backbone):
    """torchvision's ResNet."""

    def __init__(self, block: type[_BasicBlock | _Bottleneck], depths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            blocks = []
            for i in range(depth):
                blocks.append(block(cin, planes, 2 if i == 0 and index > 1 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, 1000)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return [self.layer4(self.layer3(self.layer2(self.layer1(x))))]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


_BUILDERS = {
    "efficientnet_lite0": EfficientNetLite0,
    "mobilenet_v2": MobileNetV2,
    "resnet18": lambda: ResNet(_BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(_Bottleneck, (3, 4, 6, 3)),
    "resnet101": lambda: ResNet(_Bottleneck, (3, 4, 23, 3)),
}


class FeatureExtractor(nn.Module):
    """Frozen backbone taking uint8 NHWC batches; normalisation happens inside, so uint8 can be shipped.

    A backbone whose spec has `tap_dims` (the pretrained ones that were measured with it) gives multi-stage
    features: the last feature map's and the tapped earlier stages' average-pooled features, each L2-normalised,
    side by side; mid-level stages hold the finer pattern a texture is told by. Otherwise the last map's pooled
    features alone. With `flip_average`, an image's features are the mean of its own and its mirror image's (one
    batch of twice the size): refined networks, trained on randomly mirrored crops, are featurized so (refine.py).
    """

    def __init__(self, spec: BackboneSpec, net: _Backbone, flip_average: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        self.flip_average = flip_average
        for key in ("mean", "std"):  # on the 0..255 scale, exact in float64 before rounding to float32
            value = torch.tensor(getattr(spec, key), dtype=torch.float64) * 255
            self.register_buffer(key, value.float().view(1, 3, 1, 1), persistent=False)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
        return (x - self.mean) / self.std

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.tap_dims:
            return self.net.pooled(x)
        return torch.cat([F.normalize(m.mean((2, 3)).float(), dim=1) for m in self.net.feature_maps(x)], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, spec.feature_dim) features."""
        x = self._normalise(images)
        if not self.flip_average:
            return self._features(x)
        both = self._features(torch.cat([x, x.flip(3)]))
        return both.unflatten(0, (2, -1)).mean(0)  # no batch size in the graph: a trace takes any batch

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 1000) ImageNet logits."""
        return self.net.logits(self.net.pooled(self._normalise(images)))


def _default_weights(spec: BackboneSpec) -> Path:
    """The weights file shipped by ``spec.package``, else the one in ``<torch hub dir>/checkpoints/``."""
    candidates = []
    if spec.package:
        module, _, subdir = spec.package.partition("/")
        try:
            candidates.append(Path(str(importlib.resources.files(module) / subdir / spec.weights_file)))
        except ModuleNotFoundError:
            pass
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    candidates.append(hub / spec.weights_file)
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"{spec.name} weights '{spec.weights_file}' not found: put it in {hub}/ or pass weights=PATH "
        f"(source: {spec.source})")


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise BadInput(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_network(name: str) -> _Backbone:
    """The architecture of a known backbone, with untrained weights: load a state dict into it strictly."""
    return _BUILDERS[_spec(name).name]()


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """Build ``name`` with its ImageNet weights loaded strictly, in eval mode on the CPU.

    ``weights`` overrides the default file location. Raises ValueError for an unknown name or a file that
    does not hold this network's weights, WeightsNotFoundError when the file is missing.
    """
    spec = _spec(name)
    path = _default_weights(spec) if weights is None else Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(f"{name} weights file not found: {path}")
    net = build_network(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a zip/pickle file, or one holding more than tensors
        raise BadInput(f"{path} is not a readable PyTorch weights file ({type(exc).__name__})") from exc
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:  # missing/unexpected keys, shape mismatch, not a mapping
        detail = " ".join(str(exc).split("\n", 1)[-1].split())
        raise BadInput(f"{path} does not hold {name} weights: {detail[:200]}") from exc
    model = FeatureExtractor(spec, net).to(memory_format=torch.channels_last).eval()
    model.requires_grad_(False)
    return model
