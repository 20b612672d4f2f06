"""Load test of a running web service on loopback: rank requests from several threads; requests/s, latency, errors.

    image-similarity serve --port 8000 &
    python benchmarks/load_web.py --url http://127.0.0.1:8000 --requests 50 --threads 4

Each photo is ranked once first (not timed) for its reference answer; a timed request is an error unless it
answers 200 with the same images in the same order.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "fashion-texture"


@dataclass
class LoadReport:
    requests: int
    threads: int
    seconds: float
    latencies: list[float]
    errors: list[str]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def __str__(self) -> str:
        return (f"{self.requests} requests from {self.threads} threads in {self.seconds:.2f} s: "
                f"{self.requests / self.seconds:.1f} requests/s, latency p50 {1000 * self.percentile(50):.0f} ms, "
                f"p95 {1000 * self.percentile(95):.0f} ms, max {1000 * max(self.latencies, default=0):.0f} ms; "
                f"{len(self.errors)} errors")


def sample_photos(per_class: int = 4) -> list[Path]:
    """The first photos of each class of the bundled sample."""
    return [p for d in sorted(SAMPLE.iterdir()) if d.is_dir() for p in sorted(d.iterdir())[:per_class]]


def _ids(response: httpx.Response) -> list[int]:
    return [m["id"] for m in response.json()["matches"]]


def run_load(url: str, photos: list[Path], requests: int = 50, threads: int = 4, top: int = 10) -> LoadReport:
    """Send `requests` rank requests for `photos` in turn from `threads` threads, each with its own connection."""
    payloads = [(p.name, p.read_bytes()) for p in photos]
    endpoint = f"{url.rstrip('/')}/api/rank"

    def post(client: httpx.Client, i: int) -> httpx.Response:
        name, data = payloads[i % len(payloads)]
        return client.post(endpoint, params={"top": top}, files={"file": (name, data, "image/jpeg")})

    with httpx.Client(timeout=60) as client:
        reference = [_ids(post(client, i).raise_for_status()) for i in range(len(payloads))]
    local = threading.local()
    clients: list[httpx.Client] = []

    def timed(i: int) -> tuple[float, str | None]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
            clients.append(local.client)
        start = time.perf_counter()
        try:
            response = post(local.client, i)
        except httpx.HTTPError as err:
            return time.perf_counter() - start, f"request {i}: {err!r}"
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            return elapsed, f"request {i}: HTTP {response.status_code} {response.text[:200]}"
        if _ids(response) != reference[i % len(payloads)]:
            return elapsed, f"request {i}: a different answer than the reference for {payloads[i % len(payloads)][0]}"
        return elapsed, None

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(timed, range(requests)))
    seconds = time.perf_counter() - start
    for client in clients:
        client.close()
    return LoadReport(requests, threads, seconds, [t for t, _ in results], [e for _, e in results if e])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=50, help="timed requests (default: 50)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument("--per-class", type=int, default=4, help="bundled photos per class to send (default: 4)")
    args = parser.parse_args(argv)
    report = run_load(args.url, sample_photos(args.per_class), args.requests, args.threads)
    print(report)
    for error in report.errors[:10]:
        print("  " + error)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
