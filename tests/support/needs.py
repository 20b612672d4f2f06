"""Tests that need a system package call one function here: where the package is missing the test is skipped
with the reason and what to install; under CI (the environment variable CI set) it fails instead, because
.ci/run installs every such package and CI must run every test."""
from __future__ import annotations

import ctypes
import os
import shutil

import pytest

LIBLTDL = "libltdl.so.7"
"""The library Debian's libltdl7 installs; the ODBC driver bundled with mssql-python loads it."""


def require(what: str, problem: str | None) -> None:
    """Skip the calling test (fail it under CI) when `problem` says why `what` cannot be used here."""
    if problem is None:
        return
    reason = f"needs {what}: {problem}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI runs every test: .ci/run must install it)", pytrace=False)
    pytest.skip(reason)


def missing_programs(*names: str) -> str | None:
    """Which of the programs are not on PATH, or None."""
    absent = [name for name in names if shutil.which(name) is None]
    return f"not on PATH: {', '.join(absent)}" if absent else None


def missing_library(soname: str) -> str | None:
    """Why the dynamic loader cannot load the shared library, or None."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return f"the loader finds no {soname}"
    return None


def chromium() -> None:
    """Debian's headless Chromium and its WebDriver."""
    require("Chromium and its driver (apt-get install chromium chromium-driver)",
            missing_programs("chromium", "chromedriver"))


def libltdl() -> None:
    """The library the bundled ODBC Driver 18 for SQL Server loads."""
    require(f"{LIBLTDL} for the ODBC driver (apt-get install libltdl7)", missing_library(LIBLTDL))


def postgres() -> None:
    """A throwaway PostgreSQL 15 server with PL/Python and pgvector that can import this checkout."""
    from . import pgserver

    require("PostgreSQL 15 with PL/Python and pgvector (bash .ci/postgres installs them)", pgserver.missing())


def java() -> None:
    """The Java runtime that PySpark's local Spark runs on."""
    require("Java 17 for Spark (apt-get install openjdk-17-jre-headless)", missing_programs("java"))
