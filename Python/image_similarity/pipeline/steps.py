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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from ..features.specs import DEFAULT_BACKBONE
from .ingest import ingest
from .split import TEST_FRACTION, split

BATCH_SIZE = 32
"""Images per batch of the featurize step, unless told otherwise (featurize, Spark's tasks, the CLI)."""

if TYPE_CHECKING:
    from ..search.model import SimilarityModel
    from ..store import Store
    from .featurize import Featurizer


@dataclass
class Run:
    """One run of the job: its store and options, and what each step leaves for the next."""

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
    refine_settings: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    """The backbone the next step featurizes or refines (None: the default one)."""
    featurizer: Featurizer | None = None
    model: SimilarityModel | None = None
    summary: dict[str, Any] | None = None


def _ingest(run: Run):
    return ingest(run.store, run.folder, progress=run.progress)


def _featurize(run: Run):
    from .featurize import featurize  # lazy: scikit-learn and torch, when a step computes (module docstring)

    run.featurizer = run.featurizer_for(run.backbone)
    run.backbone = run.featurizer.backbone
    return featurize(run.store, run.featurizer, progress=run.progress)


def _split(run: Run) -> dict[str, int]:
    return split(run.store, run.test_fraction, run.seed)


def _train(run: Run):
    from .train import train  # lazy: scikit-learn and torch, when a step computes (module docstring)

    run.model = train(run.store, run.featurizer.backbone, seed=run.seed)
    return run.model


def _evaluate(run: Run) -> dict[str, Any]:
    from .evaluate import evaluate  # lazy: scikit-learn and torch, when a step computes (module docstring)

    out = run.out
    if out is not None and run.summary is not None:  # a later evaluation of the run (the refined network's)
        out = out / run.model.backbone  # keeps the earlier one's plots: its own go into a folder of its name
    run.summary = evaluate(run.store, run.model, out_dir=out, seed=run.seed)
    return run.summary


def _refine(run: Run):
    """Refine the run's backbone (the default one when none is set); the steps after it use the result."""
    from .refine import Settings, refine  # lazy: scikit-learn and torch, when a step computes (module docstring)

    name = refine(run.store, run.backbone or DEFAULT_BACKBONE, epochs=run.epochs, seed=run.seed, progress=run.progress,
                  device=run.device, precision=run.precision, settings=Settings(**run.refine_settings))
    run.backbone = name
    return run.store.network(name)


def _rank(run: Run):
    """Rank the first test image (the run's example query) with the run's model."""
    from .rank import rank  # lazy: scikit-learn and torch, when a step computes (module docstring)

    store = run.store
    test_ids = sorted(i for i, s in store.split().items() if s == "test")
    query = next(im for im in store.images() if im.id == test_ids[0])
    return rank(store, store.image_bytes(query.id), run.featurizer, model=run.model,
                name=f"{query.name} ({query.label})")


@dataclass(frozen=True)
class Step:
    """One step of the job, in every place that runs it."""

    name: str
    """The CLI command."""
    procedure: str | None
    """The SQL Server procedure (SQLR/); None: the step runs only on the client."""
    parameters: tuple[str, ...] = ()
    """The parameters a client passes to the procedure and its PostgreSQL routine (store/postgres.py ROUTINES) (a subset of what they declare)."""
    compute: Callable[[Run], Any] | None = None
    """Computes the step within a run from what the earlier steps left; returns its report (printed by the CLI:
    entrypoints/reports.py)."""


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


def run_job(run: Run, names: tuple[str, ...], show: Callable[[str, Run, Any], None] | None = None) -> Run:
    """Compute the named steps in order on one run, handing each report to `show` (name, run, report) when given
    (the CLI's printers: entrypoints/reports.print_report)."""
    for name in names:
        report = STEPS[name].compute(run)
        if show is not None:
            show(name, run, report)
    return run


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
