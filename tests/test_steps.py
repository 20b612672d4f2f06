"""The step definitions: every place that runs the job follows one list; one rule picks the model and features."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from image_similarity.contexts import plpython
from image_similarity.contexts.sql import POSTGRES_ROUTINES, PROCEDURES
from image_similarity.entrypoints import cli
from image_similarity.entrypoints.reports import PRINTERS
from image_similarity.errors import BadInput
from image_similarity.pipeline.steps import JOB, REFINED_JOB, STEPS, Results, Run, choose_model, run_job, run_steps
from image_similarity.store import SQLiteStore

SQLR = Path(__file__).resolve().parents[1] / "SQLR"


def test_sql_server_initial_run_once_execs_the_job_in_order():
    text = (SQLR / "09_Initial_Run_Once.sql").read_text()
    body = text.split("CREATE OR ALTER PROCEDURE dbo.Initial_Run_Once", 1)[1]
    assert re.findall(r"EXEC dbo\.(\w+)", body) == [STEPS[name].procedure for name in JOB]


def test_postgres_initial_run_once_runs_the_job(monkeypatch):
    ran = []
    done = SimpleNamespace(model=SimpleNamespace(version=7), summary={"test_accuracy": 0.9, "best_method": "scores"})
    monkeypatch.setattr(plpython, "run_job", lambda run, names: ran.append((names, run.backbone, run.seed)) or done)
    monkeypatch.setattr(plpython.PostgresStore, "in_server", staticmethod(lambda plpy, commits=False: None))
    assert plpython.initial_run_once(object(), "mobilenet_v2", 0.3, 4)[:3] == (7, 0.9, "scores")
    assert ran == [(JOB, "mobilenet_v2", 4)]


def test_run_is_ingest_the_job_then_the_refined_job_then_rank():
    assert run_steps() == ("ingest", *JOB, "rank")
    assert run_steps(refine=True) == ("ingest", *JOB, *REFINED_JOB, "rank")
    assert all(STEPS[name].compute and PRINTERS[name] for name in run_steps(refine=True))


def test_steps_return_their_results_and_leave_the_run_and_earlier_results_as_they_were(tmp_path, small_dir,
                                                                                     featurizer, capsys):
    """The steps of `run` on 36 real photos, in two calls: each call starts from the results it is given, and
    neither a run's options nor results handed to a step change; each report goes to its step's printer."""
    with SQLiteStore(tmp_path / "run.sqlite") as store:
        run = Run(store, lambda backbone: featurizer, folder=small_dir, seed=3)
        featurized = run_job(run, ("ingest", "featurize", "split"))
        assert featurized == Results(backbone=featurizer.backbone, featurizer=featurizer)
        shown = []
        done = run_job(run, ("train", "evaluate", "rank"), show=lambda *step: shown.append(step), done=featurized)
        assert featurized.model is None and featurized.summary is None
        assert done.model.version == 1 and done.summary["model_version"] == 1 and done.featurizer is featurizer
        assert [(name, report) for name, report, _ in shown][:2] == [("train", done.model), ("evaluate", done.summary)]
        assert shown[2][1].model_version == 1 and len(shown[2][1].matches) == 10
        assert run.seed == 3 and run.backbone is None
        with pytest.raises(dataclasses.FrozenInstanceError):
            run.seed = 4
        for name, report, _ in shown:
            PRINTERS[name](report)
        assert capsys.readouterr().out.startswith("train: model version 1, C=")


def test_procedure_tables_come_from_the_steps():
    procedures = [s.procedure for s in STEPS.values() if s.procedure]
    assert len(set(procedures)) == len(procedures) == len(PROCEDURES) == len(POSTGRES_ROUTINES)
    for step in STEPS.values():
        if step.procedure:
            assert cli.SQL_STEPS[step.name] == (step.procedure, step.parameters) == \
                (step.procedure, PROCEDURES[step.procedure])
            assert POSTGRES_ROUTINES[step.procedure].count("{}") == 1  # the routine the store calls
    assert "ingest" not in cli.SQL_STEPS  # the client stores the images


def test_choose_model_is_one_rule(full_copy):
    with SQLiteStore(full_copy) as store:
        model, backbone = choose_model(store)
        assert model.version == 1 and backbone == model.backbone == "efficientnet_lite0"
        assert choose_model(store, backbone="efficientnet_lite0")[0].version == 1
        assert choose_model(store, backbone="mobilenet_v2") == (None, "mobilenet_v2")  # other features, no model
        for required, version in ((True, None), (False, 1)):
            with pytest.raises(BadInput, match="uses efficientnet_lite0 features, not mobilenet_v2"):
                choose_model(store, version, "mobilenet_v2", required=required)
    with SQLiteStore(":memory:") as empty:
        assert choose_model(empty) == (None, "efficientnet_lite0")
