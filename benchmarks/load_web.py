"""Load test of a running web service on loopback: rank requests from several threads; requests/s, latency, errors.

    image-similarity serve --db DB --port 8000 &
    python benchmarks/load_web.py --url http://127.0.0.1:8000 --requests 50 --threads 4
    python benchmarks/load_web.py --url http://127.0.0.1:8000 --requests 500 --threads 8 --writers DB
    python benchmarks/load_web.py --db DB --clients 1 8 --rounds 3 [--baseline OTHER/Python]

With --db, it starts `image-similarity serve --db DB` itself and runs --rounds rounds of each number of --clients
(alternating, so they share the machine's noise); with --baseline, also a second service run from another
checkout's package folder (e.g. the previous commit's, to compare before and after), its rounds alternating with
this one's.

Each photo is first ranked alone (not timed) with every method for its reference answers, keyed by model
version and method; a timed request is an error unless it answers 200 with the images, in the same order, that
the model version and method it names gave that photo alone. With --writers DB (the database the service
serves: a copy you can change), an idle run comes first, then the same load while `ingest` (12 new images),
`featurize --backbone mobilenet_v2` and `train` (a new model version, then `evaluate`) write that database; the
load goes on until all finished and the service answers with the new model; then the new version's
references are taken.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageOps

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "fashion-texture"
WRITER_BACKBONE = "mobilenet_v2"
NEW_PER_CLASS = 4  # new images that ingest adds (bundled photos, mirrored)
NEW_MODEL_C = "0.0123"  # not in train's grid: the new model version differs from the one cross-validation picks

Key = tuple[int | None, str, int, str]
"""(model version, method, catalogue size, photo name): what an answer was made from."""
Reference = dict[Key, list[int]]
"""The ids of the answer for that photo alone, by what it was made from."""


@dataclass
class LoadReport:
    requests: int
    threads: int
    seconds: float
    latencies: list[float]
    errors: list[str]
    versions: Counter = field(default_factory=Counter)
    """How many answers each (model version, method) gave."""
    responses: list[tuple[int, httpx.Response | str]] = field(default_factory=list, repr=False)
    """(request number, its response or the transport error) of each timed request, to check."""
    cpu_s: float | None = None
    """CPU seconds the service process and this load-generating process spent meanwhile (None: not measured)."""

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def __str__(self) -> str:
        made_by = ", ".join(f"v{v} {m}: {n}" for (v, m), n in sorted(self.versions.items(), key=str))
        return (f"{self.requests} requests from {self.threads} threads in {self.seconds:.2f} s: "
                f"{self.requests / self.seconds:.1f} requests/s, latency p50 {1000 * self.percentile(50):.0f} ms, "
                f"p95 {1000 * self.percentile(95):.0f} ms, max {1000 * max(self.latencies, default=0):.0f} ms; "
                f"{len(self.errors)} errors" + (f" (answers by model version and method: {made_by})" if made_by else ""))


def sample_photos(per_class: int = 4) -> list[Path]:
    """The first photos of each class of the bundled sample."""
    return [p for d in sorted(SAMPLE.iterdir()) if d.is_dir() for p in sorted(d.iterdir())[:per_class]]


class Ranker:
    """Rank requests for a set of photos against one service."""

    def __init__(self, url: str, photos: list[Path], top: int = 10) -> None:
        self.url, self.top = url.rstrip("/"), top
        self.payloads = [(p.name, p.read_bytes()) for p in photos]

    def post(self, client: httpx.Client, i: int, method: str | None = None) -> httpx.Response:
        name, data = self.payloads[i % len(self.payloads)]
        params = {"top": self.top, **({"method": method} if method else {})}
        return client.post(f"{self.url}/api/rank", params=params, files={"file": (name, data, "image/jpeg")})

    def references(self, into: Reference) -> int | None:
        """Each photo alone with every method the served model offers; return that model version."""
        with httpx.Client(timeout=120) as client:
            model = client.get(f"{self.url}/api/model").raise_for_status().json()
            for method in model["methods"]:
                for i, (name, _) in enumerate(self.payloads):
                    body = self.post(client, i, method).raise_for_status().json()
                    into[key(body, name)] = [m["id"] for m in body["matches"]]
        return model["version"]

    def load(self, requests: int, threads: int, more: Callable[[Counter], bool] = lambda _: False) -> LoadReport:
        """At least `requests` timed requests from `threads` threads, each with its own connection, and more while
        `more(answers so far by version and method)`; `check` them afterwards."""
        local, lock = threading.local(), threading.Lock()
        clients: list[httpx.Client] = []
        results: list[tuple[float, int, httpx.Response | str]] = []
        versions: Counter = Counter()
        sent = 0

        def worker() -> None:
            nonlocal sent
            local.client = httpx.Client(timeout=120)
            with lock:
                clients.append(local.client)
            while True:
                with lock:
                    if sent >= requests and not more(versions):
                        return
                    i, sent = sent, sent + 1
                start = time.perf_counter()
                try:
                    response: httpx.Response | str = self.post(local.client, i)
                except httpx.HTTPError as err:
                    response = f"request {i}: {err!r}"
                elapsed = time.perf_counter() - start
                with lock:
                    results.append((elapsed, i, response))
                    if isinstance(response, httpx.Response) and response.status_code == 200:
                        body = response.json()
                        versions[(body["model_version"], body["method"])] += 1

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(worker) for _ in range(threads)]:
                future.result()
        seconds = time.perf_counter() - start
        for client in clients:
            client.close()
        return LoadReport(len(results), threads, seconds, [t for t, _, _ in results], [], versions,
                          [(i, r) for _, i, r in results])

    def answered(self, report: LoadReport) -> set[Key]:
        """What each successful answer of a run was made from."""
        return {key(r.json(), self.payloads[i % len(self.payloads)][0]) for i, r in report.responses
                if not isinstance(r, str) and r.status_code == 200}

    def check(self, report: LoadReport, reference: Reference) -> None:
        """Put every failed request and every answer that differs from its reference in `report.errors`."""
        for i, response in report.responses:
            name = self.payloads[i % len(self.payloads)][0]
            if isinstance(response, str):
                report.errors.append(response)
            elif response.status_code != 200:
                report.errors.append(f"request {i}: HTTP {response.status_code} {response.text[:200]}")
            else:
                body = response.json()
                want = reference.get(key(body, name))
                if want is None:
                    report.errors.append(f"request {i}: no reference for model version {body['model_version']}, "
                                         f"method {body['method']} and {body['catalogue_size']} images")
                elif [m["id"] for m in body["matches"]] != want:
                    report.errors.append(f"request {i}: {name} answered differently than model version "
                                         f"{body['model_version']} ({body['method']}) answers it alone")


def key(body: dict, name: str) -> Key:
    return body["model_version"], body["method"], body["catalogue_size"], name


def run_load(url: str, photos: list[Path], requests: int = 50, threads: int = 4, top: int = 10) -> LoadReport:
    """The load alone on an unchanging catalogue: references, then the timed requests, checked."""
    ranker, reference = Ranker(url, photos, top), {}
    ranker.references(reference)
    report = ranker.load(requests, threads)
    ranker.check(report, reference)
    return report


@contextmanager
def served(*args: str, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`image-similarity serve ARGS` as a user starts it, on a free port; yields (URL, process) once it answers,
    and stops it after the block (its output, stdout and stderr together, is then on `process.output`)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "image_similarity.entrypoints.cli", "serve", *args, "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "serve did not answer in time"
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.output = proc.communicate(timeout=30)[0]


def cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) process `pid` has spent, and this process when `pid` is None; None
    where /proc cannot tell (not Linux)."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rounds(urls: dict[str, str], photos: list[Path], clients: tuple[int, ...] = (1, 8), requests: int = 100,
           repeats: int = 3, pids: dict[str, int] | None = None) -> dict[str, dict[int, list[LoadReport]]]:
    """Reports of `repeats` rounds of `requests` checked requests from each number of `clients`, for each named
    service; the rounds alternate between services and client counts, so they share the machine's noise, and the
    services take turns going first. With the services' `pids`, each report has the CPU time spent by the service
    and the load together."""
    rankers = {name: Ranker(url, photos) for name, url in urls.items()}
    references = {name: {} for name in urls}
    for name, ranker in rankers.items():
        ranker.references(references[name])
    out: dict[str, dict[int, list[LoadReport]]] = {name: {n: [] for n in clients} for name in urls}
    for turn in range(repeats):
        for n in clients:
            for name, ranker in list(rankers.items())[::-1 if turn % 2 else 1]:
                pid = (pids or {}).get(name)
                before = (cpu_seconds(pid), cpu_seconds(None)) if pid else None
                report = ranker.load(requests, n)
                after = (cpu_seconds(pid), cpu_seconds(None)) if pid else None
                if before and after and None not in (*before, *after):
                    report.cpu_s = (after[0] - before[0]) + (after[1] - before[1])
                ranker.check(report, references[name])
                out[name][n].append(report)
    return out


def summary(reports: list[LoadReport]) -> dict:
    """The median round's requests/s and p50/p95 (ms) of rounds of one load, and their errors."""
    middle = sorted(reports, key=lambda r: r.requests / r.seconds)[len(reports) // 2]
    return {"clients": middle.threads, "rounds": len(reports), "requests_per_s": middle.requests / middle.seconds,
            "p50_ms": 1e3 * middle.percentile(50), "p95_ms": 1e3 * middle.percentile(95),
            "errors": sum(len(r.errors) for r in reports),
            "cpu_ms_per_request": None if middle.cpu_s is None else 1e3 * middle.cpu_s / middle.requests}


def service_on(db: str, clients: tuple[int, ...] = (1, 8), requests: int = 100, repeats: int = 3,
               baseline: str | None = None, per_class: int = 4) -> dict[str, list[dict]]:
    """`summary` per number of clients of `serve --db DB`, started here, and with `baseline` (a package folder,
    put first on PYTHONPATH) of the same database served by that code too; by service name ("this", "baseline")."""
    with ExitStack() as stack:
        started = {"this": stack.enter_context(served("--db", db))}
        if baseline:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([baseline, os.environ.get("PYTHONPATH", "")])}
            started["baseline"] = stack.enter_context(served("--db", db, env=env))
        found = rounds({name: url for name, (url, _) in started.items()}, sample_photos(per_class), clients, requests,
                       repeats, {name: proc.pid for name, (_, proc) in started.items()})
    return {name: [summary(reports) for reports in by_clients.values()] for name, by_clients in found.items()}


