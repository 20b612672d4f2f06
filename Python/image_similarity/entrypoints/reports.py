"""How the CLI prints the reports of the steps (one printer per step: `PRINTERS`), evaluations, rankings, audits."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..pipeline.classes import NOT_LEARNT, ClassCount, from_params, named, unlabelled_note
from ..pipeline.ingest import IngestReport
from ..pipeline.split import SplitReport
from ..pipeline.steps import Results

if TYPE_CHECKING:
    from ..pipeline.featurize import FeaturizeReport
    from ..pipeline.neighbors import NeighborsReport
    from ..search.model import SimilarityModel
    from ..store.base import NetworkRecord

CNTK_CLASSES = {"dotted", "leopard", "striped"}
CNTK_ACCURACY, CNTK_TOP1 = 0.889, 0.433
"""The CNTK image-similarity tutorial's figures on its 3 texture classes (test split accuracy; top-1 under the original
protocol, candidates drawn from the test split): printed only beside figures on the same classes."""


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_evaluation(summary: dict[str, Any]) -> None:
    reference = set(summary["classes"]) == CNTK_CLASSES
    print(f"model version {summary['model_version']} ({summary['backbone']}), "
          f"{summary['n_train']} train / {summary['n_test']} test images")
    print(f"  accuracy: train {percent(summary['train_accuracy'])}, test {percent(summary['test_accuracy'])}, "
          f"test class-averaged {percent(summary['class_avg_accuracy'])}"
          + (f"  (CNTK tutorial, same 3 classes: {percent(CNTK_ACCURACY)})" if reference else ""))
    print("  per class (test): " + ", ".join(f"{c} {percent(v)}" for c, v in summary["per_class_test_accuracy"].items())
          + "; AUC " + ", ".join(f"{c} {v:.3f}" for c, v in summary["auc"].items()))
    print("  ranking, original protocol (each test image against 1 positive + 100 negatives from the test split)"
          + (f"; CNTK tutorial top-1 {percent(CNTK_TOP1)}:" if reference else ":"))
    _print_ranking_table(summary["ranking"], summary["best_method"], ())
    if "catalogue_ranking" in summary:
        print("  ranking, catalogue (test images against the training images; R@k, mAP, P@10 and look-alike over all):")
        _print_ranking_table(summary["catalogue_ranking"], "",
                             ("recall@1", "recall@5", "recall@10", "map", "precision@10", "look_alike@10"))
    if summary.get("not_measured"):
        print("  not measured: " + "; ".join(f"{c}: {why}" for c, why in summary["not_measured"].items()))
    print_unlabelled(summary.get("unlabelled", 0))
    for name, path in summary.get("plots", {}).items():
        print(f"  plot {name}: {path}")


def print_class_notes(notes: dict[str, dict[str, ClassCount]]) -> None:
    """The classes a step leaves out, one line per reason (classes.py)."""
    for reason, counts in notes.items():
        print(f"  {reason}: {named(counts)}")


def print_left_out(params: dict[str, Any]) -> None:
    """The classes a model or refined network was not trained on (its params' `left_out`), and the unlabelled
    images it left out."""
    print_class_notes({NOT_LEARNT: left_out} if (left_out := from_params(params)) else {})
    print_unlabelled(params.get("unlabelled", 0))


def print_unlabelled(count: int) -> None:
    """'  left out 12 unlabelled images', when a step left out any (classes.unlabelled_note)."""
    if count:
        print(f"  {unlabelled_note(count)}")


RANKING_COLUMNS = {"recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "map": "mAP", "precision@10": "P@10",
                   "look_alike@10": "alike"}


def _print_ranking_table(ranking: dict[str, dict[str, float]], best_method: str, extra: tuple[str, ...]) -> None:
    """One row per method: top-k hit rates, mean and median rank, and the `extra` figures."""
    print(f"    {'method':<8} {'top-1':>6} {'top-5':>6} {'top-10':>6} {'mean':>6} {'median':>6}"
          + "".join(f" {RANKING_COLUMNS[k]:>6}" for k in extra))
    for method, r in ranking.items():
        cells = [percent(r[k]) if k.startswith(("recall", "precision")) else f"{r[k]:.3f}" for k in extra]
        print(f"    {method:<8} {percent(r['top1']):>6} {percent(r['top5']):>6} {percent(r['top10']):>6} "
              f"{r['mean_rank']:>6.2f} {r['median_rank']:>6.1f}" + "".join(f" {c:>6}" for c in cells)
              + ("  <- best" if method == best_method else ""))


def print_ranking(result) -> None:
    print(f"top {len(result.matches)} for {result.query} (method {result.method}, {result.backbone}"
          + (f", model version {result.model_version})" if result.model_version else ")")
          + (f"; the model suggests {result.suggested} ({result.probability:.2f})" if result.suggested else ""))
    keys = any(m.key is not None for m in result.matches)
    print(f"  {'rank':>4} {'id':>6} {'label':<20} {'score':>9}  " + ("key  " if keys else "") + "name")
    for m in result.matches:
        print(f"  {m.rank:>4} {m.image_id:>6} {label_text(m.label, m.suggested, m.probability):<20} {m.score:>9.4f}  "
              + (f"{m.key or '-'}  " if keys else "") + m.name + (f"  {m.metadata}" if m.metadata else ""))


def label_text(label: str | None, suggested: str | None = None, probability: float | None = None) -> str:
    """A label as printed: an unlabelled image's as '(none)', or '(striped? 0.93)' with the model's suggestion."""
    if label is not None:
        return label
    return f"({suggested}? {probability:.2f})" if suggested else "(none)"


def print_audit(report, top: int) -> None:
    """The audit as a table: the `top` likeliest mistakes, then cross-label duplicates and small classes."""
    print(f"audit of {report.images} images ({report.backbone}, {report.folds}-fold out-of-fold probabilities, "
          f"C={report.C:g}): {len(report.suspects)} suspects at cut-off {report.cutoff:g}, "
          f"{len(report.conflicts)} groups of near duplicates under different labels")
    print_unlabelled(report.unlabelled)
    if report.suspects:
        print(f"  {'id':>6}  {'label':<12} {'suggested':<12} {'p(sugg.)':>8} {'p(label)':>8}  name  [reasons; twins]")
    for s in report.suspects[:top]:
        twins = ", ".join(f"{t.id} {t.label}" for t in s.twins)
        print(f"  {s.id:>6}  {s.label:<12} {s.suggested:<12} {s.probability:>8.3f} {s.label_probability:>8.3f}  "
              f"{s.name}  [{'; '.join(s.reasons)}{'; twins: ' + twins if twins else ''}]")
    if len(report.suspects) > top:
        print(f"  ... {len(report.suspects) - top} more (--top, or --json for all)")
    for c, n in report.small_classes.items():
        print(f"  class {c!r} has only {n} images: too small to learn (not judged)")


def print_ingest(report: IngestReport) -> None:
    print(f"ingest {report.source}: {report.added} added, {report.already_stored} already stored, "
          f"{len(report.skipped)} skipped"
          + (f"; {report.unlabelled} of those added unlabelled" if report.unlabelled else "")
          + (f"; {report.replaced} replaced the image of their key" if report.replaced else ""))
    for name, reason in report.skipped:
        print(f"  skipped {name}: {reason}")


def print_featurize(report: FeaturizeReport) -> None:
    print(f"featurize: {report.added} new vectors with {report.backbone} on {report.device} ({report.runtime}, "
          f"{report.precision}), {len(report.skipped)} skipped")
    for image_id, reason in report.skipped:
        print(f"  skipped image {image_id}: {reason}")


def print_split(report: SplitReport) -> None:
    print(f"split: {report.counts.get('train', 0)} train, {report.counts.get('test', 0)} test")
    print_unlabelled(report.counts.get("unlabelled", 0))
    print_class_notes(report.notes)


def print_train(model: SimilarityModel) -> None:
    print(f"train: model version {model.version}, C={model.params['C']:g}, "
          f"cross-validated accuracy {percent(model.params['cv_accuracy'])}")
    print_left_out(model.params)


def print_refine(record: NetworkRecord) -> None:
    """What refine did: the stored network, its best epoch and validation accuracy, its speed."""
    best, history = record.metrics["best"], record.metrics["history"]
    val = "no validation images" if best["val_accuracy"] is None else \
        f"validation accuracy {percent(best['val_accuracy'])}"
    print(f"refine: {record.name} ({record.base}, {record.metrics['train_images']} train / "
          f"{record.metrics['val_images']} validation images): best epoch {best['epoch']} of {len(history)}, {val}, "
          f"{sum(e['seconds'] for e in history) / len(history):.0f} s per epoch "
          f"on {record.metrics['device']} ({record.metrics['precision']})")
    print_left_out(record.params)


def print_neighbors(report: NeighborsReport) -> None:
    print(f"neighbors: top {report.k} by {report.method} ({report.backbone}"
          + (f", model version {report.model_version}" if report.model_version else "")
          + f") for {report.added} images, {report.already_stored} already stored, of {report.images}"
          f"; {report.block_rows} rows per block")


def print_best_ranking(summary: dict[str, Any]) -> None:
    """The best ranking method of an evaluation, beside the CNTK tutorial's figures on the same classes."""
    best = summary["ranking"][summary["best_method"]]
    print(f"  best ranking ({summary['best_method']}, original protocol): top-1 {percent(best['top1'])}, "
          f"top-10 {percent(best['top10'])}, median rank {best['median_rank']:g}"
          + (f"; CNTK tutorial on the same 3 classes: test accuracy {percent(CNTK_ACCURACY)}, top-1 {percent(CNTK_TOP1)}"
             if set(summary["classes"]) == CNTK_CLASSES else ""))


PRINTERS: dict[str, Callable[[Any], None]] = {
    "ingest": print_ingest, "featurize": print_featurize, "split": print_split, "train": print_train,
    "evaluate": print_evaluation, "rank": print_ranking, "refine": print_refine, "neighbors": print_neighbors,
}
"""The printer of each step's report (pipeline/steps.py STEPS), for its command and for `run`."""


def print_run_step(name: str, report: Any, done: Results) -> None:
    """`run`'s printer (`run_job`'s show): each step's report; the example ranking comes after the best method of
    the run's last evaluation."""
    if name == "rank":
        print_best_ranking(done.summary)
    PRINTERS[name](report)
