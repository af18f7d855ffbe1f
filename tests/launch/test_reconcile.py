"""What the driver closes when a trial ends without its own cleanup, against a real `mlflow
server`: orphaned RUNNING child runs are reused, retired or failed, never left open."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.tune.experiment import Trial

from sweep.launch.context import LaunchContext
from sweep.launch.reconcile import Reconciler, close_orphans
from sweep.spec.expand import TrialInputs
from sweep.tracking import layout, runs
from trials.config import DataConfig, ModelConfig, TrialConfig

pytestmark = pytest.mark.slow  # needs the session's mlflow server


def _trial(trial_id: str) -> TrialConfig:
    return TrialConfig.model_validate({
        "trial_id": trial_id, "model": {"base_model": "/m"}, "data": {"train": "/t.jsonl"}, "adapter": {"type": "lora"},
        "trainer": {"learning_rate": 1e-3}, "seed": 0,
    })


@pytest.fixture()
def sweep(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    name = f"reconcile-{uuid.uuid4().hex[:8]}"
    exp = client.create_experiment(name)
    parent = client.create_run(exp, tags={layout.ROLE_TAG: "sweep", layout.SWEEP_TAG: name}).info.run_id
    inputs = TrialInputs(ModelConfig(base_model="/m"), DataConfig(train="/t.jsonl"), None, {})
    ctx = LaunchContext(sweep=name, tracking_uri=mlflow_server.uri, experiment_id=exp, parent_run_id=parent,
                        strategy="grid", workers=2, cpus_per_worker=1, gpus_per_worker=0,
                        train_storage=str(Path(tmp_path)), inputs=inputs)
    return client, ctx


def _child(client, ctx, trial_id: str, tune_id: str, status: str | None = None) -> str:
    run_id = runs.open_child(client, ctx.experiment_id, ctx.parent_run_id, ctx.sweep, _trial(trial_id), "lora",
                             tune_id, uuid.uuid4().hex)
    if status:
        client.set_terminated(run_id, status=status)
    return run_id


def _runs(client, ctx, **kw):
    return {r.info.run_id: r for r in layout.children(client, ctx.experiment_id, ctx.parent_run_id, **kw)}


def test_close_orphans_retires_a_duplicate_and_fails_a_dead_trial(sweep):
    client, ctx = sweep
    done = _child(client, ctx, "a", "tune-1", "FINISHED")
    dup = _child(client, ctx, "a", "tune-2")  # a second attempt left RUNNING beside the finished one
    dead = _child(client, ctx, "b", "tune-3")  # its process died: nothing else will close it
    assert close_orphans(ctx) == 2
    active = _runs(client, ctx)
    assert active[done].info.status == "FINISHED"
    assert dup not in active  # KILLED and soft-deleted: the experiment keeps one run per trial
    retired = _runs(client, ctx, deleted=True)[dup]
    assert retired.info.status == "KILLED" and retired.data.tags[layout.SUPERSEDED_TAG]
    assert active[dead].info.status == "FAILED" and "process died" in active[dead].data.tags[layout.ERROR_TAG]
    assert close_orphans(ctx) == 0  # nothing is left open


def test_a_resumed_trial_reuses_the_experiment_slot_of_its_orphan(sweep):
    client, ctx = sweep
    orphan = _child(client, ctx, "c", "tune-1")  # the driver died while it ran
    again = _child(client, ctx, "c", "tune-1")  # `sweep resume` runs the trial again
    active = _runs(client, ctx)
    assert orphan not in active and active[again].info.status == "RUNNING"
    assert active[again].data.tags[layout.ATTEMPT_TAG] == "2"


def test_the_reconciler_closes_the_run_of_a_trial_tune_ended(sweep):
    client, ctx = sweep
    stopped, errored = Trial("fn", config={}, trial_id="tune-s", stub=True), Trial("fn", config={}, trial_id="tune-e",
                                                                                     stub=True)
    stop_run = _child(client, ctx, "s", "tune-s")
    error_run = _child(client, ctx, "e", "tune-e")
    reconciler = Reconciler(ctx)
    reconciler.event("complete", stopped)  # ASHA stopped it: Tune ended its actor
    reconciler.event("error", errored)
    active = _runs(client, ctx)
    assert active[stop_run].info.status == "FINISHED" and active[stop_run].data.tags[layout.EARLY_STOP_TAG] == "true"
    assert active[error_run].info.status == "FAILED" and active[error_run].data.tags[layout.ERROR_TAG]
