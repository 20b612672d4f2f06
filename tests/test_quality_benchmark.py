"""The quality benchmark runs end to end on a small real data set, frozen and refined, and reports every figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from image_similarity.search.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_frozen_and_refined(small_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "Python"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), str(small_dir), "--backbones",
               "efficientnet_lite0", "--refine", "--epochs", "1", "--db", str(tmp_path / "q.sqlite"), "-q"]
    result = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, env=env, timeout=900,
                                       check=True).stdout)
    assert result["images"] == 36 and result["split"] == {"train": 27, "test": 9, "unlabelled": 0}
    frozen, refined = result["rows"]
    assert (frozen["variant"], frozen["network"]) == ("frozen", "efficientnet_lite0")
    assert refined["variant"] == "refined" and refined["network"].startswith("efficientnet_lite0_refined_")
    for row in result["rows"]:
        assert 0 < row["test_accuracy"] <= 1 and row["best_method"] in METHODS and row["seconds"] > 0
        assert set(row["ranking"]) == set(METHODS)
        assert all(0 <= r["top1"] <= r["top5"] <= r["top10"] <= 1 for r in row["ranking"].values())
    # a rerun on the kept database resumes every step and prints the same figures as a table
    table = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=True).stdout
    scores = refined["ranking"]["scores"]
    assert f"| scores{' (best)' if refined['best_method'] == 'scores' else ''} | {100 * scores['top1']:.1f}%" in table
    assert table.count("| efficientnet_lite0 |") == 2
