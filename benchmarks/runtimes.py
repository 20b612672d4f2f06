"""The featurize figures of benchmarks/run.py alone: each runtime's img/s per backbone, the chosen one's ratio to the
fastest and the whole featurize step's to the chosen forward pass, and where it ran. Minutes instead of run.py's
quarter hour, so it can be repeated under kernel caps (docs/runtimes.md). Installs nothing; refuses to run without
ONNX Runtime and OpenVINO.

    PYTHONPATH=Python python benchmarks/runtimes.py [--images N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from run import BACKBONES, featurization, featurize_table, machine_lines, peers_installed, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Each runtime's featurize speed per backbone, and the chosen one's.")
    parser.add_argument("--images", type=int, default=96, help="bundled photos to featurize (default 96)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if not peers_installed("benchmarks/runtimes.py"):
        return 2
    ran_on = where()
    with tempfile.TemporaryDirectory() as tmp:
        feats = [featurization(backbone, args.images, Path(tmp)) for backbone in BACKBONES]
    result = {"machine": ran_on, "sizes": {"featurize_images": args.images}, "featurize": feats,
              "featurize_chosen_vs_fastest": min(f["chosen_vs_fastest"] for f in feats),
              "featurize_pipeline_vs_forward": min(f["ratio"] for f in feats)}
    print(json.dumps(result, indent=1) if args.json else "\n".join([*machine_lines(ran_on), *featurize_table(result)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