def service_table(results: dict[str, list[dict]]) -> list[str]:
    """Lines of a table of service_on's results, with each load's requests/s as a ratio to one client's."""
    lines = [f"  {'service':9} {'clients':>7} {'requests/s':>10} {'vs 1':>6} {'p50 ms':>7} {'p95 ms':>7} {'errors':>6}"
             f" {'CPU ms/request':>14}"]
    for name, rows in results.items():
        one = next((r["requests_per_s"] for r in rows if r["clients"] == 1), None)
        for r in rows:
            ratio = f"{r['requests_per_s'] / one:5.2f}x" if one else f"{'-':>6}"
            cpu = r.get("cpu_ms_per_request")
            lines.append(f"  {name:9} {r['clients']:>7} {r['requests_per_s']:10.1f} {ratio} {r['p50_ms']:7.0f} "
                         f"{r['p95_ms']:7.0f} {r['errors']:>6} {'-' if cpu is None else f'{cpu:.1f}':>14}")
    return lines


def mirrored_photos(folder: Path, per_class: int = NEW_PER_CLASS) -> Path:
    """A folder to ingest: bundled photos flipped left to right (new images), one sub-folder per class."""
    for photo in sample_photos(per_class):
        target = folder / photo.parent.name / f"mirrored-{photo.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as image:
            ImageOps.mirror(ImageOps.exif_transpose(image).convert("RGB")).save(target, "JPEG", quality=90)
    return folder


