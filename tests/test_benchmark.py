"""The benchmark script runs end to end (tiny sizes) and reports every figure the README promises."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("fp32", "fp16", "bf16", "int8")
KEYS = ("featurize_forward_speedup", "featurize_pipeline_vs_forward", "featurize_chosen_vs_fastest",
        "rank_100k_vs_loop", "rank_100k_vs_matvec",
        "query_ms_100k", "ann_recall_at_10_1m", "ann_speedup_1m")


def package_env() -> dict[str, str]:
    """The environment with this checkout's package first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "Python"), os.environ.get("PYTHONPATH", "")])}


def test_smoke_run_emits_the_figures_and_the_plot(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=package_env(), timeout=300, check=True)
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
    # the CPU time the service process and the load together spent per request (read from /proc)
    assert all(s["cpu_ms_per_request"] > 0 for s in service) and result["machine"]["cpus"] >= 1
    assert result["service_8_vs_1_clients"] == service[1]["requests_per_s"] / service[0]["requests_per_s"]
    feats = result["featurize"][0]
    assert {"torch fp32", "onnxruntime fp32", "openvino fp32"} <= set(feats["runtime_ips"])
    assert feats["chosen"] in feats["runtime_ips"]
    assert feats["chosen_vs_fastest"] == feats["runtime_ips"][feats["chosen"]] / max(feats["runtime_ips"].values())
    assert result["machine"]["onnxruntime"] and result["machine"]["openvino"]
    assert set(result["machine"]["kernel_caps"]) == {
        "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE"}


def run_without(module: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """The script run as __main__ in a Python where `import module` fails, as where it is not installed."""
    code = (f"import os, runpy, sys; sys.modules[{module!r}] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=package_env(), timeout=120)


@pytest.mark.parametrize(("script", "module", "name"), [("run.py", "onnxruntime", "ONNX Runtime"),
                                                         ("runtimes.py", "openvino", "OpenVINO")])
def test_the_benchmarks_refuse_to_report_ratios_without_their_peers(script, module, name):
    done = run_without(module, script, "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"benchmarks/{script}: {name} is not installed")
    assert "installs nothing" in done.stderr and len(done.stderr.splitlines()) == 1


def test_the_gpu_check_says_when_there_is_no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: run benchmarks/gpu.py itself (minutes)")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                          env=package_env(), timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (f"benchmarks/gpu.py: no CUDA GPU here (torch {torch.__version__}, built for CUDA "
                                   f"{torch.version.cuda or 'none'}): nothing to check")


def test_neighbors_benchmark_compares_the_step_with_float32_only():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "neighbors.py"), "--vectors", "2000", "--rows",
                           "40", "--blocks", "2", "--json"], capture_output=True, text=True, env=package_env(),
                          timeout=300, check=True)
    result = json.loads(done.stdout)
    assert (result["vectors"], result["rows_per_block"], result["blocks"]) == (2000, 40, 2)
    assert result["ratio"] == result["step_s"] / result["float32_s"] and result["ratio"] > 0
    # the same ids: these seeded vectors' top-11 scores are at least 3.4e-6 apart, far above float32's rounding
    assert result["blocks_with_the_same_ids"] == 2


def test_a_spawned_childs_peak_rss_is_its_own_not_its_parents(tmp_path):
    """The featurizing child's peak RSS figure: a parent that holds 800 MiB spawns a child, as the benchmark does; the
    child's figure is its own size, while getrusage's ru_maxrss in the same child reports the parent's."""
    script = tmp_path / "spawn_peak.py"
    script.write_text(
        "import resource, sys\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from multiprocessing import get_context\n"
        "import numpy as np\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import run\n"
        "def figures():\n"
        "    return run.own_peak_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "if __name__ == '__main__':\n"
        "    ballast = np.ones(800 * 2 ** 20 // 8)  # 800 MiB, every page written\n"
        "    with ProcessPoolExecutor(1, mp_context=get_context('spawn')) as pool:\n"
        "        print(*pool.submit(figures).result(), run.own_peak_mib())\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=package_env(),
                          timeout=300, check=True)
    child, child_maxrss, parent = map(float, done.stdout.split())
    assert parent > 800 and child_maxrss > 800  # ru_maxrss: the parent's size at the fork
    assert child < parent - 600  # the child's own: no ballast
