"""The command line as a user meets it: help, the steps one by one, JSON output, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from image_similarity.entrypoints.cli import main

STEPS = ["ingest", "featurize", "split", "train", "evaluate", "rank", "run"]


@pytest.mark.parametrize("command", STEPS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"image-similarity {command}" in out and "--db" in out


def test_console_script_help_lists_the_steps():
    out = subprocess.run([sys.executable, "-m", "image_similarity.entrypoints.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in STEPS:
        assert command in out
    assert "'image-similarity sqlserver --help'" in " ".join(out.split())  # its own parser: named in the epilog


def test_steps_one_by_one_on_real_photos(tmp_path, small_dir, capsys, sample_dir):
    db = str(tmp_path / "cli.sqlite")
    assert main(["ingest", str(small_dir), "--db", db, "-q"]) == 0
    assert f"ingest {small_dir}: 36 added, 0 already stored, 0 skipped" in capsys.readouterr().out
    assert main(["featurize", "--db", db, "-q", "--batch-size", "16"]) == 0
    assert "featurize: 36 new vectors with efficientnet_lite0 on cpu (" in capsys.readouterr().out
    assert main(["split", "--db", db, "--seed", "2"]) == 0
    assert main(["train", "--db", db, "--C", "0.1", "1"]) == 0
    assert "train: model version 1" in capsys.readouterr().out.splitlines()[-1]
    assert main(["evaluate", "--db", db, "--json", "--out", str(tmp_path / "plots")]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert {"test_accuracy", "class_avg_accuracy", "best_method"} <= set(figures)
    assert {"top1", "top5", "top10", "median_rank"} <= set(figures["ranking"]["learned"])  # the original protocol
    assert {"top1", "map", "precision@10", "look_alike@10"} <= set(figures["catalogue_ranking"]["learned"])
    assert (tmp_path / "plots" / "confusion.png").exists()
    query = sorted((sample_dir / "leopard").iterdir())[-1]
    assert main(["rank", str(query), "--db", db, "--json", "--top", "3", "--method", "cosine"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "cosine" and len(result["matches"]) == 3
    assert {"rank", "image_id", "label", "score", "name"} <= set(result["matches"][0])


@pytest.mark.parametrize("argv, message", [
    (["rank", "/no/such/query.jpg"], "No such file"),
    (["split"], "no images stored"),
    (["train"], "no train/test split"),
    (["evaluate"], "no trained model"),
    (["ingest", "--db", "mysql://user:secret@host/db", "."], "unsupported database URL scheme 'mysql'"),
    (["ingest", "--db", "postgresql://user:secret@host/db", "."], "do not put a password in the URL"),
])
def test_errors_are_one_line_without_traceback(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "secret" not in err


def test_non_image_query_is_one_line(tmp_path, capsys, full_copy):
    bad = tmp_path / "query.jpg"
    bad.write_text("hello")
    assert main(["rank", str(bad), "--db", str(full_copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("image-similarity: error:") and "not an image" in err and "\n" not in err


def test_rank_with_another_backbone_than_the_model(full_copy, sample_dir, capsys):
    query = str(sorted((sample_dir / "dotted").iterdir())[0])
    assert main(["rank", query, "--db", str(full_copy), "--backbone", "mobilenet_v2", "--method", "learned"]) == 1
    assert "uses efficientnet_lite0 features, not mobilenet_v2" in capsys.readouterr().err
    assert main(["featurize", "--db", str(full_copy), "--backbone", "mobilenet_v2", "-q"]) == 0
    assert main(["rank", query, "--db", str(full_copy), "--backbone", "mobilenet_v2", "--json", "--top", "4"]) == 0
    result = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert result["backbone"] == "mobilenet_v2" and result["method"] == "cosine" and len(result["matches"]) == 4


def test_rank_index_choice(full_copy, sample_dir, capsys, monkeypatch):
    from image_similarity.search import ann

    query = str(sorted((sample_dir / "striped").iterdir())[3])
    found = {}
    for index in ("exact", "hnsw", "auto"):
        assert main(["rank", query, "--db", str(full_copy), "--method", "cosine", "--index", index, "--json"]) == 0
        found[index] = [m["image_id"] for m in json.loads(capsys.readouterr().out)["matches"]]
    assert len(found["exact"]) == 10 and found["hnsw"] == found["exact"] == found["auto"]
    monkeypatch.setattr(ann, "available", lambda: False)
    assert main(["rank", query, "--db", str(full_copy), "--index", "hnsw"]) == 1
    assert "approximate search needs faiss" in capsys.readouterr().err


def test_help_ingest_and_split_load_no_network_or_learning_library(tmp_path, small_dir):
    """--help and the steps that need no network (ingest, split) run without importing torch, scikit-learn, ONNX
    Runtime or OpenVINO: each of them takes a second or more to import on 2 cores."""
    db = str(tmp_path / "light.sqlite")
    code = ("import sys\n"
            "from image_similarity.entrypoints.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            f"assert main(['ingest', {str(small_dir)!r}, '--db', {db!r}, '-q']) == 0\n"
            f"assert main(['split', '--db', {db!r}]) == 0\n"
            "print('loaded:', *sorted(m for m in ('torch', 'sklearn', 'onnxruntime', 'openvino') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.splitlines()[-1] == "loaded:"
    assert "split: 27 train, 9 test" in done.stdout
