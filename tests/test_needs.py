"""The skip logic of tests that need a system package (tests/support/needs.py), on a machine made to lack them all: a
tiny test file that asks for each package runs in a child pytest with the packages hidden (PATH points at an
empty folder, the PostgreSQL folder at a missing one, the library under a name the loader cannot find).
Without CI every test is skipped with its reason; with CI set every one fails with it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import needs, pgserver

TESTS = Path(__file__).resolve().parent
TINY = '''
from support import needs


def test_chromium():
    needs.chromium()


def test_libltdl(monkeypatch):
    monkeypatch.setattr(needs, "LIBLTDL", "libltdl-hidden.so.7")
    needs.libltdl()


def test_postgres():
    needs.postgres()
'''
REASONS = {
    "test_chromium": "needs Chromium and its driver (apt-get install chromium chromium-driver): "
                     "not on PATH: chromium, chromedriver",
    "test_libltdl": "needs libltdl-hidden.so.7 for the ODBC driver (apt-get install libltdl7): "
                    "the loader finds no libltdl-hidden.so.7",
    "test_postgres": "needs PostgreSQL 15 with PL/Python and pgvector (bash .ci/postgres installs them): "
                     "no PostgreSQL 15 (apt-get install postgresql-15)",
}


def run_hidden(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "empty").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "IMAGE_SIMILARITY_TEST_PG")}
    env |= {"PATH": str(tmp_path / "empty"), "IMAGE_SIMILARITY_PG_BIN": str(tmp_path / "no-postgres"),
            "PYTHONPATH": str(TESTS)} | ({"CI": "true"} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsf", "test_tiny.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_missing_packages_skip_with_the_reason(tmp_path):
    done = run_hidden(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 skipped" in done.stdout and "passed" not in done.stdout, done.stdout
    for reason in REASONS.values():
        assert reason in done.stdout, done.stdout


def test_missing_packages_fail_under_ci(tmp_path):
    done = run_hidden(tmp_path, ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 failed" in done.stdout and "skipped" not in done.stdout, done.stdout
    for test, reason in REASONS.items():
        assert f"FAILED test_tiny.py::{test} - Failed: {reason} (CI runs every test" in done.stdout, done.stdout


def test_present_packages_pass(monkeypatch):
    monkeypatch.setenv("CI", "true")
    needs.require("a shell", needs.missing_programs("sh"))
    needs.require("libc", needs.missing_library("libc.so.6"))


@pytest.fixture
def private() -> Iterator[Path]:
    """A new folder of mode 700 in the system's temporary folder, as `mktemp -d` makes it."""
    folder = Path(tempfile.mkdtemp())
    yield folder
    shutil.rmtree(folder)


def test_a_private_checkout_names_the_folders_to_open(private):
    """A checkout inside a private folder: the server's user cannot import it, and the message says what to open."""
    needs.require("root (only a server started by root runs as another user)",
                  None if os.geteuid() == 0 else "the tests do not run as root")
    package = private / "checkout" / "Python"
    package.mkdir(parents=True)
    assert private.stat().st_mode & 0o777 == 0o700
    problem = pgserver.unreachable([str(package)], "nobody")
    assert problem == (f"the nobody user cannot reach {private}, so the server cannot import this checkout or its "
                       f"virtualenv: run `chmod o+x {private}` (or `bash .ci/postgres` from the checkout)")
    assert can_list("nobody", package) is False
    private.chmod(0o711)
    package.chmod(0o700)
    assert pgserver.unreachable([str(package)], "nobody").endswith(
        f"run `chmod o+rx {package}` (or `bash .ci/postgres` from the checkout)")
    assert can_list("nobody", package) is False
    package.chmod(0o755)
    assert pgserver.unreachable([str(package)], "nobody") is None
    assert can_list("nobody", package) is True
    assert pgserver.unreachable([str(package)], "no-such-user") == "no user 'no-such-user' to run the server"


def can_list(user: str, folder: Path) -> bool:
    """Whether `user` can really list `folder` (what the server's Python does on its import path)."""
    return subprocess.run(["runuser", "-u", user, "--", "ls", str(folder)], capture_output=True).returncode == 0


@pytest.mark.parametrize("value", ["", None])
def test_ci_unset_or_empty_means_skip(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="needs X: gone"):
        needs.require("X", "gone")
