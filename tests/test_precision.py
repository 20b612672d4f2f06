"""Precision chosen per machine by measurement (with the fallbacks forced), recorded with the features, and features
at the faster precision, and from JPEG draft decoding, within a tight cosine of float32 full decoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from image_similarity.core import machine
from image_similarity.core.images import decode_image
from image_similarity.features import precision
from image_similarity.features.backbones import prepare_image
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Eight real photos per class."""
    return [p.read_bytes() for label in ("dotted", "leopard", "striped")
            for p in sorted((SAMPLE_DATASET / label).iterdir())[:8]]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    assert [precision.resolve(p, CPU) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert precision.resolve("auto", CUDA) == "fp16"
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision.resolve("half", CPU)


@pytest.mark.parametrize("speedup, chosen", [(2.8, "bf16"), (1.05, "fp32"), (0.5, "fp32")])
def test_auto_on_cpu_follows_the_measured_speedup_once(fresh_choices, monkeypatch, speedup, chosen):
    calls = []
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: calls.append(1) or speedup)
    assert precision.resolve("auto", CPU) == chosen
    machine.forget()  # a new process: the cache file answers
    assert precision.resolve("auto", CPU) == chosen and len(calls) == 1
    assert machine.machine_key() in fresh_choices.read_text()


def test_choices_are_measured_again_when_the_kernels_are_capped(fresh_choices, monkeypatch):
    """Forcing another CPU's kernels (oneDNN's or OpenBLAS's cap, or torch's ATEN_CPU_CAPABILITY, which shows in
    its reported capability) is another machine for the cached choices: a bf16 choice made with AVX-512 kernels
    is not reused with AVX2 ones."""
    for name in machine.KERNEL_CAPS:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: calls.append(1) or (2.8 if len(calls) == 1 else 0.5))
    plain = machine.machine_key()
    assert torch.backends.cpu.get_cpu_capability() in plain
    assert precision.resolve("auto", CPU) == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    machine.forget()
    assert machine.machine_key() != plain and precision.resolve("auto", CPU) == "fp32" and len(calls) == 2
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    machine.forget()
    assert precision.resolve("auto", CPU) == "bf16" and len(calls) == 2  # the first machine's choice, from the file


def test_cpu_without_bf16_kernels_is_fp32_without_measuring(fresh_choices, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: pytest.fail("measured a CPU without bf16 kernels"))
    assert precision.resolve("auto", CPU) == "fp32"


def test_a_corrupt_cache_file_is_measured_again(fresh_choices, monkeypatch):
    fresh_choices.write_text("{not json")
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 3.0)
    assert precision.resolve("auto", CPU) == "bf16"
    assert "bf16" in fresh_choices.read_text()


def test_the_probe_measures_a_real_ratio():
    assert 0 < precision.bf16_speedup() < 100


def test_autocast_runs_at_the_precision():
    layer = torch.nn.Linear(4, 4)
    with precision.autocast("bf16", CPU):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with precision.autocast("fp32", CPU):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_bf16_features_of_real_photos_stay_close_to_fp32(photos, featurizer):
    fp32, bf16 = Featurizer(device="cpu", precision="fp32"), Featurizer(device="cpu", precision="bf16")
    batch = np.stack([fp32.prepare(data) for data in photos])
    exact, fast = fp32.forward(batch), bf16.forward(batch)
    assert fast.dtype == np.float32 and not np.array_equal(exact, fast)  # really computed another way
    assert cosines(exact, fast).min() >= 0.995


def test_the_bf16_trace_serves_every_batch_size(photos):
    """At bf16 on a CPU the forward pass runs a frozen TorchScript trace made from the first batch's first image;
    batches of other sizes give the same features as in the first batch (24 photos), whichever batch came first,
    and float32 never traces."""
    fp32, bf16 = Featurizer(device="cpu", precision="fp32"), Featurizer(device="cpu", precision="bf16")
    batch = np.stack([bf16.prepare(data) for data in photos])
    whole = bf16.forward(batch)
    assert isinstance(bf16.traced, torch.jit.ScriptModule)
    assert cosines(bf16.forward(batch[5:7]), whole[5:7]).min() >= 0.9999
    pair_first = Featurizer(device="cpu", precision="bf16")
    pair = pair_first.forward(batch[5:7])
    assert cosines(pair_first.forward(batch), whole).min() >= 0.9999 and cosines(pair, whole[5:7]).min() >= 0.9999
    assert cosines(fp32.forward(batch[5:7]), whole[5:7]).min() >= 0.995 and fp32.traced is None


def test_draft_decoding_of_large_jpegs_stays_close_to_full_decoding(photos, featurizer):
    """Real photos enlarged to about 12 megapixels: decoded at 1/8 scale, features as from the full decode."""
    large = []
    for data in photos[::4]:
        image = decode_image(data)
        big = image.resize((image.width * 14, image.height * 14), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=90)
        large.append(buffer.getvalue())
    drafted = decode_image(large[0], min_side=featurizer.spec.resize)
    assert featurizer.spec.resize <= min(drafted.size) < min(decode_image(large[0]).size) / 4
    full = np.stack([prepare_image(decode_image(data), featurizer.spec) for data in large])
    fast = np.stack([featurizer.prepare(data) for data in large])
    assert cosines(featurizer.forward(full), featurizer.forward(fast)).min() >= 0.995


def test_the_precision_is_recorded_with_every_vector(tmp_path, small_dir, featurizer):
    with SQLiteStore(tmp_path / "db.sqlite") as store:
        ingest(store, small_dir, progress=False)
        report = featurize(store, featurizer, batch_size=16, progress=False)
        assert report.precision == featurizer.precision
        assert store.feature_precisions(featurizer.backbone) == {featurizer.precision: 36}
        store.conn.execute("DELETE FROM images WHERE id IN (1, 2)")
        store.conn.commit()
        assert store.feature_precisions(featurizer.backbone) == {featurizer.precision: 34}  # deleted with them
