"""Benchmarks: featurization throughput, query latency and ranking at scale, the web service under load, and where
they ran.

Every figure is printed next to a baseline measured in the same run, as a ratio, because the machines are
shared and noisy: compare ratios across commits, not seconds. Times are the best of a few repeats. The output
starts with the machine (CPU model and flags, torch version, threads, kernel caps) and the precision, network
runtime and scan kernel chosen. It installs nothing, and refuses to run without ONNX Runtime and OpenVINO, the
peers the chosen network runtime is compared with.

    PYTHONPATH=Python python benchmarks/run.py [--quick | --smoke] [--json] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from image_similarity.core import machine
from image_similarity.errors import Unavailable
from image_similarity.features.backbones import BACKBONES as BACKBONE_SPECS
from image_similarity.features.precision import cpu_bf16_supported, resolve
from image_similarity.features.runtimes import EXPORTED, best_of_rounds, runtime_version
from image_similarity.pipeline.featurize import Featurizer, featurize
from image_similarity.pipeline.ingest import class_files, ingest_bytes
from image_similarity.pipeline.rank import rank_with
from image_similarity.resources import SAMPLE_DATASET
from image_similarity.search.catalogue import Catalogue
from image_similarity.search.screen import scan_kernel
from image_similarity.search.searchers import searcher
from image_similarity.store import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_web  # benchmarks/load_web.py, beside this script

BACKBONES = ("efficientnet_lite0", "mobilenet_v2")
BATCH_SIZE = 32

# mode -> sizes: featurization images, peak-RSS image counts, exact catalogue sizes, ANN catalogue size
MODES = {
    "full": dict(images=557, rss=(1_000, 10_000), catalogue=(10_000, 100_000, 1_000_000), ann=1_000_000),
    "quick": dict(images=96, rss=(200, 1_000), catalogue=(10_000, 100_000, 300_000), ann=300_000),
    "smoke": dict(images=8, rss=(8, 16), catalogue=(1_000, 5_000), ann=5_000),
}
SERVICE = {"full": {"images": 557, "requests": 200, "rounds": 3},
           "quick": {"images": 96, "requests": 100, "rounds": 2},
           "smoke": {"images": 8, "requests": 8, "rounds": 1}}
"""The web service's load, by mode: catalogue images, timed requests per round, rounds of 1 and of 8 clients."""
DIM = BACKBONE_SPECS[BACKBONES[0]].feature_dim  # catalogues up to 100k: the first backbone's features (1584)
SMALL_DIM = 256  # larger catalogues (memory)
ANN_QUERIES = 200
ROUNDS = 3  # of the featurize runtimes and step


