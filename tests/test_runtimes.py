"""The network's runtime chosen per machine by measurement (torch, or ONNX Runtime or OpenVINO on an export of our own
module),
exports cached by the network's weights hash, fallbacks of one line, and what computed each vector recorded."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from image_similarity.core import machine
from image_similarity.entrypoints.cli import main
from image_similarity.errors import BadInput, NotReady
from image_similarity.features import runtimes
from image_similarity.features.backbones import FeatureExtractor, load_backbone
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Four real photos per class, prepared as the network's uint8 input."""
    extractor = load_backbone()
    featurizer = Featurizer(device="cpu", precision="fp32", runtime="torch", extractor=extractor)
    return np.stack([featurizer.prepare(p.read_bytes()) for label in ("dotted", "leopard", "striped")
                     for p in sorted((SAMPLE_DATASET / label).iterdir())[:4]])


@pytest.fixture
def said(monkeypatch):
    """The fallback lines printed in this test (as in a new process: none printed yet)."""
    monkeypatch.setattr(runtimes, "_said", set())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def refined_like(extractor: FeatureExtractor) -> FeatureExtractor:
    """A network shaped as refine.py makes them: the last map alone, features averaged with the mirror image's."""
    spec = dataclasses.replace(extractor.spec, name="refined-test", tap_dims=())
    return FeatureExtractor(spec, extractor.net, flip_average=True).eval()


@pytest.mark.parametrize("runtime", sorted(runtimes.EXPORTED))
def test_exported_features_match_torch_float32_on_real_photos(fresh_choices, photos, said, runtime):
    """Multi-stage features of a pretrained backbone and flip-averaged ones of a refined-like network: the same
    vectors to cosine >= 0.999, computed another way, at any batch size."""
    base = load_backbone()
    for extractor in (base, refined_like(base)):
        exact = Featurizer(device="cpu", precision="fp32", runtime="torch", extractor=extractor).forward(photos)
        fast = Featurizer(device="cpu", precision="fp32", runtime=runtime, extractor=extractor)
        assert (fast.runtime, fast.precision) == (runtime, "fp32") and fast.onnx is not None
        features = fast.forward(photos)
        assert features.shape == exact.shape and features.dtype == np.float32
        assert not np.array_equal(features, exact) and cosines(features, exact).min() >= 0.999
        assert cosines(fast.forward(photos[3:4]), exact[3:4]).min() >= 0.999


def test_exports_are_cached_by_the_weights_hash(fresh_choices, monkeypatch, said):
    base = load_backbone("mobilenet_v2")
    first = Featurizer(device="cpu", precision="fp32", runtime="onnxruntime", extractor=base)
    path = runtimes.export_path(first.network_hash)
    assert path.parent == fresh_choices.parent / "onnx" and path.is_file()
    with monkeypatch.context() as patched:
        patched.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported a cached network again"))
        again = Featurizer(device="cpu", precision="fp32", runtime="onnxruntime", extractor=base)
        assert again.runtime == "onnxruntime"
    changed = load_backbone("mobilenet_v2")
    with torch.no_grad():
        next(changed.parameters())[0, 0, 0, 0] += 0.5  # one weight of a refined network moved
    assert runtimes.network_hash(changed) != first.network_hash
    assert runtimes.network_hash(load_backbone("mobilenet_v2")) == first.network_hash
    second = Featurizer(device="cpu", precision="fp32", runtime="onnxruntime", extractor=changed)
    assert runtimes.export_path(second.network_hash).is_file() and path.is_file()


def test_a_truncated_export_is_made_again(fresh_choices, said, capsys):
    extractor = load_backbone("mobilenet_v2")
    path = runtimes.export_path(runtimes.network_hash(extractor))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x08\x07partial")
    made = Featurizer(device="cpu", precision="fp32", runtime="onnxruntime", extractor=extractor)
    assert made.runtime == "onnxruntime"
    assert path.stat().st_size > 10 ** 6 and capsys.readouterr().err == ""


