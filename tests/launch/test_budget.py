"""Budgets on the real local cluster: a sweep stopped by `budget.max_trials`, a resume whose
device-hour budget is spent already, and a resume with a larger budget that finishes it."""

from __future__ import annotations

import json

import pytest
from services import metrics, tags
from sweeping import THREE_TRIALS, by_status, planned_ids, show, sweep_cli, sweep_runs, write_spec

pytestmark = pytest.mark.slow


def test_budget_stops_the_sweep_and_resume_continues_it(tmp_path, tiny_model, mlflow_server, ray_cluster):
    spec = write_spec(tmp_path, "e2e-budget", tiny_model, mlflow_server.uri, THREE_TRIALS, budget={"max_trials": 1})
    planned = planned_ids(spec)
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    assert "1 finished, 0 failed, 2 not started (budget)" in result.stdout, show(result)
    assert "budget.max_trials=1 reached" in result.stdout and "sweep resume e2e-budget" in result.stdout
    parent, children = sweep_runs(mlflow_server, "e2e-budget")
    assert by_status(children) == {"FINISHED": [tags(children[0])["trial_id"]]}  # the skipped left no run
    assert parent["info"]["status"] == "FINISHED"
    assert tags(parent)["peft_sweep.stopped"].startswith("budget.max_trials=1 reached")
    spent = metrics(children[0])["device_hours"]
    assert 0 < spent < 0.1  # a few seconds of 2 CPU workers
    status = sweep_cli("status", "e2e-budget", "--json", cluster=ray_cluster, cwd=tmp_path)
    assert json.loads(status.stdout)["sweep"]["status"] == "stopped by budget", show(status)

    # The device-hours the first trial measured already cross this budget: nothing starts.
    result = sweep_cli("resume", "e2e-budget", "--budget-max-trials", "3", "--budget-max-device-hours",
                       f"{spent / 2:.8f}", "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    assert "2 not started (budget)" in result.stdout and "budget.max_device_hours=" in result.stdout, show(result)
    assert len(sweep_runs(mlflow_server, "e2e-budget")[1]) == 1

    result = sweep_cli("resume", "e2e-budget", "--budget-max-device-hours", "10", "--address", ray_cluster.address,
                       "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    assert "3 finished, 0 failed" in result.stdout and "not started" not in result.stdout, show(result)
    parent, children = sweep_runs(mlflow_server, "e2e-budget")
    assert sorted(tags(r)["trial_id"] for r in children) == sorted(planned)  # the first did not run again
    assert set(by_status(children)) == {"FINISHED"} and parent["info"]["status"] == "FINISHED"