def best_of(fns: list[Callable[[], object]], repeats: int = 3) -> list[float]:
    """The fastest of `repeats` runs of each fn, in seconds; the fns take turns, so they share the noise."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def photo_store(path: Path, n: int) -> SQLiteStore:
    """A store of n bundled photos, ingested by the engine; beyond 557, copies with a few bytes appended after
    the image data (decoded the same, distinct sha256)."""
    photos = [(name, label, p.read_bytes()) for name, label, p in class_files(SAMPLE_DATASET)]
    store = SQLiteStore(path)
    for i in range(n):
        name, label, data = photos[i % len(photos)]
        copy = i // len(photos)
        ingest_bytes(store, f"{copy}/{name}" if copy else name, label, data + b"\0" * copy)
    return store


# --- featurization ---------------------------------------------------------------------------------------

def candidates(backbone: str) -> dict[str, Featurizer]:
    """Every way this machine can run the network: torch at float32 (and bfloat16 where oneDNN has the kernels),
    ONNX Runtime and OpenVINO at float32; named "runtime precision"."""
    runs = {"torch fp32": Featurizer(backbone, device="cpu", precision="fp32", runtime="torch")}
    runs |= {f"{name} fp32": Featurizer(backbone, device="cpu", precision="fp32", runtime=name) for name in EXPORTED}
    if cpu_bf16_supported():
        runs["torch bf16"] = Featurizer(backbone, device="cpu", precision="bf16", runtime="torch")
    return runs


def featurization(backbone: str, n: int, workdir: Path) -> dict:
    """Images/s of the network's forward pass on every runtime (taking turns, a pause before each so one runtime's
    spinning threads do not slow the next), the chosen one's ratio to the fastest, and the whole featurize step from
    the store with the chosen runtime and precision against the chosen forward pass."""
    featurizer, runs = Featurizer(backbone, device="cpu"), candidates(backbone)
    chosen = f"{featurizer.runtime} {featurizer.precision}"
    with photo_store(workdir / f"feat-{backbone}.sqlite", n) as store:
        batches = [np.stack([featurizer.prepare(data) for _, data in items])
                   for items in store.missing_features(backbone, BATCH_SIZE)]

        def forward(run: Featurizer) -> Callable[[], object]:
            return lambda: [run.forward(b) for b in batches]

        def pipeline() -> None:
            store.conn.execute("DELETE FROM features")
            store.conn.commit()
            featurize(store, featurizer, batch_size=BATCH_SIZE, progress=False)

        seconds = best_of_rounds({**{name: forward(run) for name, run in runs.items()}, "pipeline": pipeline},
                                 ROUNDS)
    ips = {name: n / seconds[name] for name in runs}
    fastest = max(ips, key=ips.get)
    return {"backbone": backbone, "images": n, "chosen": chosen, "runtime_ips": ips, "fastest": fastest,
            "chosen_vs_fastest": ips[chosen] / ips[fastest], "precision": featurizer.precision,
            "fp32_forward_ips": ips["torch fp32"], "forward_ips": ips[chosen], "pipeline_ips": n / seconds["pipeline"],
            "forward_speedup": ips[chosen] / ips["torch fp32"], "ratio": seconds[chosen] / seconds["pipeline"]}


def _peak_rss_child(n: int, workdir: str) -> float:
    """In a fresh process: featurize n images from a store; peak RSS in MiB. On Linux it is the high-water mark of
    the process's own memory (VmHWM): getrusage's ru_maxrss survives exec, so a spawned child would report its
    parent's size at the fork (this benchmark's parent holds every runtime of both networks by then)."""
    with photo_store(Path(workdir) / f"rss-{n}.sqlite", n) as store:
        featurize(store, Featurizer(BACKBONES[0], device="cpu"), batch_size=BATCH_SIZE, progress=False)
    return own_peak_mib()


def own_peak_mib() -> float:
    """This process's own peak RSS in MiB: VmHWM on Linux, where ru_maxrss keeps the size of the parent it was
    forked from across exec; ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        return int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:"))) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(n: int, workdir: Path) -> float:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_peak_rss_child, n, str(workdir)).result()


# --- ranking ---------------------------------------------------------------------------------------------

