"""A sweep on a real 2-node Ray cluster on this machine, through `--address` and through
`sweep submit` to the head's job server.

The head has 1 CPU and the `trial_driver` resource; the second node has 1 CPU and its own
`worker_node` resource. A trial asks for 2 workers x 1 CPU, so its workers can only run one
on each node, and its Tune trial function must sit on the `trial_driver` node. Both are
read back from the MLflow tags each trial records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from services import ray_nodes, tags
from sweeping import by_status, fake_secrets, files_holding, show, sweep_cli, sweep_runs, write_spec

pytestmark = pytest.mark.slow

TWO_TRIALS = [{"type": "lora", "r": [4, 8], "target_modules": ["q_proj", "v_proj"]}]
# Credentials the cluster's nodes hold in their environment, as a cluster launcher's env or a
# KubeRay Secret mounted as env vars gives them: none may reach Tune's state, MLflow or Ray's logs.
NODE_SECRETS = fake_secrets("cluster")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    with ray_nodes(tmp_path_factory.mktemp("two-nodes"), cpus=[1, 1],
                   resources=[{"trial_driver": 4}, {"worker_node": 1}], node_env=NODE_SECRETS) as cluster:
        yield cluster


def worker_pids(children) -> list[set[str]]:
    return [set(tags(r)["ray.worker_pids"].split(",")) for r in children]


def assert_ran_on_both_nodes(children, cluster) -> None:
    assert len(children) == 2 and set(by_status(children)) == {"FINISHED"}, by_status(children)
    both = {cluster.node_ids["head"], cluster.node_ids["worker-1"]}
    for run in children:
        t = tags(run)
        workers = t["ray.worker_node_ids"].split(",")
        assert len(workers) == 2 and set(workers) == both, t
        assert t["ray.node_id"] == workers[0]
        assert t["ray.trial_node_id"] == cluster.node_ids["head"], t  # the trial_driver node


def test_sweep_run_spreads_trials_over_both_nodes(two_nodes, tiny_model, mlflow_server, tmp_path):
    """Each trial as its own Ray Train run (`reuse_workers: false`); `sweep submit` below
    runs the default, workers kept across trials."""
    spec = write_spec(tmp_path, "two-nodes-run", tiny_model, mlflow_server.uri, TWO_TRIALS,
                      resources={"workers_per_trial": 2, "cpus_per_worker": 1, "gpus_per_worker": 0,
                                 "max_concurrent_trials": 1, "reuse_workers": False})
    result = sweep_cli("run", str(spec), "--address", two_nodes.address, "--quiet", cluster=two_nodes)
    assert result.returncode == 0, show(result)
    _, children = sweep_runs(mlflow_server, "two-nodes-run")
    assert_ran_on_both_nodes(children, two_nodes)
    first, second = worker_pids(children)
    assert not first & second and {tags(r)["peft_sweep.workers"] for r in children} == {"train-run"}


def test_sweep_submit_runs_as_a_job_and_reports_back(two_nodes, tiny_model, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_SWEEP_CACHE", str(tmp_path / "cache"))  # this machine's record of submissions
    spec = write_spec(tmp_path / "project", "two-nodes-job", tiny_model, mlflow_server.uri, TWO_TRIALS)
    storage = tmp_path / "storage"
    submitter = fake_secrets("submitter")  # the submitting shell's own credentials stay here
    submitted = sweep_cli("submit", str(spec), "--address", two_nodes.dashboard, "--storage", str(storage), "--wait",
                          "--forward-env", "HF_TOKEN", cluster=two_nodes, extra_env=submitter)
    assert submitted.returncode == 0, show(submitted)
    assert "SUCCEEDED" in submitted.stdout and "sweep two-nodes-job: 2 finished, 0 failed" in submitted.stdout
    _, children = sweep_runs(mlflow_server, "two-nodes-job")
    assert_ran_on_both_nodes(children, two_nodes)
    first, second = worker_pids(children)
    assert first == second and {tags(r)["peft_sweep.workers"] for r in children} == {"kept"}  # the same processes
    # The job's driver forwarded its own HF_TOKEN (the node's) to the workers, off the record.
    assert {tags(r)["peft_sweep.forwarded_env"] for r in children} == {"HF_TOKEN"}
    roots = [storage, mlflow_server.root, *map(Path, two_nodes.temp_dirs)]
    assert files_holding(roots, [*NODE_SECRETS.values(), *submitter.values()]) == []

    status = sweep_cli("status", "two-nodes-job", cluster=two_nodes)
    assert status.returncode == 0, show(status)
    assert "SUCCEEDED" in status.stdout and status.stdout.count("FINISHED") >= 2, show(status)
    logs = sweep_cli("logs", "two-nodes-job", cluster=two_nodes)
    assert logs.returncode == 0 and "2 finished, 0 failed" in logs.stdout, show(logs)


def test_submit_refuses_what_the_cluster_could_not_use(two_nodes, tiny_model, tmp_path):
    """Nothing is submitted, and the error names the fix: a relative sqlite store would live
    in the job's temporary working dir, and a dead address is not a job server."""
    spec = write_spec(tmp_path, "bad-submit", tiny_model, "sqlite:///mlflow.db", TWO_TRIALS)
    result = sweep_cli("submit", str(spec), "--address", two_nodes.dashboard, cluster=two_nodes)
    assert result.returncode == 2 and "--tracking-uri" in result.stderr and "Traceback" not in result.stderr, show(result)
    result = sweep_cli("submit", str(spec), "--address", "http://127.0.0.1:9", "--tracking-uri", "http://127.0.0.1:9",
                       cluster=two_nodes)
    assert result.returncode == 2 and "job server" in result.stderr and "Traceback" not in result.stderr, show(result)
    assert sweep_cli("logs", "bad-submit", cluster=two_nodes).returncode == 2