@pytest.mark.parametrize("winner", ["onnxruntime", "openvino", "torch"])
def test_auto_follows_the_measurement_once_per_machine(fresh_choices, monkeypatch, said, winner):
    calls = []
    monkeypatch.setattr(runtimes, "fastest", lambda *args: calls.append(args) or winner)
    extractor = load_backbone("mobilenet_v2")
    assert Featurizer(device="cpu", precision="fp32", extractor=extractor).runtime == winner
    machine.forget()  # a new process: the cache file answers
    again = Featurizer(device="cpu", precision="fp32", extractor=extractor)
    assert again.runtime == winner and len(calls) == 1 and (again.onnx is not None) == (winner != "torch")
    assert set(calls[0][1]) == set(runtimes.EXPORTED)  # every installed runtime was measured
    assert "network runtime of MobileNetV2" in fresh_choices.read_text()
    assert runtimes.export_path(again.network_hash).is_file()  # exported to be measured, either way


def test_the_measurement_times_every_runtime_in_turns(fresh_choices, monkeypatch):
    timed = []
    for name, value in (("PAUSE_S", 0.0), ("ROUNDS", 2), ("PROBE_BATCH", 2)):
        monkeypatch.setattr(runtimes, name, value)
    extractor = load_backbone("mobilenet_v2")
    featurizer = Featurizer(device="cpu", precision="fp32", runtime="torch", extractor=extractor)
    networks = {name: runtimes.exported_network(name, extractor, featurizer.network_hash) for name in runtimes.EXPORTED}
    timed_networks = {name: (lambda x, name=name: timed.append(name) or networks[name](x)) for name in networks}
    choice = runtimes.fastest(lambda x: timed.append("torch") or featurizer.torch_forward(x), timed_networks, 224,
                              "fp32")
    assert choice in ("torch", *runtimes.EXPORTED)
    assert timed == ["torch", *runtimes.EXPORTED] * (runtimes.ROUNDS + 1)


@pytest.mark.parametrize(("seconds", "precision", "chosen"), [
    ({"torch": 1.0, "onnxruntime": 0.5, "openvino": 0.4}, "fp32", "openvino"),
    ({"torch": 1.0, "onnxruntime": 0.97, "openvino": 0.99}, "fp32", "torch"),  # within the margin: the reference
    ({"torch": 1.0, "onnxruntime": 1.2, "openvino": 1.25}, "bf16", "onnxruntime"),  # bfloat16 not 1.3x faster
    ({"torch": 1.0, "onnxruntime": 1.4, "openvino": 1.5}, "bf16", "torch"),
])
def test_the_fastest_runtime_wins_by_a_margin_over_torch(monkeypatch, seconds, precision, chosen):
    monkeypatch.setattr(runtimes, "best_of_rounds", lambda runs, rounds: {name: seconds[name] for name in runs})
    exported = {name: (lambda x: x) for name in runtimes.EXPORTED}
    assert runtimes.fastest(lambda x: x, exported, 8, precision) == chosen


def test_explicit_choices_and_cuda(fresh_choices, monkeypatch):
    extractor = load_backbone("mobilenet_v2")
    monkeypatch.setattr(runtimes, "fastest", lambda *args: pytest.fail("measured an explicit choice"))
    assert Featurizer(device="cpu", runtime="torch", extractor=extractor).onnx is None
    assert Featurizer(device="cpu", precision="bf16", extractor=extractor).runtime == "torch"  # a reduced precision
    with pytest.raises(BadInput, match="unknown runtime 'tvm'"):
        Featurizer(device="cpu", runtime="tvm", extractor=extractor)
    for runtime in runtimes.EXPORTED:
        with pytest.raises(BadInput, match=f"the {runtime} runtime runs float32 on the CPU"):
            Featurizer(device="cpu", precision="bf16", runtime=runtime, extractor=extractor)
    cuda = torch.device("cuda")
    assert runtimes.choose("auto", extractor, "0" * 16, cuda, "fp16", False, lambda x: x) == ("torch", None)
    with pytest.raises(BadInput, match="float32 on the CPU"):
        runtimes.choose("onnxruntime", extractor, "0" * 16, cuda, "fp16", False, lambda x: x)