def clustered(n: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """n float32 vectors around `clusters` random centres, non-negative like pooled CNN features."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, (clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: no float64 temporaries of the full size
        stop = min(start + 100_000, n)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * 0.35
        out[start:stop] = np.maximum(centres[rng.integers(0, clusters, stop - start)] + noise, 0)
    return out


def synthetic_catalogue(vectors: np.ndarray) -> Catalogue:
    n = len(vectors)
    rng = np.random.default_rng(1)
    dhashes = [row.tobytes().hex() for row in rng.integers(0, 256, (n, 32), dtype=np.uint8)]
    return Catalogue(np.arange(n), [f"img{i}" for i in range(n)], ["x"] * n, [f"{i:064x}" for i in range(n)],
                     dhashes, vectors)


def per_row_loop(features: np.ndarray, query: np.ndarray, top: int = 10) -> list[int]:
    """The original scoring script: one distance call per catalogue row, then a sort."""
    distances = [np.linalg.norm(query - row) for row in features]
    return sorted(range(len(distances)), key=distances.__getitem__)[:top]


def ranking(n: int, query_bytes: bytes, featurizer: Featurizer, loop: bool) -> dict:
    """Exact l2 search at size n vs the bare matrix-vector product and (when `loop`) the per-row loop."""
    dim = DIM if n <= 100_000 else SMALL_DIM
    catalogue = synthetic_catalogue(clustered(n, dim))
    exact = searcher(catalogue, "l2", index="exact")
    query = catalogue.features[n // 2] + 0.01
    # the float32 mat-vec in torch, as fast as numpy's alone; taking turns with numpy's would leave its BLAS
    # threads spinning into each search (see machine.one_blas_thread), slowing the search, not the baseline
    matrix, vector = torch.from_numpy(catalogue.features), torch.from_numpy(query)
    matvec_s, search_s = best_of([lambda: torch.mv(matrix, vector), lambda: exact.search(query)], 10)
    out = {"n": n, "dim": dim, "kernel": exact.copy.kernel.name if exact.strategy == "screened" else "fp32",
           "matvec_ms": 1e3 * matvec_s, "search_ms": 1e3 * search_s}
    if loop:
        out["loop_ms"] = 1e3 * best_of([lambda: per_row_loop(catalogue.features, query)], 1)[0]
    if dim == featurizer.spec.feature_dim:
        out["query_ms"] = 1e3 * best_of([lambda: rank_with(exact, query_bytes, featurizer)], 5)[0]
    return out


def approximate(n: int) -> dict:
    """Recall@10 of the HNSW path against exact search, and the speed-up, on clustered vectors."""
    vectors = clustered(n + ANN_QUERIES, SMALL_DIM)
    queries, vectors = vectors[:ANN_QUERIES], vectors[ANN_QUERIES:]  # held out: not in the catalogue
    catalogue = synthetic_catalogue(vectors)  # one catalogue, both ways: its features are shared
    exact = searcher(catalogue, "l2", index="exact")
    start = time.perf_counter()
    graph = searcher(catalogue, "l2", index="hnsw")
    build_s = time.perf_counter() - start
    hits, exact_s, ann_s = 0, [], []
    for q in queries:
        t0 = time.perf_counter()
        truth = {m.image_id for m in exact.search(q)}
        t1 = time.perf_counter()
        found = {m.image_id for m in graph.search(q)}
        t2 = time.perf_counter()
        hits += len(truth & found)
        exact_s.append(t1 - t0)
        ann_s.append(t2 - t1)
    exact_ms, ann_ms = 1e3 * float(np.median(exact_s)), 1e3 * float(np.median(ann_s))
    return {"n": n, "dim": SMALL_DIM, "recall_at_10": hits / (10 * len(queries)), "exact_ms": exact_ms,
            "ann_ms": ann_ms, "speedup": exact_ms / ann_ms, "build_s": build_s}


# --- the web service ------------------------------------------------------------------------------------

def service_load(mode: str, workdir: Path) -> list[dict]:
    """`image-similarity serve` on bundled photos (featurized, no model: cosine), started in its own process, under
    1 and then 8 concurrent clients, alternating rounds: the median round's requests/s, p50/p95 and errors of each
    (benchmarks/load_web.py)."""
    sizes = SERVICE[mode]
    path = workdir / "service.sqlite"
    with photo_store(path, sizes["images"]) as store:
        featurize(store, Featurizer(BACKBONES[0], device="cpu"), batch_size=BATCH_SIZE, progress=False)
    return load_web.service_on(str(path), (1, 8), sizes["requests"], sizes["rounds"], per_class=2)["this"]


# --- report ----------------------------------------------------------------------------------------------

def plot(rows: list[dict], ann: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = [r["n"] for r in rows]
    ax.plot(n, [r["search_ms"] for r in rows], "o-", label="exact l2 search (searchers.searcher)")
    ax.plot(n, [r["matvec_ms"] for r in rows], "s--", label="bare matrix-vector product (floor)")
    looped = [r for r in rows if "loop_ms" in r]
    ax.plot([r["n"] for r in looped], [r["loop_ms"] for r in looped], "x:", label="per-row Python loop")
    ax.plot([ann["n"]], [ann["ann_ms"]], "*", markersize=14, label=f"HNSW (recall@10 {ann['recall_at_10']:.3f})")
    for r in rows:
        ax.annotate(f"d={r['dim']}", (r["n"], r["search_ms"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="catalogue size (vectors)", ylabel="latency per query (ms)",
           title="Ranking one query (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def where() -> dict:
    """The machine, and what was chosen on it (measured, or read from the cache of earlier measurements)."""
    return {**machine.describe(), "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
            os.cpu_count(), "precision": resolve("auto", torch.device("cpu")), "scan_kernel": scan_kernel(),
            **{name: runtime_version(name) for name in EXPORTED},
            "kernel_caps": {name: os.environ.get(name, "") for name in ("ATEN_CPU_CAPABILITY", *machine.KERNEL_CAPS)}}


def run(mode: str, out_dir: Path) -> dict:
    sizes = MODES[mode]
    ran_on = where()
    backbones = BACKBONES[:1] if mode == "smoke" else BACKBONES
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        feats = [featurization(b, sizes["images"], workdir) for b in backbones]
        rss = {n: peak_rss(n, workdir) for n in sizes["rss"]}
        featurizer = Featurizer(BACKBONES[0], device="cpu")
        with photo_store(workdir / "query.sqlite", 1) as store:
            query_bytes = store.image_bytes(store.images()[0].id)
        rows = [ranking(n, query_bytes, featurizer, loop=n <= 100_000) for n in sizes["catalogue"]]
        service = service_load(mode, workdir)
    ann = approximate(sizes["ann"])
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, ann, out_dir / "latency.png")
    head = next((r for r in rows if r["n"] == 100_000), rows[-1])
    small, large = min(sizes["rss"]), max(sizes["rss"])
    return {
        "mode": mode,
        "machine": ran_on,
        "sizes": {"featurize_images": sizes["images"], "rss_images": list(sizes["rss"]),
                  "rank_catalogue": head["n"], "ann_catalogue": ann["n"], "ann_dim": ann["dim"]},
        "featurize_forward_speedup": feats[0]["forward_speedup"],
        "featurize_pipeline_vs_forward": min(f["ratio"] for f in feats),
        "featurize_chosen_vs_fastest": min(f["chosen_vs_fastest"] for f in feats),
        "featurize": feats,
        "peak_rss_mib": {str(n): v for n, v in rss.items()},
        "peak_rss_growth": rss[large] / rss[small],
        "rank_100k_vs_loop": head["loop_ms"] / head["search_ms"],
        "rank_100k_vs_matvec": head["search_ms"] / head["matvec_ms"],
        "query_ms_100k": head["query_ms"],
        "ranking": rows,
        "ann_recall_at_10_1m": ann["recall_at_10"],
        "ann_speedup_1m": ann["speedup"],
        "ann": ann,
        "service": service,
        "service_8_vs_1_clients": service[1]["requests_per_s"] / service[0]["requests_per_s"],
        "plot": str(out_dir / "latency.png"),
    }


def table(result: dict) -> str:
    s, m = result["sizes"], result["machine"]
    lines = [f"mode: {result['mode']}" + ("" if result["mode"] == "full" else
             f" (smaller sizes: 'rank 100k' is {s['rank_catalogue']:,}, 'ANN 1m' is {s['ann_catalogue']:,} vectors)"),
             *machine_lines(m), "", *featurize_table(result)]
    lines.append("  goals: chosen >= 0.95x the fastest runtime for every backbone, whole step >= 0.80x its forward")
    rss = result["peak_rss_mib"]
    lines += ["  peak RSS: " + ", ".join(f"{int(n):,} images {v:.0f} MiB" for n, v in rss.items())
              + f"  (growth x{result['peak_rss_growth']:.2f})", "",
              "rank one query, exact l2 (synthetic clustered vectors; ms, best of repeats):",
              f"  {'size':>10} {'dim':>5} {'kernel':>6} {'loop':>9} {'matvec':>8} {'search':>8} {'vs loop':>8}"
              f" {'vs matvec':>9} {'whole query':>12}"]
    for r in result["ranking"]:
        loop = f"{r['loop_ms']:9.1f}" if "loop_ms" in r else f"{'-':>9}"
        speed = f"{r['loop_ms'] / r['search_ms']:7.1f}x" if "loop_ms" in r else f"{'-':>8}"
        query = f"{r['query_ms']:12.1f}" if "query_ms" in r else f"{'-':>12}"
        lines.append(f"  {r['n']:>10,} {r['dim']:>5} {r['kernel']:>6} {loop} {r['matvec_ms']:8.2f} "
                     f"{r['search_ms']:8.2f} {speed} {r['search_ms'] / r['matvec_ms']:8.2f}x {query}")
    a = result["ann"]
    lines += ["  goals at 100k: >= 20x the loop, <= 0.8x the matvec, whole query (decode, featurize, near-duplicate"
              " check, rank) < 40 ms", "",
              f"approximate (HNSW, faiss) vs exact l2 at {a['n']:,} x {a['dim']} clustered vectors, "
              f"{ANN_QUERIES} held-out queries:",
              f"  recall@10 {a['recall_at_10']:.3f}, exact {a['exact_ms']:.2f} ms, HNSW {a['ann_ms']:.3f} ms, "
              f"speed-up {a['speedup']:.0f}x, index built in {a['build_s']:.1f} s", "",
              (f"web service (serve, its own process; bundled photos; median of {result['service'][0]['rounds']} "
               "alternating rounds):"), *load_web.service_table({"serve": result["service"]}),
              *service_bound(result["service"], result["machine"]["cpus"]),
              "  goals: 8 clients >= 1.5x one client's requests/s, 0 errors", "", f"plot: {result['plot']}"]
    return "\n".join(lines)


def service_bound(service: list[dict], cpus: int) -> list[str]:
    """What the CPU allows: with every core busy, 8 clients get at most cpus / (CPU time per request) requests/s;
    as a ratio to one client's requests/s, the most any scheduling of the service could reach here."""
    one, many = service[0], service[-1]
    if many.get("cpu_ms_per_request") is None:
        return []
    most = 1e3 * cpus / many["cpu_ms_per_request"]
    return [f"  CPU per request (service and load together): {one['cpu_ms_per_request']:.1f} ms with 1 client, "
            f"{many['cpu_ms_per_request']:.1f} ms with {many['clients']}: {cpus} cores serve at most {most:.0f} "
            f"requests/s = {most / one['requests_per_s']:.2f}x one client's"]


def peers_installed(script: str) -> bool:
    """Whether the runtimes the chosen one is compared with are installed; one line on stderr when not."""
    try:
        for name in EXPORTED:
            runtime_version(name)
    except Unavailable as err:  # a ratio to the fastest runtime means nothing without the runtimes
        print(f"{script}: {err}; it measures the network on every runtime and installs nothing: "
              "install the package's dependencies (pip install -e .)", file=sys.stderr)
        return False
    return True


def featurize_table(result: dict) -> list[str]:
    """The featurize figures per backbone: each runtime's img/s, the chosen one's ratios, the whole step."""
    lines = [f"featurize on CPU, batch {BATCH_SIZE}, {result['sizes']['featurize_images']} bundled photos (img/s of "
             "the forward pass per runtime; the whole step with the chosen one):"]
    for f in result["featurize"]:
        per = "  ".join(f"{name} {ips:.1f}" for name, ips in f["runtime_ips"].items())
        lines += [f"  {f['backbone']}: {per}",
                  f"    chosen {f['chosen']}: {f['chosen_vs_fastest']:.2f}x the fastest ({f['fastest']}); "
                  f"{f['forward_speedup']:.2f}x torch fp32; whole step {f['pipeline_ips']:.1f} img/s = "
                  f"{f['ratio']:.2f}x the chosen forward"]
    return lines


def machine_lines(m: dict) -> list[str]:
    return [f"machine: {m['cpu']}; flags {' '.join(m['cpu_flags']) or '-'}; torch {m['torch']} "
            f"({m['cpu_capability']}), {m['threads']} threads",
            f"chosen here: forward precision {m['precision']}, exact scan kernel {m['scan_kernel']}",
            f"kernel caps: {' '.join(f'{k}={v}' for k, v in m['kernel_caps'].items() if v) or 'none'}; "
            f"onnxruntime {m['onnxruntime']}, openvino {m['openvino']} (their kernels follow the CPU's flags: no cap)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark featurization and ranking; every figure is a ratio "
                                                 "to a baseline measured in the same run.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, one backbone: checks that it runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=Path, default=Path("benchmark-output"), help="folder for latency.png")
    args = parser.parse_args(argv)
    if not peers_installed("benchmarks/run.py"):
        return 2
    result = run("smoke" if args.smoke else "quick" if args.quick else "full", args.out)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
