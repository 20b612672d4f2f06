"""`image-similarity sqlserver deploy` (and `check`): every step of the SQL Server setup that talks to the server, so a DBA on
Windows (PowerShell/Setup-ImageSimilarity.ps1 calls it), Linux or a workstation runs the same one. The PowerShell
keeps what only Windows can do (the runtime, its packages, icacls, RegisterRext, the services).

Steps, each printed as it ends; the first failure stops with one line (DeployError):
checks (version, external scripts, Python 3.10 with the package answering from sp_execute_external_script),
the database (SQLR/01 in master), SQLR/'s numbered scripts in order (those marked `-- requires: vector` only where
the VECTOR type exists) with the tables and procedures each creates checked, the images (dbo.AddImage), the rows
of the DBA's view dbo.image_source where asked (dbo.IngestFromView, SQLR/03_IngestFromView.sql), and
dbo.Initial_Run_Once. Only SQLR/'s own text and bound values are sent; the database name is checked as a plain
identifier before it is put into SQLR/01's text.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ..contexts.sql import call
from ..errors import ImageSimilarityError
from ..features.specs import BACKBONES, DEFAULT_BACKBONE
from ..store import mssql

SQLR = Path(__file__).resolve().parents[3] / "SQLR"
REQUIRES_VECTOR = "-- requires: vector"
CREATED = re.compile(r"CREATE (?:OR ALTER PROCEDURE|TABLE) dbo\.(\w+)", re.IGNORECASE)
BATCHES = re.compile(r"(?im)^\s*GO\s*$")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
PYTHON_CHECK = """EXEC sp_execute_external_script @language = N'Python', @script = N'
import sys, pandas as pd, image_similarity.contexts.inproc
OutputDataSet = pd.DataFrame([("%d.%d" % sys.version_info[:2], sys.executable)])';"""


class DeployError(ImageSimilarityError):
    """A deploy step failed: the step and the reason, one line."""


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


