"""The benchmark script runs end to end (tiny sizes) and reports every figure the README promises."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("fp32", "fp16", "bf16", "int8")
KEYS = ("featurize_forward_speedup", "featurize_pipeline_vs_forward", "rank_100k_vs_loop", "rank_100k_vs_matvec",
        "query_ms_100k", "ann_recall_at_10_1m", "ann_speedup_1m")


def test_smoke_run_emits_the_figures_and_the_plot(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "Python"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, check=True)
    result = json.loads(done.stdout)
    assert result["mode"] == "smoke"
    assert set(result["machine"]) >= {"cpu", "cpu_flags", "torch", "threads", "precision", "scan_kernel"}
    assert result["machine"]["precision"] in ("fp32", "bf16") and result["machine"]["scan_kernel"] in KERNELS
    assert {r["kernel"] for r in result["ranking"]} == {"fp32"}  # below the 16-bit scan's threshold
    assert all(isinstance(result[k], float) and math.isfinite(result[k]) and result[k] > 0 for k in KEYS)
    assert 0.9 <= result["ann_recall_at_10_1m"] <= 1
    assert result["rank_100k_vs_loop"] > 1  # even at smoke size the vectorised search beats the loop
    assert [r["n"] for r in result["ranking"]] == [1_000, 5_000]
    assert set(result["peak_rss_mib"]) == {"8", "16"}
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    service = result["service"]  # serve under 1 and 8 clients, every answer checked against the photo's alone
    assert [s["clients"] for s in service] == [1, 8] and all(s["errors"] == 0 for s in service)
    assert all(0 < s["p50_ms"] <= s["p95_ms"] and s["requests_per_s"] > 0 for s in service)
    assert result["service_8_vs_1_clients"] == service[1]["requests_per_s"] / service[0]["requests_per_s"]


def test_neighbors_benchmark_compares_the_step_with_float32_only():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "Python"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "neighbors.py"), "--vectors", "2000", "--rows",
                           "40", "--blocks", "2", "--json"], capture_output=True, text=True, env=env, timeout=300,
                          check=True)
    result = json.loads(done.stdout)
    assert (result["vectors"], result["rows_per_block"], result["blocks"]) == (2000, 40, 2)
    assert result["ratio"] == result["step_s"] / result["float32_s"] and result["ratio"] > 0
    # the same ids: these seeded vectors' top-11 scores are at least 3.4e-6 apart, far above float32's rounding
    assert result["blocks_with_the_same_ids"] == 2
