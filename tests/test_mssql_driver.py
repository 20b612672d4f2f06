"""The SQL Server connection code run for real through mssql-python and its bundled ODBC Driver 18, against
loopback ports where no SQL Server answers: a closed port, a server that hangs up, one that sends garbage and
one that never answers. Each must fail fast with one clear line that names the server and never the password.
The driver loads Debian's libltdl7: without it those tests are skipped with the reason (failed under CI)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import mssql_python  # noqa: F401 - the `mssql` extra: CI installs it, so a missing driver fails, never skips
import pytest
from support import needs

from image_similarity.store import StoreError
from image_similarity.store.mssql import (
    LOGIN_TIMEOUT,
    PASSWORD_ENV,
    MSSQLStore,
    _failure,
    connection_string,
    login_timeout,
)

SECRET = "s3cr;et}pw"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Start a loopback TCP server that hands each accepted connection to `reply`; yields its port."""
    listeners = []

    def start(reply: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # closed at teardown
                    return
                with conn:
                    try:
                        reply(conn)
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.close()


def failure(port: int, monkeypatch) -> tuple[StoreError, float]:
    """The StoreError MSSQLStore raises for a SQL-authenticated login at 127.0.0.1:port, and the seconds it took."""
    needs.libltdl()
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    start = time.monotonic()
    with pytest.raises(StoreError) as caught:
        MSSQLStore(f"mssql://sa@127.0.0.1:{port}/db?login_timeout=1")
    return caught.value, time.monotonic() - start


def assert_clear(err: StoreError, port: int, reason: str) -> None:
    text = "".join(traceback.format_exception(err))
    assert str(err).startswith(f"cannot connect to SQL Server at 127.0.0.1:{port} (database 'db'): "), str(err)
    assert "\n" not in str(err) and reason in str(err), str(err)
    assert "[Microsoft]" in str(err), str(err)  # the ODBC driver itself answered: it loaded and tried
    assert err.__cause__ is None and err.__context__ is None  # no driver exception chained
    assert SECRET not in text and "s3cr" not in text and "PWD" not in text


def test_login_timeout_option():
    assert login_timeout("mssql://h/db") == LOGIN_TIMEOUT == 15
    assert login_timeout("mssql://h/db?encrypt=no&login_timeout=3") == 3
    assert connection_string("mssql://h/db?login_timeout=3", {}) == \
        "Server=h;Database=db;Trusted_Connection=yes;Encrypt=yes"
    for bad in ("0", "-1", "2.5", "x", "3601"):
        with pytest.raises(StoreError, match=f"login_timeout={bad}: give a whole number"):
            login_timeout(f"mssql://h/db?login_timeout={bad}")


def test_driver_text_is_one_line_without_the_password():
    err = RuntimeError(f"login failed;\n  PWD={{s3cr;et}}}}pw}} or {SECRET}")
    assert _failure(err, SECRET) == "login failed; PWD=*** or ***"
    assert _failure(RuntimeError(""), None) == "RuntimeError"


def test_closed_port_fails_within_the_login_timeout(monkeypatch):
    port = closed_port()
    err, seconds = failure(port, monkeypatch)
    assert_clear(err, port, "TCP Provider")
    assert seconds < 8, seconds  # the driver retries a refused port until the login timeout: 15 s by default


def test_server_that_hangs_up(serve, monkeypatch):
    port = serve(lambda conn: None)
    err, _ = failure(port, monkeypatch)
    assert_clear(err, port, "error was encountered during handshakes before login")


def test_server_that_sends_garbage(serve, monkeypatch):
    port = serve(lambda conn: conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 64))
    err, _ = failure(port, monkeypatch)
    assert_clear(err, port, "unable to establish connection")


def test_server_that_never_answers(serve, monkeypatch):
    stop = threading.Event()
    port = serve(lambda conn: stop.wait(10))
    try:
        err, seconds = failure(port, monkeypatch)
    finally:
        stop.set()
    assert_clear(err, port, "Timeout error")
    assert seconds < 8, seconds


def test_cli_reports_one_line_without_the_password(monkeypatch):
    port = closed_port()
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    done = subprocess.run([sys.executable, "-m", "image_similarity.entrypoints.cli", "featurize",
                           "--db", f"mssql://sa@127.0.0.1:{port}/db?login_timeout=1"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(f"image-similarity: error: cannot connect to SQL Server at 127.0.0.1:{port}")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert SECRET not in done.stderr + done.stdout and "s3cr" not in done.stderr + done.stdout