class Deploy:
    """One deploy: `connect(url)` gives a DB-API connection (autocommit), `say` prints a step's line."""

    def __init__(self, url: str, connect: Callable[[str], Any], say: Callable[[str], None] = print,
                 sqlr: Path = SQLR, python: str = "3.10") -> None:
        self.url, self.connect, self.say, self.sqlr, self.python = url, connect, say, sqlr, python
        self.database = unquote(urlsplit(url).path.lstrip("/"))
        if not IDENTIFIER.fullmatch(self.database):
            raise DeployError(f"deploy: the database name {self.database!r} must be a plain identifier")

    def run(self, images: Path | None, backbone: str, from_view: bool = False) -> None:
        master = self._open("master")
        self._step("SQL Server version", lambda: self._version(master))
        self._step("external scripts enabled", lambda: self._external_scripts(master))
        self._step(f"Python {self.python} and image_similarity answer", lambda: self._python(master))
        self._step(f"database {self.database}", lambda: self._script(master, self.sqlr / "01_CreateDatabase.sql"))
        db = self._open(self.database)
        vector = self._scalar(db, "SELECT TYPE_ID(N'vector');") is not None
        for path in sorted(self.sqlr.glob("[0-9][0-9]_*.sql"))[1:]:
            if path.read_text().startswith(REQUIRES_VECTOR) and not vector:
                self.say(f"skipped SQLR/{path.name}: this server has no VECTOR type")
                continue
            self._step(f"SQLR/{path.name}", lambda path=path: self._script(db, path))
        if images is not None:
            self._step(f"images from {images}", lambda: self._images(db, images))
        if from_view:
            self._step("dbo.IngestFromView", lambda: self._from_view(db))
        self._step("dbo.Initial_Run_Once", lambda: self._initial_run(db, backbone))

    def _step(self, name: str, action: Callable[[], str]) -> None:
        try:
            done = action()
        except DeployError:
            raise
        except Exception as err:  # noqa: BLE001 - the driver's or the server's reason, as one line
            raise DeployError(f"deploy stopped at {name}: {' '.join(str(err).split())}") from None
        self.say(f"{name}: {done}")

    def _open(self, database: str) -> Any:
        try:
            conn = self.connect(with_database(self.url, database))
        except Exception as err:  # noqa: BLE001
            raise DeployError(f"deploy stopped connecting to {database}: {' '.join(str(err).split())}") from None
        conn.autocommit = True
        return conn

    @staticmethod
    def _rows(conn: Any, sql: str, *params: Any) -> list[tuple]:
        cur = conn.cursor()
        cur.execute(sql, *params)
        rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
        while cur.nextset():
            rows = [tuple(r) for r in cur.fetchall()] if cur.description else rows
        return rows

    def _scalar(self, conn: Any, sql: str, *params: Any) -> Any:
        rows = self._rows(conn, sql, *params)
        return rows[0][0] if rows else None

    def _version(self, conn: Any) -> str:
        major = self._scalar(conn, "SELECT CAST(SERVERPROPERTY('ProductMajorVersion') AS int);")
        if major is None or int(major) < 16:
            raise DeployError(f"deploy stopped at SQL Server version: major version {major}; Machine Learning Services "
                              "runs Python 3.10 from SQL Server 2022 (16) on")
        return f"major version {major}"

    def _external_scripts(self, conn: Any) -> str:
        in_use = self._scalar(conn, "SELECT CAST(value_in_use AS int) FROM sys.configurations "
                                    "WHERE name = 'external scripts enabled';")
        if in_use != 1:
            raise DeployError("deploy stopped at external scripts enabled: not in use; run "
                              "PowerShell/Setup-ImageSimilarity.ps1 (it enables it and restarts the services)")
        return "in use"

    def _python(self, conn: Any) -> str:
        rows = self._rows(conn, PYTHON_CHECK)
        if not rows or rows[0][0] != self.python:
            found = rows[0][0] if rows else "nothing"
            raise DeployError(f"deploy stopped at the Python check: sp_execute_external_script runs Python {found}, "
                              f"not {self.python}")
        return f"Python {rows[0][0]} at {rows[0][1]}"

    def _script(self, conn: Any, path: Path) -> str:
        text = path.read_text().replace("$(DatabaseName)", self.database)
        for batch in BATCHES.split(text):
            if batch.strip():
                self._rows(conn, batch)
        created = CREATED.findall(text)
        missing = [name for name in created if self._scalar(conn, "SELECT OBJECT_ID(?);", f"dbo.{name}") is None]
        if missing:
            raise DeployError(f"deploy stopped at SQLR/{path.name}: {', '.join(missing)} not created")
        return f"ran, {len(created)} tables and procedures present" if created else "ran"

    def _images(self, conn: Any, folder: Path) -> str:
        loaded = 0
        for label, path in _photos(folder):
            self._rows(conn, "EXEC dbo.AddImage @name = ?, @label = ?, @data = ?;",
                       path.relative_to(folder).as_posix(), label, path.read_bytes())
            loaded += 1
        return f"{loaded} files sent to dbo.AddImage"

    def _from_view(self, conn: Any) -> str:
        rows, added, already, rejected = self._rows(conn, "EXEC dbo.IngestFromView")[-1]
        return f"{rows} rows of dbo.image_source: {added} added, {already} already stored, {rejected} rejected"

    def _initial_run(self, conn: Any, backbone: str) -> str:
        rows = self._rows(conn, "EXEC dbo.Initial_Run_Once @backbone = ?;", backbone)
        return f"{rows[-1]}" if rows else "done"


