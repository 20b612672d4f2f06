"""Test Model.ipynb run end to end on a copy of the full database, and the same picture from `rank --plot`."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import pytest
from matplotlib.colors import to_hex
from nbclient import NotebookClient
from PIL import Image

from image_similarity.entrypoints.cli import main
from image_similarity.entrypoints.plots import CORRECT, WRONG, evaluation_figures, plt, ranking_plot
from image_similarity.errors import NotReady
from image_similarity.pipeline.rank import rank
from image_similarity.store import EvaluationRecord, SQLiteStore

NOTEBOOK = Path(__file__).resolve().parents[1] / "Test Model.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def _cell(notebook, tag: str):
    return next(c for c in notebook.cells if tag in c.metadata.get("tags", []))


def _text(cell) -> str:
    return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]


def test_notebook_shows_the_top_10_of_rank_and_the_evaluation(full_copy, featurizer, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells), "commit the notebook without outputs"
    monkeypatch.setenv("IMAGE_SIMILARITY_DB", str(full_copy))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    assert f"sqlite:///{full_copy}: 557 images" in _text(_cell(notebook, "connect"))
    query = Path(_text(_cell(notebook, "query")).strip())
    printed = [line.split() for line in _text(_cell(notebook, "rank")).splitlines()[2:]]
    with SQLiteStore(full_copy) as store:
        expected = rank(store, query.read_bytes(), featurizer, save=False)
    assert len(expected.matches) == 10
    assert [(int(row[1]), row[2]) for row in printed] == [(m.image_id, m.label) for m in expected.matches]

    for tag, count in (("figure", 1), ("evaluation", 3)):
        pngs = _pngs(_cell(notebook, tag))
        assert len(pngs) == count and all(png.startswith(PNG) for png in pngs)
    assert Image.open(io.BytesIO(_pngs(_cell(notebook, "figure"))[0])).width > 1000


def test_rank_plot_writes_a_png(full_copy, sample_dir, tmp_path, capsys):
    out = tmp_path / "top10.png"
    query = min((sample_dir / "striped").iterdir())
    assert main(["rank", str(query), "--db", str(full_copy), "--plot", str(out)]) == 0
    assert f"plot: {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 1000
    assert main(["rank", str(query), "--db", str(full_copy), "--plot", str(tmp_path / "no" / "x.png")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _frames(figure) -> list[tuple[str, str | None]]:
    """(caption, frame colour or None when unframed) of each match panel."""
    return [(ax.get_xlabel(), to_hex(ax.spines["left"].get_edgecolor()) if ax.spines["left"].get_linewidth() > 2
             else None) for ax in figure.axes[1:]]


def test_matches_with_the_query_label_are_framed_green_others_red(full_copy, featurizer, sample_dir):
    data = (sample_dir / "dotted" / "2519.jpg").read_bytes()
    with SQLiteStore(full_copy) as store:
        result = rank(store, data, featurizer, method="l2", save=False)
        figure = ranking_plot(store, data, result)
    assert figure.axes[0].get_xlabel() == "query: dotted"
    frames = _frames(figure)
    assert len(frames) == 10 and {c for _, c in frames} == {CORRECT, WRONG}  # l2 gets some of them wrong
    for match, (caption, colour) in zip(result.matches, frames):
        correct = match.label == "dotted"
        assert caption.startswith(f"{match.rank}. {'✓' if correct else '✗'} {match.label}\nscore ")
        assert colour == (CORRECT if correct else WRONG)
    plt.close(figure)


def test_a_query_outside_the_catalogue_is_not_framed(full_copy, featurizer, sample_dir):
    buffer = io.BytesIO()
    with Image.open(sample_dir / "dotted" / "2519.jpg") as image:
        image.crop((10, 10, image.width - 10, image.height - 10)).save(buffer, "PNG")
    with SQLiteStore(full_copy) as store:
        result = rank(store, buffer.getvalue(), featurizer, save=False)
        figure = ranking_plot(store, buffer.getvalue(), result)
    assert figure.axes[0].get_xlabel() == "query: label unknown"
    assert all(colour is None and "✓" not in caption and "✗" not in caption for caption, colour in _frames(figure))
    plt.close(figure)


def test_evaluation_figures_need_a_stored_evaluation_with_roc_points(full_copy, tmp_path):
    with SQLiteStore(tmp_path / "empty.sqlite") as store, pytest.raises(NotReady, match="no evaluation stored"):
        evaluation_figures(store)
    with SQLiteStore(full_copy) as store:
        summary = store.evaluation().summary
        assert {c: len(r["fpr"]) == len(r["tpr"]) > 2 for c, r in summary["roc"].items()} == dict.fromkeys(
            summary["classes"], True)
        store.put_evaluation(EvaluationRecord(model_version=1, summary={k: v for k, v in summary.items() if k != "roc"}))
        with pytest.raises(NotReady, match="no ROC points: run 'image-similarity evaluate' again"):
            evaluation_figures(store)
