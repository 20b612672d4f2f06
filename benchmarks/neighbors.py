"""Benchmark of one `neighbors` block against its float32-only baseline, in one process, taking turns.

The step bounds each block's scores by a float32 matrix product, then re-scores every query row's candidates in
float64 (so a table does not depend on the block size). The baseline is what the step did before (issue 25): the
same product's float32 scores, the same near-duplicate masks, and each row's best k taken from them directly.
Both use the same catalogue (clustered vectors, random dHashes) and the same blocks; the ratio is what the
exactness costs.

    PYTHONPATH=Python python benchmarks/neighbors.py [--vectors 100000] [--rows 223] [--blocks 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DIM, clustered, synthetic_catalogue  # noqa: E402

from image_similarity.core import machine  # noqa: E402
from image_similarity.pipeline.neighbors import Twins, block_rows, neighbor_rows  # noqa: E402
from image_similarity.search.searchers import ExactSearcher, best_positions, scorer  # noqa: E402

K = 10


def float32_rows(searcher: ExactSearcher, twins: Twins, positions: np.ndarray, k: int) -> list[tuple]:
    """The baseline: each row's best k straight from the block's float32 similarities."""
    ids = searcher.catalogue.ids
    scores = searcher.similarity(searcher.catalogue.features[positions])
    scores[twins.of(positions)] = -np.inf
    return [(int(query), r + 1, int(ids[b]), float(row[b]))
            for query, row in zip(ids[positions], scores) for r, b in enumerate(best_positions(row, k))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000, help="catalogue size (default: 100000)")
    parser.add_argument("--rows", type=int, help="query rows per block (default: the step's, for 512 MB)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks timed for each (default: 4)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    catalogue = synthetic_catalogue(clustered(args.vectors, DIM))
    exact, twins = scorer(catalogue, "cosine"), Twins(catalogue)
    rows = args.rows or block_rows(args.vectors)
    times: dict[str, list[float]] = {"step": [], "float32": []}
    same_ids = 0
    for block in range(args.blocks):
        positions = np.arange(block * rows, (block + 1) * rows) % args.vectors
        found = {}
        for name, fn in (("step", neighbor_rows), ("float32", float32_rows)):
            start = time.perf_counter()
            found[name] = fn(exact, twins, positions, K)
            times[name].append(time.perf_counter() - start)
        same_ids += [r[:3] for r in found["step"]] == [r[:3] for r in found["float32"]]
    step, base = float(np.median(times["step"])), float(np.median(times["float32"]))
    result = {"machine": machine.describe(), "vectors": args.vectors, "dim": DIM, "k": K, "rows_per_block": rows,
              "blocks": args.blocks, "step_s": step, "float32_s": base, "ratio": step / base,
              "blocks_with_the_same_ids": same_ids}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        m = result["machine"]
        print(f"{m['cpu']} ({', '.join(m['cpu_flags'])}), torch {m['torch']}, {m['threads']} threads")
        print(f"neighbors of {rows} rows against {args.vectors:,} vectors x {DIM}, top {K}, cosine, median of "
              f"{args.blocks} blocks: step {step:.3f} s, float32-only {base:.3f} s, ratio {step / base:.2f}x; "
              f"the same ids in {same_ids} of {args.blocks} blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