class Check(Deploy):
    """`sqlserver check`: deploy into a new database with a few images per class, rank, rank on the VECTOR path
    where the server has it, refine, run a step through `--context sql` as a database user that is not sysadmin
    (EXECUTE AS USER, a member of image_similarity_user), then drop the database."""

    CHECK_USER = "image_similarity_check"

    def check(self, images: Path, per_class: int, backbone: str) -> None:
        master = self._open("master")
        if self._scalar(master, "SELECT DB_ID(?);", self.database) is not None:
            raise DeployError(f"check: database {self.database} exists; name a new one (check drops it at the end)")
        with tempfile.TemporaryDirectory() as tmp:
            few = Path(tmp)
            for label in sorted(p for p in images.iterdir() if p.is_dir()):
                (few / label.name).mkdir()
                for path in sorted(p for p in label.iterdir() if p.is_file())[:per_class]:
                    shutil.copy(path, few / label.name / path.name)
            query = next(path for _, path in _photos(few)).read_bytes()
            try:
                self.run(few, backbone)
                db = self._open(self.database)
                self._step("dbo.RankCandidates", lambda: self._rank(db, query, ""))
                if self._scalar(db, "SELECT TYPE_ID(N'vector');") is None:
                    self.say("skipped the VECTOR path: this server has no VECTOR type")
                else:
                    self._step("dbo.RankCandidates by VECTOR_DISTANCE", lambda: self._rank(db, query, "cosine"))
                self._step("dbo.RefineModel, 1 epoch", lambda: self._refine(db))
                self._step(f"--context sql as {self.CHECK_USER} (not sysadmin)", lambda: self._as_user(db, query))
                db.close()
            finally:
                self._rows(master, f"DROP DATABASE [{self.database}];")  # a checked identifier, never user text
                self.say(f"dropped database {self.database}")

    def _rank(self, conn: Any, query: bytes, method: str) -> str:
        rows = self._rows(conn, "EXEC dbo.RankCandidates @query = ?, @top = ?, @method = ?;", query, 3, method)
        return "top 3: " + ", ".join(f"{row[2]} ({row[4]:.3f})" for row in rows)

    def _refine(self, conn: Any) -> str:
        rows = self._rows(conn, "DECLARE @network nvarchar(128); EXEC dbo.RefineModel @epochs = 1, "
                                "@network = @network OUTPUT; SELECT @network AS network;")
        return f"network {rows[-1][0]}" if rows else "done"

    def _as_user(self, conn: Any, query: bytes) -> str:
        self._rows(conn, f"CREATE USER {self.CHECK_USER} WITHOUT LOGIN; "
                         f"ALTER ROLE image_similarity_user ADD MEMBER {self.CHECK_USER};")
        self._rows(conn, f"EXECUTE AS USER = N'{self.CHECK_USER}';")
        store = mssql.MSSQLStore(with_database(self.url, self.database), connection=conn)
        _, rows = call(store, "RankCandidates", query=query, top=3)
        conn.autocommit = True
        self._rows(conn, "REVERT;")
        return f"RankCandidates gave {len(rows)} rows"


def _photos(folder: Path) -> Iterator[tuple[str, Path]]:
    for label in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(p for p in label.rglob("*") if p.is_file()):
            yield label.name, path


def main(argv: list[str]) -> int:
    """`image-similarity sqlserver deploy|check --db mssql://host/Database [--images DIR] [--backbone NAME]`."""
    parser = argparse.ArgumentParser(prog="image-similarity sqlserver")
    sub = parser.add_subparsers(dest="command", required=True)
    deploy = sub.add_parser("deploy", help="check the server, run SQLR/, load images, run dbo.Initial_Run_Once")
    deploy.add_argument("--db", required=True, help=f"mssql://[user@]host[:port]/Database (a password in "
                                                   f"{mssql.PASSWORD_ENV})")
    deploy.add_argument("--sqlr", type=Path, default=SQLR, help="the SQLR/ folder (default: this checkout's)")
    deploy.add_argument("--images", type=Path, default=None, help="a folder with one sub-folder per class")
    deploy.add_argument("--from-view", action="store_true", help="also ingest the rows of the view dbo.image_source "
                                                                 "(item_key, label, data) made in the database")
    deploy.add_argument("--backbone", choices=list(BACKBONES), default=DEFAULT_BACKBONE)
    deploy.add_argument("--python", default="3.10", help="the Python version the server must run (default 3.10)")
    check = sub.add_parser("check", parents=[], help="deploy into a NEW database with a few images, rank, refine, "
                                                     "run as a user that is not sysadmin, then drop the database")
    for action in deploy._actions[1:]:
        if action.dest not in ("images", "from_view"):
            check._add_action(action)
    check.add_argument("--images", type=Path, required=True, help="a folder with one sub-folder per class")
    check.add_argument("--per-class", type=int, default=4, help="images per class (default 4)")
    args = parser.parse_args(argv)
    try:
        deploy = (Check if args.command == "check" else Deploy)(args.db, mssql.open_connection, sqlr=args.sqlr,
                                                                python=args.python)
        if args.command == "check":
            deploy.check(args.images, args.per_class, args.backbone)
        else:
            deploy.run(args.images, args.backbone, args.from_view)
    except ImageSimilarityError as err:
        print(f"image-similarity: error: {err}", file=sys.stderr)
        return 1
    print(f"{'checked' if args.command == 'check' else 'deployed'}: {deploy.database}")
    return 0
