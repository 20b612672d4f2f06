"""The steps of the job, each defined once, and the `run` job as one list of them.

A step is its name (the CLI command), the SQL Server procedure (SQLR/; PostgreSQL's routine of the same name in
SQLR/postgres/ is found by store/postgres.py) that runs it inside a database server with the parameters they take
from a client, and the function that computes it within a run (the CLI prints its report: entrypoints/reports.py). `image-similarity run`, PostgreSQL's
`initial_run_once` and SQL Server's `dbo.Initial_Run_Once` all follow `JOB`; `choose_model` is the one rule for
which model and which features a step uses. The steps import what computes them when they compute: the SQL
context and the CLI's --help need only their names, without scikit-learn or torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from ..features.specs import DEFAULT_BACKBONE
from .ingest import IngestReport, ingest
from .refine_settings import Settings
from .split import TEST_FRACTION, SplitReport, split_report

BATCH_SIZE = 32
"""Images per batch of the featurize step, unless told otherwise (featurize, Spark's tasks, the CLI)."""

if TYPE_CHECKING:
    from ..search.model import SimilarityModel
    from ..store import Store
    from ..store.base import NetworkRecord
    from .featurize import Featurizer, FeaturizeReport
    from .rank import RankResult


@dataclass(frozen=True)
class Run:
    """One run of the job: its store, how it gets a featurizer, and its options, the same for every step."""

    store: Store
    featurizer_for: Callable[[str | None], Featurizer] | None = None
    """The featurizer of a backbone (None: the default one); the steps that featurize or rank need it."""
    folder: Path | None = None
    test_fraction: float = TEST_FRACTION
    seed: int = 0
    out: Path | None = None
    progress: bool = False
    epochs: int | None = None
    device: str | None = None
    precision: str = "auto"
    refine_settings: Settings = field(default_factory=Settings)
    backbone: str | None = None
    """The backbone the run featurizes or refines first (None: the default one)."""


@dataclass(frozen=True)
class Results:
    """What a run's steps have returned so far: each step returns a new one for the next."""

    backbone: str | None = None
    """The backbone the last step featurized or refined (None before either: the run's)."""
    featurizer: Featurizer | None = None
    model: SimilarityModel | None = None
    summary: dict[str, Any] | None = None
    """The last evaluation's summary."""


def _ingest(run: Run, done: Results) -> tuple[IngestReport, Results]:
    return ingest(run.store, run.folder, progress=run.progress), done


def _featurize(run: Run, done: Results) -> tuple[FeaturizeReport, Results]:
    from .featurize import featurize  # lazy: scikit-learn and torch, when a step computes (module docstring)

    featurizer = run.featurizer_for(done.backbone or run.backbone)
    report = featurize(run.store, featurizer, progress=run.progress)
    return report, replace(done, backbone=featurizer.backbone, featurizer=featurizer)


def _split(run: Run, done: Results) -> tuple[SplitReport, Results]:
    return split_report(run.store, run.test_fraction, run.seed), done


def _train(run: Run, done: Results) -> tuple[SimilarityModel, Results]:
    from .train import train  # lazy: scikit-learn and torch, when a step computes (module docstring)

    model = train(run.store, done.featurizer.backbone, seed=run.seed)
    return model, replace(done, model=model)


def _evaluate(run: Run, done: Results) -> tuple[dict[str, Any], Results]:
    from .evaluate import evaluate  # lazy: scikit-learn and torch, when a step computes (module docstring)

    out = run.out
    if out is not None and done.summary is not None:  # a later evaluation of the run (the refined network's)
        out = out / done.model.backbone  # keeps the earlier one's plots: its own go into a folder of its name
    summary = evaluate(run.store, done.model, out_dir=out, seed=run.seed)
    return summary, replace(done, summary=summary)


def _refine(run: Run, done: Results) -> tuple[NetworkRecord, Results]:
    """Refine the backbone of the run (the default one when none is set); the steps after it use the result."""
    from .refine import refine  # lazy: scikit-learn and torch, when a step computes (module docstring)

    name = refine(run.store, done.backbone or run.backbone or DEFAULT_BACKBONE, epochs=run.epochs, seed=run.seed,
                  progress=run.progress, device=run.device, precision=run.precision, settings=run.refine_settings)
    return run.store.network(name), replace(done, backbone=name)


def _rank(run: Run, done: Results) -> tuple[RankResult, Results]:
    """Rank the first test image (the run's example query) with the run's model."""
    from .rank import rank  # lazy: scikit-learn and torch, when a step computes (module docstring)

    store = run.store
    test_ids = sorted(i for i, s in store.split().items() if s == "test")
    query = next(im for im in store.images() if im.id == test_ids[0])
    return rank(store, store.image_bytes(query.id), done.featurizer, model=done.model,
                name=f"{query.name} ({query.label})"), done


@dataclass(frozen=True)
class Step:
    """One step of the job, in every place that runs it."""

    name: str
    """The CLI command."""
    procedure: str | None
    """The SQL Server procedure (SQLR/); None: the step runs only on the client."""
    parameters: tuple[str, ...] = ()
    """The parameters a client passes to the procedure and its PostgreSQL routine (store/postgres.py ROUTINES) (a subset of what they declare)."""
    compute: Callable[[Run, Results], tuple[Any, Results]] | None = None
    """Computes the step within a run from what the earlier steps returned; returns its report (printed by the CLI:
    entrypoints/reports.py PRINTERS) and the results for the next step."""


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("ingest", None, (), _ingest),
    Step("featurize", "FeaturizeImages", ("backbone", "batch_size"), _featurize),
    Step("split", "PrepareData", ("test_fraction", "seed"), _split),
    Step("train", "TrainModel", ("backbone", "c_grid", "seed"), _train),
    Step("evaluate", "EvaluateModel", ("model_version", "seed"), _evaluate),
    Step("rank", "RankCandidates", ("query", "query_name", "top", "method", "model_version"), _rank),
    Step("run", "Initial_Run_Once", ("backbone", "test_fraction", "seed")),
    Step("neighbors", "ComputeNeighbors", ("backbone", "method", "top", "model_version", "refresh")),
    Step("refine", "RefineModel", ("backbone", "epochs", "seed"), _refine),
)}

