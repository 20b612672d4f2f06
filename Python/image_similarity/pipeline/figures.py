"""The figures the evaluate step writes beside its summary: a confusion matrix, ROC curves, and the ranking hit
rates per method (entrypoints/plots.py redraws them from a stored evaluation)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def confusion_figure(classes: list[str], matrix: np.ndarray) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    fig.tight_layout()
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for label, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {area:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one-vs-rest (test)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


RANKING_TITLES = {"ranking": "Original protocol: positive among 1 + 100 (test split)",
                  "catalogue_ranking": "Catalogue: test queries vs training images"}


def ranking_figure(blocks: dict[str, dict[str, dict[str, float]]]) -> plt.Figure:
    """Top-1/5/10 hit rates per method, one panel per ranking block ('ranking', 'catalogue_ranking')."""
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4), squeeze=False)
    ks = ("top1", "top5", "top10")
    width = 0.8 / len(ks)
    for ax, (block, ranking) in zip(axes[0], blocks.items()):
        methods = list(ranking)
        for n, k in enumerate(ks):
            ax.bar(np.arange(len(methods)) + n * width, [ranking[m][k] for m in methods], width, label=k)
        ax.set(xticks=np.arange(len(methods)) + width, xticklabels=methods, ylim=(0, 1.1), ylabel="hit rate",
               title=RANKING_TITLES.get(block, block))
        ax.title.set_fontsize(10)
        ax.legend(loc="upper left", ncols=3)
    fig.tight_layout()
    return fig


def save_evaluation_plots(out_dir: str | Path, classes: list[str], confusion: np.ndarray,
                          curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
                          ranking: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """Write confusion.png, roc.png and ranking.png (`ranking`: figures per block and method) into out_dir;
    return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in (("confusion", confusion_figure(classes, confusion)), ("roc", roc_figure(curves)),
                      ("ranking", ranking_figure(ranking))):
        paths[name] = str(out / f"{name}.png")
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths
