"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, a server on a free loopback port,
started with PYTHONPATH set so that PL/Python imports this virtualenv's packages and image_similarity.

Runs as the `postgres` user when the tests run as root (the server refuses root). `IMAGE_SIMILARITY_TEST_PG`
names an existing server instead (a libpq URL of a superuser).
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import image_similarity

PG_BIN = Path(os.environ.get("IMAGE_SIMILARITY_PG_BIN", "/usr/lib/postgresql/15/bin"))
SHARE = Path("/usr/share/postgresql/15/extension")
REPO = Path(__file__).resolve().parents[2]
ROUTINES = sorted((REPO / "SQLR" / "postgres").glob("*.sql"))


def missing() -> str | None:
    """Why no throwaway server can start here, or None."""
    for path, what in [(PG_BIN / "postgres", "PostgreSQL 15 (apt-get install postgresql-15)"),
                       (SHARE / "plpython3u.control", "PL/Python (apt-get install postgresql-plpython3-15)"),
                       (SHARE / "vector.control", "pgvector (see .ci/postgres)")]:
        if not path.exists():
            return f"no {what}"
    if os.geteuid() == 0 and not os.environ.get("IMAGE_SIMILARITY_TEST_PG"):
        return unreachable(python_path().split(os.pathsep), "postgres")
    return None


def unreachable(paths: list[str], user: str) -> str | None:
    """Why `user` (who runs the server when the tests run as root) cannot reach `paths`, the folders the server's
    Python imports from, and the command that fixes it; None when it can."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} to run the server"
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    closed = []  # (folder, the permission it lacks)
    for path in map(Path, paths):
        path = path.resolve()
        for folder, need in [*((parent, "x") for parent in reversed(path.parents)), (path, "rx")]:
            st = folder.stat()
            shift = 6 if st.st_uid == account.pw_uid else 3 if st.st_gid in groups else 0
            lacks = "".join(p for p, bit in (("r", 4), ("x", 1)) if p in need and not st.st_mode >> shift & bit)
            if lacks and (str(folder), lacks) not in closed:
                closed.append((str(folder), lacks))
    if not closed:
        return None
    fix = "; ".join(f"chmod o+{lacks} {folder}" for folder, lacks in closed)
    return (f"the {user} user cannot reach {', '.join(f for f, _ in closed)}, so the server cannot import this "
            f"checkout or its virtualenv: run `{fix}` (or `bash .ci/postgres` from the checkout)")


def python_path() -> str:
    """What the server's Python needs on sys.path: this interpreter's site-packages and the package itself."""
    paths = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
             str(Path(image_similarity.__file__).resolve().parents[1])]
    return os.pathsep.join(dict.fromkeys(paths))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running server; `url(db)` for a database on it; `stop()` removes everything."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="image-similarity-pg-"))
        self.port = _free_port()
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
        self._run([PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        env = {**os.environ, "PYTHONPATH": python_path()}
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=30")
        self._run([PG_BIN / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-o", options, "-w", "start"],
                  env)

    def _run(self, command: list, env: dict | None = None) -> None:
        command = [str(c) for c in command]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=self.root)
        if done.returncode:
            log = self.root / "server.log"
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}"
                               + (log.read_text()[-3000:] if log.exists() else ""))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run((["runuser", "-u", "postgres", "--"] if self.as_root else [])
                       + [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def admin_url() -> Iterator[str]:
    """For the session fixture of tests/conftest.py (`yield from`): the admin URL of the server
    IMAGE_SIMILARITY_TEST_PG names, or of a throwaway cluster, stopped afterwards; where none can start the test is
    skipped with the reason (failed in CI)."""
    if os.environ.get("IMAGE_SIMILARITY_TEST_PG"):
        yield os.environ["IMAGE_SIMILARITY_TEST_PG"]
        return
    from . import needs

    needs.postgres()
    cluster = Cluster()
    try:
        yield cluster.url()
    finally:
        cluster.stop()


def database_name(test: str) -> str:
    """A database name made of a test's name (its first 60 word characters)."""
    return re.sub(r"\W", "_", test)[:60].lower()


def create_database(admin_url: str, name: str, routines: bool = True) -> str:
    """A new empty database, with the extensions and routines of SQLR/postgres/ unless `routines` is false; its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    if routines:
        with psycopg.connect(url, autocommit=True) as conn:
            for script in ROUTINES:
                conn.execute(script.read_text())
    return url


def wait_until(condition, timeout: float = 60.0, every: float = 0.05) -> bool:
    """Poll `condition()` until it is true or the timeout passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return False


if __name__ == "__main__":  # a server to try things by hand: python tests/support/pgserver.py
    cluster = Cluster()
    print(create_database(cluster.url(), "image_similarity"), file=sys.stderr)
    try:
        input("server running; press Enter to stop\n")
    finally:
        cluster.stop()