JOB = ("featurize", "split", "train", "evaluate")
"""The job on stored images: what `run` does after ingest, and what Initial_Run_Once / initial_run_once run
inside a database server (the images are stored there by a client or AddImage first)."""
REFINED_JOB = ("refine", "featurize", "train", "evaluate")
"""`run --refine` then: refine the network, then featurize, train and evaluate on it (the split stays)."""


def run_steps(refine: bool = False) -> tuple[str, ...]:
    """The `run` command: ingest, the job (then the refined job), and rank an example test image."""
    return ("ingest", *JOB, *(REFINED_JOB if refine else ()), "rank")


def run_job(run: Run, names: tuple[str, ...], show: Callable[[str, Any, Results], None] | None = None,
            done: Results = Results()) -> Results:
    """Compute the named steps in order on one run, from the results of earlier steps (`done`); hand each report to
    `show` (name, report, results so far) when given (the CLI: entrypoints/reports.print_run_step)."""
    for name in names:
        report, done = STEPS[name].compute(run, done)
        if show is not None:
            show(name, report, done)
    return done


def choose_model(store: Store, version: int | None = None, backbone: str | None = None,
                 required: bool = False) -> tuple[SimilarityModel | None, str]:
    """(model, backbone) a step uses: the model `version`, else the latest (None when there is none); the features
    of `backbone`, else the model's, else the default backbone. A model trained on other features than `backbone`
    is left out (None), unless it is `required` or was named by `version`: that is BadInput."""
    from .rank import latest_model  # lazy: scikit-learn and torch, when a step computes (module docstring)
    from .train import load_model  # lazy: scikit-learn and torch, when a step computes (module docstring)

    model = load_model(store, version) if version else latest_model(store)
    if model and backbone and backbone != model.backbone:
        if required or version:
            raise BadInput(f"model version {model.version} uses {model.backbone} features, not {backbone}")
        model = None
    return model, backbone or (model.backbone if model else DEFAULT_BACKBONE)
