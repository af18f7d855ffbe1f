"""`sweep run` / `sweep resume` / `sweep status` end to end, with real components only.

One Ray head (2 CPUs) and one `mlflow server` serve the whole session (tests/services.py).
Every trial is a Ray Tune trial running a Ray Train job of 2 workers, each a real DeepSpeed
ZeRO-2 engine on CPU training a real PEFT adapter on the project's tiny Llama. What the
sweep recorded is checked through MLflow's REST API, the way any client would read it.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml
from services import metrics, params, tags
from sweeping import (
    EVAL_EVERY,
    MAX_STEPS,
    THREE_TRIALS,
    by_status,
    planned_ids,
    serving_ui,
    show,
    sweep_cli,
    sweep_runs,
    write_spec,
)

from sweep.util.net import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_model, mlflow_server, ray_cluster):
    root = tmp_path_factory.mktemp("run-ok")
    spec = write_spec(root, "e2e-ok", tiny_model, mlflow_server.uri, THREE_TRIALS)
    started = time.time()
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    return {"spec": spec, "root": root, "result": result, "wall_s": time.time() - started}


def test_run_records_one_finished_child_per_trial(finished_sweep, mlflow_server):
    result = finished_sweep["result"]
    assert result.returncode == 0, show(result)
    planned = planned_ids(finished_sweep["spec"])
    assert len(planned) == 3 and {c["adapter"]["type"] for c in planned.values()} == {"lora", "c3a"}

    parent, children = sweep_runs(mlflow_server, "e2e-ok")
    ptags = tags(parent)
    assert parent["info"]["status"] == "FINISHED"
    assert ptags["sweep"] == "e2e-ok" and ptags["peft_sweep.role"] == "sweep"
    assert ptags["version.ray"] and ptags["version.mlflow"] and ptags["version.deepspeed"]
    parent_id = parent["info"]["run_id"]
    assert {f["path"] for f in mlflow_server.artifacts(parent_id)} >= {"spec.yaml", "plan.json"}
    plan = json.loads(mlflow_server.download(parent_id, "plan.json"))
    assert sorted(t["trial_id"] for t in plan["trials"]) == sorted(planned)

    assert set(by_status(children)) == {"FINISHED"}
    assert sorted(tags(r)["trial_id"] for r in children) == sorted(planned)  # exactly one per trial
    for run in children:
        run_id, t, p, m = run["info"]["run_id"], tags(run), params(run), metrics(run)
        cfg = planned[t["trial_id"]]
        assert t["sweep"] == "e2e-ok" and t["adapter.type"] == cfg["adapter"]["type"]
        assert t["adapter.variant"] == cfg["adapter"]["type"]  # default init: the family name
        assert len(t["ray.node_id"]) > 20
        # Every TrialConfig field, flattened with dots.
        assert float(p["trainer.learning_rate"]) == cfg["trainer"]["learning_rate"]
        assert p["seed"] == "0" and p["deepspeed.zero_stage"] == "2"
        assert p["trainer.max_steps"] == str(MAX_STEPS) and p["model.base_model"] == cfg["model"]["base_model"]
        if cfg["adapter"]["type"] == "lora":
            assert p["adapter.r"] == str(cfg["adapter"]["r"]) and p["adapter.init_lora_weights"] == "default"
            assert json.loads(p["adapter.target_modules"]) == ["q_proj", "v_proj"]
        else:
            assert p["adapter.block_size"] == "32"
        for key in ("eval_loss", "eval_token_accuracy", "train_loss", "tokens_per_s", "train_s", "setup_s", "wall_s",
                    "trainable_params", "adapter_bytes", "eval_loss_before"):
            assert key in m, (key, sorted(m))
        # Metrics with their steps: train_loss every step (batched), eval_loss before training and at each eval.
        assert [h["step"] for h in mlflow_server.history(run_id, "train_loss")] == list(range(1, MAX_STEPS + 1))
        assert sorted(h["step"] for h in mlflow_server.history(run_id, "eval_loss")) == [0, 3, 6]
        # Artifacts, uploaded by the rank-0 worker, downloadable from the server.
        top = {f["path"] for f in mlflow_server.artifacts(run_id)}
        assert {"adapter", "trial.json", "metrics.json", "adapter.yaml"} <= top, top
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= {
            f["path"] for f in mlflow_server.artifacts(run_id, "adapter")}
        config = json.loads(mlflow_server.download(run_id, "adapter/adapter_config.json"))
        assert config["peft_type"] == {"lora": "LORA", "c3a": "C3A"}[cfg["adapter"]["type"]]
        assert len(mlflow_server.download(run_id, "adapter/adapter_model.safetensors")) > 1000
        assert json.loads(mlflow_server.download(run_id, "trial.json"))["trial_id"] == t["trial_id"]
        ludwig = yaml.safe_load(mlflow_server.download(run_id, "adapter.yaml"))
        assert ludwig["adapter"]["type"] == cfg["adapter"]["type"]
    # The workers were kept, and so was the base model (resources.keep_base_model, the default):
    # only the first trial read it from disk.
    ordered = sorted(children, key=lambda r: r["info"]["start_time"])
    assert [metrics(r)["base_model_reused"] for r in ordered] == [0, 1, 1]
    assert all(metrics(r)["base_model_load_s"] >= 0 for r in ordered)
    print(f"\n3-trial sweep wall time: {finished_sweep['wall_s']:.1f}s")


def test_status_lists_every_trial(finished_sweep, ray_cluster):
    storage = finished_sweep["root"] / "runs" / "e2e-ok"
    result = sweep_cli("status", str(storage), "--json", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    report = json.loads(result.stdout)
    assert report["sweep"]["status"] == "finished"
    assert [t["mlflow"] for t in report["trials"]] == ["FINISHED"] * 3
    assert [t["tune"] for t in report["trials"]] == ["TERMINATED"] * 3
    assert all(isinstance(t["metric"], float) for t in report["trials"])
    # by spec path as well, and the human table
    table = sweep_cli("status", str(finished_sweep["spec"]), cluster=ray_cluster)
    assert table.returncode == 0 and "e2e-ok" in table.stdout, show(table)


def test_failed_trial_is_recorded_and_the_rest_finish(tmp_path, tiny_model, mlflow_server, ray_cluster):
    # A learning rate the plan accepts (> 0) but training cannot: the optimizer's first update
    # overflows float32 (torch raises; were it to produce inf instead, the runner's non-finite
    # loss check would stop the trial at the next step).
    adapters = [
        {"type": "c3a", "block_size": 32, "trainer": {"learning_rate": 0.05}},
        {"type": "lora", "r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "trainer": {"learning_rate": 1.0e38}},
    ]
    spec = write_spec(tmp_path, "e2e-fail", tiny_model, mlflow_server.uri, adapters)
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 1, show(result)
    assert "1 finished, 1 failed" in result.stdout, show(result)

    _, children = sweep_runs(mlflow_server, "e2e-fail")
    states = by_status(children)
    assert sorted(states) == ["FAILED", "FINISHED"] and len(states["FAILED"]) == len(states["FINISHED"]) == 1, states
    failed = next(r for r in children if r["info"]["status"] == "FAILED")
    assert tags(failed)["adapter.type"] == "lora"
    error = tags(failed)["error"]
    assert "overflow" in error or "non-finite loss" in error, error
    assert f"failed   {tags(failed)['trial_id']}: {error}" in result.stdout, show(result)  # the --quiet event line
    text = mlflow_server.download(failed["info"]["run_id"], "error.txt").decode()
    assert "Traceback" in text and error.split(": ", 1)[-1] in text


def test_resume_after_the_driver_is_killed(tmp_path, tiny_model, mlflow_server, ray_cluster):
    spec = write_spec(tmp_path, "e2e-resume", tiny_model, mlflow_server.uri, THREE_TRIALS)
    raw = yaml.safe_load(spec.read_text())
    # Long enough (~10 s each on kept workers) for the kill to land inside the second trial.
    raw["search"]["trainer"].update(max_steps=200, eval_every=100)
    spec.write_text(yaml.safe_dump(raw))
    planned = planned_ids(spec)
    log = tmp_path / "run.log"
    with log.open("wb") as fh:
        driver = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster,
                           background=True, stdout=fh)
    try:
        deadline = time.time() + 400
        first = None
        while first is None:
            assert driver.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(1)
            if mlflow_server.experiment_id("e2e-resume") is None:
                continue
            try:
                _, children = sweep_runs(mlflow_server, "e2e-resume")
            except AssertionError:  # the experiment exists a moment before its parent run does
                continue
            done = [r for r in children if r["info"]["status"] == "FINISHED"]
            first = done[0] if done else None
        # Let the next trial get going, then kill the driver outright (no cleanup runs).
        while not any(r["info"]["status"] == "RUNNING" for r in sweep_runs(mlflow_server, "e2e-resume")[1]):
            assert time.time() < deadline and driver.poll() is None, log.read_text()
            time.sleep(0.5)
        time.sleep(3)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    _, children = sweep_runs(mlflow_server, "e2e-resume")
    before = by_status(children)
    assert "RUNNING" in before and len(before["FINISHED"]) == 1, before  # an orphan of the killed driver

    status = sweep_cli("status", "e2e-resume", "--json", cluster=ray_cluster, cwd=tmp_path)
    assert status.returncode == 0, show(status)
    assert json.loads(status.stdout)["sweep"]["status"] == "running"  # killed: never closed

    result = sweep_cli("resume", str(tmp_path / "runs" / "e2e-resume"), "--address", ray_cluster.address, "--quiet",
                       cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    parent, children = sweep_runs(mlflow_server, "e2e-resume")
    assert parent["info"]["status"] == "FINISHED"
    assert set(by_status(children)) == {"FINISHED"}
    assert sorted(tags(r)["trial_id"] for r in children) == sorted(planned)  # exactly one per trial
    # The trial finished before the kill was not run again: same run, same id.
    assert first["info"]["run_id"] in {r["info"]["run_id"] for r in children}
    # Nothing is left RUNNING, not even among the retired (deleted) orphans.
    _, everything = sweep_runs(mlflow_server, "e2e-resume", view="ALL")
    assert not [r for r in everything if r["info"]["status"] == "RUNNING"]
    retired = [r for r in everything if r["info"]["lifecycle_stage"] == "deleted"]
    assert retired and all(r["info"]["status"] == "KILLED" for r in retired)


def test_table_and_export_from_the_real_sweep(finished_sweep, mlflow_server, ray_cluster, tmp_path):
    """The table is built from the measured runs; the exported best trial re-runs to the same metric."""
    assert finished_sweep["result"].returncode == 0, show(finished_sweep["result"])
    uri = mlflow_server.uri
    result = sweep_cli("table", "e2e-ok", "--tracking-uri", uri, "--format", "json", "--plots", str(tmp_path / "plots"),
                       cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    table = json.loads(result.stdout)
    _, children = sweep_runs(mlflow_server, "e2e-ok")
    logged = {r["info"]["run_id"]: metrics(r) for r in children}
    assert {r["variant"] for r in table["rows"]} == {"lora", "c3a"}
    for row in table["rows"]:
        best = row["best_trial"]
        assert best["value"] == logged[best["run_id"]]["eval_loss"]
        assert row["trainable_params"] == logged[best["run_id"]]["trainable_params"]
        assert row["trials"] == {"finished": 2 if row["variant"] == "lora" else 1, "failed": 0, "other": 0}
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png"))

    out = tmp_path / "best"
    result = sweep_cli("export", "e2e-ok", "--tracking-uri", uri, "--out", str(out), cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model_type"] == "llm" and best["adapter"]["type"] in ("lora", "c3a")
    assert (out / "adapter" / "adapter_config.json").is_file()
    winner = min(logged.values(), key=lambda m: (m["eval_loss"], m["trainable_params"]))
    # One "best": the parent run's tag, the table and the export name the same trial.
    parent, _ = sweep_runs(mlflow_server, "e2e-ok")
    exported = json.loads((out / "trial.json").read_text())["trial_id"]
    assert tags(parent)["best_trial_id"] == table["best_trial_id"] == exported

    # The exported one-trial spec re-runs (into its own experiment) to the same metric.
    rerun = yaml.safe_load((out / "spec.yaml").read_text())
    rerun["name"] = "e2e-rerun"
    rerun["tracking"] = {"uri": uri, "experiment": "e2e-rerun"}
    (out / "spec.yaml").write_text(yaml.safe_dump(rerun))
    result = sweep_cli("run", str(out / "spec.yaml"), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    _, again = sweep_runs(mlflow_server, "e2e-rerun")
    assert len(again) == 1
    assert metrics(again[0])["eval_loss"] == pytest.approx(winner["eval_loss"], abs=0.05)



def test_optuna_with_asha(tmp_path, tiny_model, mlflow_server, ray_cluster):
    """Optuna picks adapter configurations and learning rates; ASHA stops the weaker ones at
    its first rung, and each stopped trial still ends as one closed MLflow run. The sampler is
    seeded by the sweep name and trials run one at a time, so the decisions are repeatable;
    the learning rates span five decades, so some trial is clearly the weakest at the rung."""
    adapters = [{"type": "lora", "r": [4, 8], "target_modules": ["q_proj", "v_proj"]}, {"type": "ln_tuning"}]
    spec = write_spec(tmp_path, "e2e-optuna", tiny_model, mlflow_server.uri, adapters,
                      scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    raw = yaml.safe_load(spec.read_text())
    raw["search"].update(strategy="optuna", num_samples=4)
    raw["search"]["trainer"].update(learning_rate={"distribution": "loguniform", "low": 1e-7, "high": 1e-2})
    spec.write_text(yaml.safe_dump(raw))
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    _, children = sweep_runs(mlflow_server, "e2e-optuna")
    assert len(children) == 4 and set(by_status(children)) == {"FINISHED"}
    lrs = [float(params(r)["trainer.learning_rate"]) for r in children]
    assert all(1e-7 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 4
    assert {tags(r)["adapter.type"] for r in children} <= {"lora", "ln_tuning"}
    steps = {tags(r)["trial_id"]: max(m["step"] for m in mlflow_server.history(r["info"]["run_id"], "eval_loss"))
             for r in children}
    stopped = {tags(r)["trial_id"] for r in children if tags(r).get("peft_sweep.early_stopped") == "true"}
    assert stopped, (steps, show(result))  # ASHA did stop something
    assert all(steps[t] < MAX_STEPS for t in stopped), steps
    assert all(steps[t] == MAX_STEPS for t in set(steps) - stopped), steps


def test_asha_stops_a_weak_trial_and_the_sweep_goes_on(tmp_path, tiny_model, mlflow_server, ray_cluster):
    """Grid order is fixed, so ASHA's decision is too: the near-zero learning rate loses its
    first rung to the trial before it and is stopped; the trial after it still runs (a stopped
    trial's workers must give their CPUs back), and only the stopped run is tagged."""
    adapters = [
        {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "trainer": {"learning_rate": 1e-2}},
        {"type": "ln_tuning", "trainer": {"learning_rate": 1e-7}},
        {"type": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"], "trainer": {"learning_rate": 1e-2}},
    ]
    spec = write_spec(tmp_path, "e2e-asha", tiny_model, mlflow_server.uri, adapters,
                      scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    _, children = sweep_runs(mlflow_server, "e2e-asha")
    assert len(children) == 3 and set(by_status(children)) == {"FINISHED"}
    by_type = {}
    for r in children:
        last = max(m["step"] for m in mlflow_server.history(r["info"]["run_id"], "eval_loss"))
        by_type.setdefault(tags(r)["adapter.type"], []).append((last, tags(r).get("peft_sweep.early_stopped")))
    assert by_type["ln_tuning"] == [(EVAL_EVERY, "true")], (by_type, show(result))
    assert sorted(by_type["lora"]) == [(MAX_STEPS, None), (MAX_STEPS, None)], by_type
    finished = [r for r in children if tags(r)["adapter.type"] == "lora"]
    assert all("adapter" in {f["path"] for f in mlflow_server.artifacts(r["info"]["run_id"])} for r in finished)


def test_one_tracking_uri_rule_for_run_table_export_and_ui(tmp_path, tiny_model, ray_cluster):
    """A relative store given on the command line (or in MLFLOW_TRACKING_URI) means the same file
    for `sweep run` as for `table`, `export` and `ui`: the one in the current folder, not the
    spec's folder."""
    work = tmp_path / "work"
    (work / "stores").mkdir(parents=True)
    spec = write_spec(tmp_path / "specs", "e2e-uri", tiny_model, "sqlite:///spec-side.db",
                      [{"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}])
    rel = "sqlite:///stores/mlflow.db"
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", "--tracking-uri", rel,
                       cluster=ray_cluster, cwd=work)
    assert result.returncode == 0, show(result)
    assert (work / "stores" / "mlflow.db").is_file()
    assert not (tmp_path / "specs" / "stores").exists() and not (tmp_path / "specs" / "spec-side.db").exists()

    from_flag = sweep_cli("table", "e2e-uri", "--tracking-uri", rel, "--format", "json", "--no-log",
                          cluster=ray_cluster, cwd=work)
    assert from_flag.returncode == 0, show(from_flag)
    parent = json.loads(from_flag.stdout)["parent_run_id"]
    from_env = sweep_cli("table", "e2e-uri", "--format", "json", "--no-log", cluster=ray_cluster, cwd=work,
                         extra_env={"MLFLOW_TRACKING_URI": rel})
    assert from_env.returncode == 0, show(from_env)
    assert json.loads(from_env.stdout)["parent_run_id"] == parent
    exported = sweep_cli("export", "e2e-uri", "--out", str(tmp_path / "best"), cluster=ray_cluster, cwd=work,
                         extra_env={"MLFLOW_TRACKING_URI": rel})
    assert exported.returncode == 0, show(exported)
    assert (tmp_path / "best" / "adapter" / "adapter_config.json").is_file()
    # Elsewhere the same relative value names another (missing) store: it is refused, not created.
    elsewhere = sweep_cli("table", "e2e-uri", "--tracking-uri", rel, cluster=ray_cluster, cwd=tmp_path)
    assert elsewhere.returncode == 2 and "no MLflow store at" in elsewhere.stderr, show(elsewhere)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": rel}
    with serving_ui("e2e-uri", "--port", str(port), cwd=work, env=env) as (lines, _):
        assert f"/runs/{parent}" in "".join(lines)