def test_a_missing_runtime_is_left_out_with_one_line(fresh_choices, monkeypatch, said, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    measured = []
    monkeypatch.setattr(runtimes, "fastest", lambda torch_forward, exported, *args: measured.append(set(exported))
                        or "openvino")
    extractor = load_backbone("mobilenet_v2")
    assert Featurizer(device="cpu", precision="fp32", extractor=extractor).runtime == "openvino"
    assert measured == [{"openvino"}]
    assert Featurizer(device="cpu", runtime="onnxruntime", extractor=extractor).runtime == "torch"
    missing = "ONNX Runtime is not installed (import of onnxruntime halted; None in sys.modules)"
    assert capsys.readouterr().err.splitlines() == [f"{missing}: the runtime is chosen among the others",
                                                    f"{missing}: the network runs on torch"]


def test_with_no_exported_runtime_installed_the_network_runs_on_torch(fresh_choices, monkeypatch, said, capsys):
    for module in runtimes.EXPORTED:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(runtimes, "fastest", lambda *args: pytest.fail("measured with nothing to measure"))
    extractor = load_backbone("mobilenet_v2")
    for runtime in ("auto", "openvino", "auto"):
        assert Featurizer(device="cpu", runtime=runtime, extractor=extractor).runtime == "torch"
    assert capsys.readouterr().err.splitlines() == [
        "ONNX Runtime is not installed (import of onnxruntime halted; None in sys.modules): the runtime is chosen "
        "among the others",
        "OpenVINO is not installed (import of openvino halted; None in sys.modules): the runtime is chosen among the "
        "others",
        "OpenVINO is not installed (import of openvino halted; None in sys.modules): the network runs on torch"]


def test_a_failed_export_falls_back_to_torch_with_one_line(fresh_choices, monkeypatch, said, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nsomewhere")

    monkeypatch.setattr(torch.onnx, "export", broken)
    extractor = load_backbone("mobilenet_v2")
    for _ in range(2):
        failed = Featurizer(device="cpu", precision="fp32", runtime="onnxruntime", extractor=extractor)
        assert failed.runtime == "torch"
    assert capsys.readouterr().err.splitlines() == [
        ("the ONNX export of mobilenet_v2 failed (RuntimeError: unsupported operator somewhere): "
         "the network runs on torch")]
    assert not (fresh_choices.parent / "onnx").exists()  # nothing cached


def test_what_computed_each_vector_is_recorded_and_another_network_refused(tmp_path, small_dir, fresh_choices,
                                                                             capsys):
    extractor = load_backbone("mobilenet_v2")
    with SQLiteStore(tmp_path / "db.sqlite") as store:
        ingest(store, small_dir, progress=False)
        on_onnx = Featurizer(device="cpu", precision="fp32", runtime="onnxruntime", extractor=extractor)
        report = featurize(store, on_onnx, batch_size=16, progress=False)
        assert (report.runtime, report.precision, report.added) == ("onnxruntime", "fp32", 36)
        assert store.feature_runtimes("mobilenet_v2") == {("onnxruntime", report.network_hash): 36}
        store.conn.execute("DELETE FROM features WHERE image_id IN (1, 2)")
        store.conn.commit()
        on_torch = featurize(store, Featurizer(device="cpu", precision="fp32", runtime="torch", extractor=extractor),
                             progress=False)
        assert on_torch.added == 2 and store.feature_runtimes("mobilenet_v2") == {
            ("onnxruntime", report.network_hash): 34, ("torch", report.network_hash): 2}
        store.conn.execute("DELETE FROM features WHERE image_id = 3")
        store.conn.commit()
        with torch.no_grad():
            next(extractor.parameters())[0, 0, 0, 0] += 0.5
        with pytest.raises(NotReady, match="computed by another network"):
            featurize(store, Featurizer(device="cpu", runtime="torch", extractor=extractor), progress=False)
        assert store.feature_counts() == {"mobilenet_v2": 35}
    db = str(tmp_path / "db.sqlite")
    assert main(["featurize", "--db", db, "-q", "--backbone", "mobilenet_v2", "--runtime", "torch",
                 "--precision", "fp32"]) == 0
    assert "(torch, " in capsys.readouterr().out