def test_a_trial_the_cluster_cannot_place_waits_then_stops_the_sweep(two_nodes, tiny_model, mlflow_server, tmp_path):
    """3 workers x 1 CPU on a cluster of 2 CPUs: the trial's placement group can never be
    placed. It shows as waiting (live output and `sweep status`), and after
    `pending_timeout_s` the sweep stops with that message, closes its parent run and exits 2;
    no placement group of it is left."""
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path, "two-nodes-wait", tiny_model, mlflow_server.uri, TWO_TRIALS,
                      resources={"workers_per_trial": 3, "cpus_per_worker": 1, "gpus_per_worker": 0,
                                 "pending_timeout_s": 20})
    log = tmp_path / "run.log"
    with log.open("wb") as fh:
        driver = sweep_cli("run", str(spec), "--address", two_nodes.address, "--quiet", cluster=two_nodes,
                           background=True, stdout=fh)
    try:
        deadline = time.time() + 120
        seen = None
        while driver.poll() is None and time.time() < deadline:
            time.sleep(1)
            status = sweep_cli("status", "two-nodes-wait", cluster=two_nodes, cwd=tmp_path)
            if "waiting for resources" in status.stdout:
                seen = status.stdout
                break
        assert seen is not None, log.read_text()
        assert "3 CPU in one placement group (3 bundles); the cluster has 2 CPU, 0 GPU" in seen, seen
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert driver.returncode == 2, out
    assert "waiting for resources: 3 CPU" in out and "gave up after" in out and "pending_timeout_s=20" in out, out
    assert "Traceback" not in out
    assert "0 finished, 0 failed, 1 stopped before training" in out, out  # nothing trained: none counts as done
    parent, children = sweep_runs(mlflow_server, "two-nodes-wait")
    assert parent["info"]["status"] == "FAILED" and children == []
    assert "waiting for resources" in tags(parent)["peft_sweep.stopped"]
    probe = (f"import ray, json; ray.init(address={two_nodes.address!r}, log_to_driver=False); "
             "from ray.util.placement_group import placement_group_table as t; "
             "print(json.dumps([v['state'] for v in t().values() if len(v['bundles']) == 3]))")
    states = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, **two_nodes.client_env})
    assert states.returncode == 0, states.stderr
    assert "PENDING" not in states.stdout and "CREATED" not in states.stdout, states.stdout