class Writers:
    """As subprocesses, each sequence in its own thread, on `db`: `ingest` of new images, `featurize` with
    another backbone, and `train` (a new model version) then `evaluate`; `done()` when all finished."""

    def __init__(self, db: str, out: Path, backbone: str = WRITER_BACKBONE, batch_size: int = 8) -> None:
        cli = [sys.executable, "-m", "image_similarity.entrypoints.cli"]
        self.steps = [[[*cli, "ingest", str(mirrored_photos(out / "new")), "--db", db, "-q"]],
                      [[*cli, "featurize", "--db", db, "--backbone", backbone, "--batch-size", str(batch_size),
                        "--device", "cpu", "-q"]],
                      [[*cli, "train", "--db", db, "--backbone", "efficientnet_lite0", "--C", NEW_MODEL_C, "-q"],
                       [*cli, "evaluate", "--db", db, "--out", str(out), "-q"]]]
        self.outputs: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(s,)) for s in self.steps]
        for thread in self.threads:
            thread.start()

    def _run(self, commands: list[list[str]]) -> None:
        for command in commands:
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            self.outputs.append(done.stdout + done.stderr)
            if done.returncode:
                self.failures.append(f"{' '.join(command[3:5])} exited {done.returncode}: {done.stderr[-2000:]}")
                return

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)


