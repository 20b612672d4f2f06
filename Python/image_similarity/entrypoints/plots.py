"""Plots: an evaluation redrawn from the store (pipeline/figures.py draws it), a query's top matches, and an
audit's contact sheet."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageOps

from ..core.images import decode_image
from ..errors import NotReady
from ..pipeline.figures import RANKING_TITLES, confusion_figure, plt, ranking_figure, roc_figure
from ..pipeline.rank import RankResult
from ..search.searchers import Match
from ..store import Store
from .reports import label_text

CORRECT, WRONG = "#2ca02c", "#d62728"


def evaluation_figures(store: Store, model_version: int | None = None) -> dict[str, plt.Figure]:
    """Redraw the confusion, ROC and ranking figures of the latest stored evaluation (of a model version)."""
    evaluation = store.evaluation(model_version)
    if evaluation is None:
        raise NotReady("no evaluation stored: run 'image-similarity evaluate' first")
    summary = evaluation.summary
    if "roc" not in summary:
        raise NotReady(f"evaluation {evaluation.id} has no ROC points: run 'image-similarity evaluate' again")
    classes = summary["classes"]
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for subset, true, predicted, count in evaluation.confusion:
        if subset == "test":
            matrix[classes.index(true), classes.index(predicted)] = count
    curves = {c: (np.array(r["fpr"]), np.array(r["tpr"]), summary["auc"][c]) for c, r in summary["roc"].items()}
    return {"confusion": confusion_figure(classes, matrix), "roc": roc_figure(curves),
            "ranking": ranking_figure(_ranking_blocks(summary))}


def _ranking_blocks(summary: dict) -> dict[str, dict[str, dict[str, float]]]:
    """The ranking blocks of a stored summary; evaluations made before the original protocol was adopted kept
    only test queries against the training images, under the name 'ranking'."""
    if "catalogue_ranking" not in summary:
        return {"catalogue_ranking": summary["ranking"]}
    return {b: summary[b] for b in RANKING_TITLES}


def _thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    """The image scaled to fit a white size x size square, so that every frame has the same shape."""
    return ImageOps.pad(image, (size, size), color="white")


def ranking_grid_figure(query: Image.Image, matches: list[Match], images: dict[int, Image.Image],
                        query_label: str | None = None, title: str = "") -> plt.Figure:
    """The query beside a grid of its matches, each with label (an unlabelled one's suggested label), key and score;
    with a known query label, labelled matches with the same label get a green frame and a tick, others a red
    frame and a cross."""
    cols = 5
    rows = max(1, -(-len(matches) // cols))
    fig = plt.figure(figsize=(2.2 * (cols + 2), 2.7 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(_thumbnail(query, 512))
    ax.set(xticks=[], yticks=[])
    ax.set_xlabel(f"query: {query_label or 'label unknown'}", fontsize=12)
    for n, match in enumerate(matches):
        ax = fig.add_subplot(grid[n // cols, 2 + n % cols])
        ax.imshow(_thumbnail(images[match.image_id]))
        ax.set(xticks=[], yticks=[])
        mark = ""
        if query_label is not None and match.label is not None:
            correct = match.label == query_label
            mark = "\u2713 " if correct else "\u2717 "
            for spine in ax.spines.values():
                spine.set(color=CORRECT if correct else WRONG, linewidth=4)
        key = f"{match.key}\n" if match.key else ""
        ax.set_xlabel(f"{match.rank}. {mark}{label_text(match.label, match.suggested, match.probability)}\n{key}"
                      f"score {match.score:.4f}", fontsize=10)
    if query_label is not None and matches:
        same = sum(m.label == query_label for m in matches)
        title += f"{': ' if title else ''}{same} of {len(matches)} share the query's label"
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def ranking_plot(store: Store, query_data: bytes, result: RankResult) -> plt.Figure:
    """`ranking_grid_figure` for a rank result, with the match images and (when the query's bytes are in the
    catalogue) the query's label taken from the store."""
    known = store.find_sha256(hashlib.sha256(query_data).hexdigest())
    images = {m.image_id: decode_image(store.image_bytes(m.image_id)) for m in result.matches}
    title = f"Top {len(result.matches)} for {result.query} by {result.method} ({result.backbone})"
    return ranking_grid_figure(decode_image(query_data), result.matches, images, known.label if known else None,
                               title)


def audit_sheet_figure(suspects: list, images: dict[int, Image.Image], title: str = "") -> plt.Figure:
    """A contact sheet of audit suspects: each image framed red with its id, its label and the suggested one."""
    cols = min(6, max(1, len(suspects)))
    rows = max(1, -(-len(suspects) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.8 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, s in zip(axes.ravel(), suspects):
        ax.set_axis_on()
        ax.imshow(_thumbnail(images[s.id]))
        ax.set(xticks=[], yticks=[])
        for spine in ax.spines.values():
            spine.set(color=WRONG, linewidth=3)
        ax.set_xlabel(f"#{s.id} {s.label}\n\u2192 {s.suggested} ({s.probability:.0%})", fontsize=9)
    fig.suptitle(title or f"{len(suspects)} likeliest label mistakes: label \u2192 suggested (probability)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def audit_sheet(store: Store, report, top: int = 24) -> plt.Figure:
    """`audit_sheet_figure` of a report's `top` likeliest mistakes, images read from the store."""
    suspects = report.suspects[:top]
    return audit_sheet_figure(suspects, {s.id: decode_image(store.image_bytes(s.id)) for s in suspects},
                              f"Audit of {report.images} images ({report.backbone}): the {len(suspects)} likeliest "
                              f"label mistakes of {len(report.suspects)}, label \u2192 suggested (probability)")
