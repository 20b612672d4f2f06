"""Errors with a rule: each entry point renders an ImageSimilarityError in one place (one line; on the web, the
status of its kind); anything else is a bug and keeps its traceback."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from support.catalogues import copy_database

from image_similarity.contexts import inproc, plpython
from image_similarity.entrypoints.cli import main
from image_similarity.entrypoints.web import create_app
from image_similarity.errors import BadInput, NotFound, NotReady, StoreError, Unavailable
from image_similarity.pipeline import split
from image_similarity.store import SQLiteStore


def one_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("error, code", [(NotReady("run 'image-similarity split' first"), 1),
                                         (StoreError("server closed the connection"), 1), (KeyboardInterrupt(), 130)])
def test_cli_renders_the_packages_errors_and_interrupts_in_one_line(error, code, small_dir, tmp_path, monkeypatch,
                                                                    capsys):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(split, "split_report", fail)  # what the split command calls
    assert main(["split", "--db", str(tmp_path / "x.sqlite")]) == code
    line = one_line(capsys.readouterr().err)
    assert line == "image-similarity: interrupted; run the same command again to resume" if code == 130 else \
        line == f"image-similarity: error: {error}"


@pytest.mark.parametrize("bug", [ValueError("a bug"), OSError(5, "a bug"), KeyError("a bug")])
def test_cli_lets_a_bug_show_its_traceback(bug, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise bug
    monkeypatch.setattr(split, "split_report", fail)  # what the split command calls
    with pytest.raises(type(bug)):
        main(["split", "--db", str(tmp_path / "x.sqlite")])


def test_cli_turns_what_the_user_names_into_one_line(full_copy, sample_dir, tmp_path, capsys):
    query = str(sorted((sample_dir / "dotted").iterdir())[0])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, message in [
        (["rank", str(tmp_path)], f"cannot read the query image {tmp_path}: Is a directory"),
        (["rank", str(tmp_path / "none.jpg")], f"query image {tmp_path / 'none.jpg'}: No such file or directory"),
        (["rank", query, "--plot", str(blocker / "plot.png")], f"cannot write the plot {blocker / 'plot.png'}"),
        (["evaluate", "--out", str(blocker / "plots")], f"cannot make the folder {blocker / 'plots'}"),
        (["train", "--C", "1", "-1"], "C values must be positive, got 1 -1"),
        (["featurize", "--device", "gpu0"], "not a torch device: 'gpu0'"),
    ]:
        assert main([*argv, "--db", str(full_copy)]) == 1, argv
        assert one_line(capsys.readouterr().err).startswith(f"image-similarity: error: {message}")


@pytest.fixture(scope="module")
def web_store(full_db, tmp_path_factory):
    path = copy_database(full_db[0], tmp_path_factory.mktemp("errors") / "web.sqlite")
    with SQLiteStore(path) as store:
        yield store


@pytest.fixture(scope="module")
def web(web_store, featurizer):
    with TestClient(create_app(web_store, featurizer, reload_interval=0), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("error, status", [
    (BadInput("bad"), 400), (NotFound("no image with id 1"), 404),
    (NotReady("run 'image-similarity train' first"), 409),
    (Unavailable("faiss is not installed"), 503), (StoreError("server closed the connection\nunexpectedly"), 503),
    (RuntimeError("a bug"), 500)])
def test_web_status_follows_the_kind_when_the_store_fails_mid_request(error, status, web, web_store, monkeypatch):
    assert web.get("/api/images/1").status_code == 200

    def fail(image_id):
        raise error
    monkeypatch.setattr(web_store, "image_bytes", fail)
    response = web.get("/api/images/1")
    assert response.status_code == status
    if status != 500:
        assert response.json() == {"detail": " ".join(str(error).split())}


class PlPy:
    """The part of PL/Python's `plpy` that errors use: error() raises."""

    class Error(Exception):
        pass

    def error(self, message: str):
        raise self.Error(message)


def test_plpython_renders_the_packages_errors_in_one_line_and_leaves_bugs():
    def step(plpy, error):
        raise error
    wrapped = plpython._clear_errors(step)
    with pytest.raises(PlPy.Error, match=r"^image_similarity: no images stored: run 'ingest' first$"):
        wrapped(PlPy(), NotReady("no images stored: run 'ingest' first"))
    for bug in (ValueError("a bug"), KeyError("a bug")):
        with pytest.raises(type(bug)):
            wrapped(PlPy(), bug)


def test_sql_server_scripts_report_the_packages_errors_as_their_message_and_bugs_with_a_traceback(capsys):
    with inproc.reported() as report:
        inproc.prepare_data(inproc.pd.DataFrame(columns=["id", "name", "label", "sha256", "dhash"]))
    assert report.error == "no rows: no images stored"
    with inproc.reported() as report:
        raise ValueError("a\nbug")
    assert report.error == "ValueError: a bug"
    assert "Traceback" in capsys.readouterr().err