def run_with_writers(url: str, db: str, photos: list[Path], requests: int = 500, threads: int = 8, top: int = 10,
                     start_writers: Callable[[Path], Writers] | None = None,
                     complete: Callable[[Reference, set[Key]], None] | None = None,
                     ) -> tuple[LoadReport, LoadReport, str]:
    """(idle load report, load-while-writing report, the writers' output) on the database `db` that `url` serves.

    `start_writers(folder)` starts other writers than the default ones; `complete(reference, keys)` adds the references
    for answers made from what the service could not show afterwards (a catalogue that grew while it answered)."""
    ranker, reference = Ranker(url, photos, top), {}
    first = ranker.references(reference)
    idle = ranker.load(requests, threads)
    ranker.check(idle, reference)
    with tempfile.TemporaryDirectory(prefix="load-web-") as tmp:
        writers = (start_writers or (lambda folder: Writers(db, folder)))(Path(tmp))
        final: list[int] = []

        def more(versions: Counter) -> bool:
            """Until the writers finished and the service answered with the model they made (after evaluate)."""
            if not final:
                if not writers.done():
                    return True
                if writers.failures:
                    return False
                model = httpx.get(f"{url.rstrip('/')}/api/model", timeout=60).json()
                if model["version"] == first or model["evaluation"] is None:
                    return True
                final.append(model["version"])
            return not any(v == final[0] for v, _ in versions)

        busy = ranker.load(requests, threads, more)
    if writers.failures:
        raise RuntimeError("a writer failed: " + "; ".join(writers.failures))
    ranker.references(reference)  # the new model version's answers, each photo alone
    if complete:
        complete(reference, ranker.answered(busy) - set(reference))
    ranker.check(busy, reference)
    return idle, busy, "".join(writers.outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=50, help="timed requests (default: 50)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument("--per-class", type=int, default=4, help="bundled photos per class to send (default: 4)")
    parser.add_argument("--db", help="serve this database here (instead of --url) and run --rounds rounds of each "
                                     "number of --clients")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="with --db (default: 1 8)")
    parser.add_argument("--rounds", type=int, default=3, help="with --db: rounds of each (default: 3)")
    parser.add_argument("--baseline", metavar="DIR", help="with --db: also serve it with the package in DIR (e.g. "
                                                          "another checkout's Python/) and compare")
    parser.add_argument("--writers", metavar="DB",
                        help="the database the service serves (a copy: it gets new images, a new model version and "
                             f"{WRITER_BACKBONE} features): run the load idle, then while ingest, featurize and "
                             "train write it")
    args = parser.parse_args(argv)
    photos = sample_photos(args.per_class)
    if args.db:
        results = service_on(args.db, tuple(args.clients), args.requests, args.rounds, args.baseline, args.per_class)
        print("\n".join(service_table(results)))
        return 1 if any(r["errors"] for rows in results.values() for r in rows) else 0
    if not args.writers:
        report = run_load(args.url, photos, args.requests, args.threads)
        print(report)
        errors = report.errors
    else:
        idle, busy, _ = run_with_writers(args.url, args.writers, photos, args.requests, args.threads)
        print(f"idle:            {idle}\nwhile writing:   {busy}")
        print(f"p95 while writing {1000 * busy.percentile(95):.0f} ms vs idle {1000 * idle.percentile(95):.0f} ms "
              f"({busy.percentile(95) / idle.percentile(95):.2f}x); wrong answers or errors: "
              f"{len(idle.errors) + len(busy.errors)}")
        errors = idle.errors + busy.errors
    for error in errors[:10]:
        print("  " + error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
