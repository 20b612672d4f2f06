"""Helpers for the web tests: an app served by uvicorn from a thread on a free loopback port, headless Chromium (its
flags, a driver), and the load benchmark as a module."""
from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1200,1100"]


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve `app` (with its lifespan) until the block ends; yields its URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the web server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium driven by selenium (skipped with the reason where Chromium is missing, failed in CI)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from support import needs

    needs.chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def load_benchmark():
    """benchmarks/load_web.py as a module."""
    spec = importlib.util.spec_from_file_location("load_web", ROOT / "benchmarks" / "load_web.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def serve_command(*args: str, env: dict | None = None):
    """`image-similarity serve ARGS` as a user starts it, on a free port: a context yielding (URL, process); the
    process's output is on `process.output` afterwards (load_web.served)."""
    return load_benchmark().served(*args, env=env)
