"""Comparison table, plots, export and UI against a real `mlflow server` on 127.0.0.1.

A synthetic sweep is logged into the server with MlflowClient in the layout `sweep run`
writes (parent run + nested child runs with params, metrics with steps, artifacts, one
FAILED and one KILLED run, real PEFT adapters saved with save_pretrained). Every number
the table shows is checked against the value logged for it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from services import SERVER_ENV  # the shared `mlflow_server` fixture comes from tests/services.py
from typer.testing import CliRunner

from sweep.cli import app
from sweep.spec import expand, load_spec
from sweep.tracking.layout import PARENT_TAG, ROLE_TAG, SWEEP_TAG
from sweep.tracking.runs import trial_params
from sweep.util.net import free_port
from trials.adapters import FAMILIES
from trials.config import TrialConfig
from trials.metrics import METRICS

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Unsupported layer type")]

ROOT = Path(__file__).resolve().parents[2]
EVAL_STEPS = (10, 20, 30)
SWEEP = "table-syn"

# Final eval_loss per (variant, r) and seed. lora r=8 has the better mean, lora r=4 the single
# luckiest trial (which must not win: best is the best seed of the best configuration by mean);
# hra ties that trial.
LOSS = {
    ("lora", 4): [1.00, 1.40, 1.40],
    ("lora", 8): [1.10, 1.12, 1.14],
    ("lora+pissa", 8): [1.05, 1.06, 1.07],
    ("ln_tuning", None): [1.50, 1.52, None],  # seed 2 fails after a first eval
    ("oft", None): [1.25, 1.27, None],  # seed 2 is killed
    ("hra", 8): [1.00, 1.30, 1.30],
}
# Accuracy deliberately disagrees with loss, so a wrong direction would mark another row.
ACCURACY = {"lora": 0.70, "lora+pissa": 0.72, "ln_tuning": 0.91, "oft": 0.60, "hra": 0.65}
PARTIAL = {"ln_tuning": ("FAILED", 99.0), "oft": ("KILLED", 50.0)}


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for k, v in SERVER_ENV.items():
        monkeypatch.setenv(k, v)


# --- the synthetic sweep ----------------------------------------------------------------


@dataclass
class Logged:
    run_id: str
    trial: TrialConfig
    variant: str
    status: str
    metrics: dict[str, float]  # final values
    history: dict[str, list[tuple[int, float]]]


@dataclass
class Synthetic:
    uri: str
    experiment_id: str
    parent_run_id: str
    spec_path: Path
    model_dir: Path
    runs: list[Logged] = field(default_factory=list)

    def finished(self) -> list[Logged]:
        return [r for r in self.runs if r.status == "FINISHED"]


def save_adapter(model_dir: Path, trial: TrialConfig, out: Path) -> tuple[int, int, int]:
    """A real PEFT adapter for the trial's adapter config; returns (trainable, total, base)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = sum(p.numel() for p in model.parameters())
    family = FAMILIES[trial.adapter.type]
    peft_model = get_peft_model(model, family.peft_config(trial.adapter, for_count=True))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    peft_model.save_pretrained(out)
    return trainable, total, base


def write_spec(root: Path, model_dir: Path, uri: str) -> Path:
    spec = {
        "name": SWEEP,
        "model": {"base_model": str(model_dir)},
        "data": {"train": str(model_dir / "task" / "train.jsonl"), "eval": str(model_dir / "task" / "eval.jsonl"), "max_length": 32},
        "search": {
            "seeds": [0, 1, 2],
            "adapters": [
                {"type": "lora", "r": [4, 8], "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                {"type": "lora", "r": 8, "alpha": 16, "init_lora_weights": "pissa", "target_modules": ["q_proj", "v_proj"]},
                {"type": "ln_tuning"},
                {"type": "oft", "oft_block_size": 16, "target_modules": ["q_proj"]},
                {"type": "hra", "r": 8, "target_modules": ["q_proj", "v_proj"]},
            ],
            "trainer": {"learning_rate": 1e-3, "max_steps": 30, "batch_size": 4, "eval_every": 10},
        },
        "metric": {"name": "eval_loss", "goal": "minimize"},
        "resources": {"workers_per_trial": 2, "max_concurrent_trials": 1},
        "tracking": {"uri": uri, "experiment": SWEEP},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def synthetic_values(variant: str, r: int | None, seed: int, trainable: int, total: int, base: int, adapter_bytes: int) -> dict[str, float]:
    loss = LOSS[(variant, r)][seed]
    jitter = (0.0, 0.013, -0.007)[seed]
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss),
        "eval_loss_before": 3.0 + jitter,
        "eval_token_accuracy": ACCURACY[variant] + jitter,
        "tokens_per_s": 1000.0 + 37.0 * len(variant) + 11.0 * seed,
        "s_per_step": 0.05 + 0.001 * len(variant) + 0.0007 * seed,
        "peak_memory_mb": 500.0 + 3.0 * len(variant) + seed,
        "trainable_params": float(trainable),
        "total_params": float(total),
        "trainable_percent": 100.0 * trainable / base,
        "adapter_bytes": float(adapter_bytes),
        "train_s": 1.5 + 0.1 * seed,
        "wall_s": 9.0 + 0.1 * seed,
        "device_hours": (9.0 + 0.1 * seed) * 2 / 3600,  # 2 workers
    }


def log_child(client, experiment_id: str, parent_id: str, trial: TrialConfig, status: str, final: dict[str, float],
              history: dict[str, list[tuple[int, float]]], adapter_dir: Path | None, tmp: Path, error: str | None = None) -> str:
    from mlflow.entities import Metric, Param

    family = FAMILIES[trial.adapter.type]
    tags = {
        PARENT_TAG: parent_id, "adapter.type": trial.adapter.type, "adapter.variant": family.variant(trial.adapter),
        "trial_id": trial.trial_id, SWEEP_TAG: SWEEP,
    }
    run_id = client.create_run(experiment_id, tags=tags, run_name=trial.trial_id).info.run_id
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, step) for k, points in history.items() for step, v in points]
    last_steps = {k: points[-1][0] for k, points in history.items()}
    metrics += [Metric(k, v, ts, last_steps.get(k, EVAL_STEPS[-1])) for k, v in final.items() if k not in history]
    params = [Param(k, v) for k, v in trial_params(trial).items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    trial.dump(tmp / "trial.json")
    client.log_artifact(run_id, str(tmp / "trial.json"))
    if adapter_dir is not None:
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
        (tmp / "metrics.json").write_text(json.dumps({"trial_id": trial.trial_id, "metrics": final, "setup": {"device": "cpu"},
                                                       "versions": {"peft": "0.21.2", "torch": "2.13.0"}}))
        client.log_artifact(run_id, str(tmp / "metrics.json"))
        (tmp / "adapter.yaml").write_text(yaml.safe_dump(family.ludwig(trial.adapter)))
        client.log_artifact(run_id, str(tmp / "adapter.yaml"))
    if error:
        client.set_tag(run_id, "error", error)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="session")
def synthetic(mlflow_server, tiny_model, tmp_path_factory) -> Synthetic:
    """The sweep as `sweep run` would log it, on the project's tiny pretrained Llama."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("synthetic")
    model_dir = tiny_model
    spec_path = write_spec(root, model_dir, mlflow_server.uri)
    spec, spec_dir = load_spec(spec_path)
    trials = expand(spec, spec_dir).trials
    assert len(trials) == 18

    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(SWEEP)
    parent = client.create_run(experiment_id, tags={ROLE_TAG: "sweep", SWEEP_TAG: SWEEP}, run_name=SWEEP).info.run_id
    client.log_artifact(parent, str(spec_path))
    (root / "plan.json").write_text(json.dumps({"name": SWEEP, "trials": [t.trial_id for t in trials]}))
    client.log_artifact(parent, str(root / "plan.json"))
    syn = Synthetic(mlflow_server.uri, experiment_id, parent, spec_path, model_dir)

    adapters: dict[str, tuple[Path, int, int, int]] = {}
    for n, trial in enumerate(trials):
        family = FAMILIES[trial.adapter.type]
        variant = family.variant(trial.adapter)
        r = getattr(trial.adapter, "r", None) if trial.adapter.type in ("lora", "hra") else None
        key = trial.adapter.model_dump_json()
        if key not in adapters:
            adapter_dir = root / f"adapter-{len(adapters)}"
            trainable, total, base = save_adapter(model_dir, trial, adapter_dir)
            size = sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file())
            adapters[key] = (adapter_dir, trainable, total, base, size)
        adapter_dir, trainable, total, base, size = adapters[key]
        status, partial = PARTIAL.get(variant, ("FINISHED", None)) if trial.seed == 2 else ("FINISHED", None)
        tmp = root / f"run-{n}"
        tmp.mkdir()
        if status == "FINISHED":
            final = synthetic_values(variant, r, trial.seed, trainable, total, base, size)
            history = {
                "eval_loss": [(s, final["eval_loss"] + 0.01 * (EVAL_STEPS[-1] - s)) for s in EVAL_STEPS],
                "eval_token_accuracy": [(s, final["eval_token_accuracy"] - 0.001 * (EVAL_STEPS[-1] - s)) for s in EVAL_STEPS],
                "train_loss": [(s, 2.0 - 0.02 * s) for s in range(1, 31)],
            }
            run_id = log_child(client, experiment_id, parent, trial, status, final, history, adapter_dir, tmp)
        else:
            # A partial result: the numbers a failed or killed trial left must never be averaged in.
            final = {"eval_loss": partial, "trainable_params": float(trainable)}
            history = {"eval_loss": [(10, partial)], "train_loss": [(s, 2.0) for s in range(1, 11)]}
            run_id = log_child(client, experiment_id, parent, trial, status, final, history, None, tmp,
                               error="RuntimeError: synthetic failure" if status == "FAILED" else None)
        syn.runs.append(Logged(run_id, trial, variant, status, final, history))
    client.set_terminated(parent, "FINISHED")
    return syn


def _config(run: Logged) -> str:
    dumped = run.trial.model_dump(mode="json", exclude={"trial_id", "seed"})
    return json.dumps(dumped, sort_keys=True)


def expected_rows(syn: Synthetic) -> dict[str, list[Logged]]:
    """For each variant, the finished runs of its best config (lowest mean eval_loss), computed
    independently of sweep.results.table."""
    out = {}
    for variant in {r.variant for r in syn.runs}:
        configs: dict[str, list[Logged]] = {}
        for r in syn.finished():
            if r.variant == variant:
                configs.setdefault(_config(r), []).append(r)
        out[variant] = min(configs.values(), key=lambda rs: statistics.fmean(x.metrics["eval_loss"] for x in rs))
    return out


# --- the table ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def table(synthetic):
    from mlflow import MlflowClient

    from sweep.results.table import build_table

    return build_table(MlflowClient(synthetic.uri), synthetic.parent_run_id)


def test_every_number_equals_the_logged_metric(table, synthetic):
    expected = expected_rows(synthetic)
    assert {r.variant for r in table.rows} == set(expected)
    for row in table.rows:
        runs = expected[row.variant]
        assert sorted(row.config_runs) == sorted(r.run_id for r in runs)
        for col in table.columns:
            values = [r.metrics[table.metric] / r.metrics["device_hours"] if col.key == "per_device_hour"
                      else r.metrics[col.key] for r in runs]
            cell = row.cells[col.key]
            assert cell.n == len(values), (row.variant, col.key)
            assert sorted(cell.values) == sorted(values), (row.variant, col.key)
            assert cell.value == pytest.approx(statistics.fmean(values), rel=1e-12)
            if len(values) > 1:
                assert cell.std == pytest.approx(statistics.stdev(values), rel=1e-9)
            else:
                assert cell.std is None
        assert row.trainable_params == runs[0].metrics["trainable_params"]


def test_best_config_is_by_mean_and_best_trial_is_its_best_seed(table, synthetic):
    lora = next(r for r in table.rows if r.variant == "lora")
    assert lora.best_config["adapter.r"] == 8  # mean 1.12 beats r=4's mean 1.27
    assert lora.cells["eval_loss"].value == pytest.approx(statistics.fmean(LOSS[("lora", 8)]))
    assert lora.cells["eval_loss"].std == pytest.approx(statistics.stdev(LOSS[("lora", 8)]))
    # Not r=4's lucky seed 0 (1.00): the best seed of the best configuration.
    best_run = next(r for r in synthetic.runs if r.variant == "lora" and r.trial.adapter.r == 8 and r.trial.seed == 0)
    assert lora.best_trial_run == best_run.run_id and lora.best_trial_value == 1.10
    # The variant with the best mean ranks first.
    assert table.rows[0].variant == "lora+pissa"


def test_failed_and_killed_runs_are_counted_not_averaged(table):
    rows = {r.variant: r for r in table.rows}
    ln, oft = rows["ln_tuning"], rows["oft"]
    assert (ln.finished, ln.failed, ln.other) == (2, 1, 0)
    assert (oft.finished, oft.failed, oft.other) == (2, 0, 1)
    assert ln.cells["eval_loss"].values == pytest.approx([1.50, 1.52]) and 99.0 not in ln.cells["eval_loss"].values
    assert 50.0 not in oft.cells["eval_loss"].values
    assert table.counts == {"trials": 18, "finished": 16, "failed": 1, "other": 1}


def test_best_is_marked_in_each_columns_direction(table):
    for col in table.columns:
        assert col.goal == (METRICS[col.key].goal if col.key != table.metric else table.goal)
        values = {r.variant: r.cells[col.key].value for r in table.rows}
        target = (min if col.goal == "minimize" else max)(values.values())
        marked = {r.variant for r in table.rows if r.cells[col.key].best}
        assert marked == {v for v, x in values.items() if x == target}, col.key
    rows = {r.variant: r for r in table.rows}
    assert rows["ln_tuning"].cells["eval_token_accuracy"].best  # maximize: highest accuracy
    assert rows["lora+pissa"].cells["eval_loss"].best  # minimize: lowest mean loss


def test_metric_and_goal_fall_back_to_parent_params(mlflow_server):
    from mlflow import MlflowClient

    from sweep.tracking.reader import load_sweep

    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("table-declared")
    parent = client.create_run(exp, tags={ROLE_TAG: "sweep", SWEEP_TAG: "table-declared"}).info.run_id
    client.log_param(parent, "metric", "eval_token_accuracy")
    client.log_param(parent, "goal", "maximize")
    sweep = load_sweep(client, parent)
    assert (sweep.name, sweep.metric, sweep.goal, sweep.spec) == ("table-declared", "eval_token_accuracy", "maximize", None)


def test_by_field_splits_rows(synthetic):
    from mlflow import MlflowClient

    from sweep.results.table import build_table

    t = build_table(MlflowClient(synthetic.uri), synthetic.parent_run_id, by=["adapter.r"])
    labels = {(r.variant, r.by["adapter.r"]) for r in t.rows}
    assert ("lora", 4) in labels and ("lora", 8) in labels and ("ln_tuning", None) in labels
    r4 = next(r for r in t.rows if r.variant == "lora" and r.by["adapter.r"] == 4)
    assert r4.cells["eval_loss"].value == pytest.approx(statistics.fmean(LOSS[("lora", 4)]))
    assert r4.finished == 3


def test_markdown_is_shaped_like_the_seed_table(table):
    from sweep.results.render import format_value, to_markdown

    md = to_markdown(table)
    lines = md.splitlines()
    header = lines[0]
    assert header.startswith("| Adapter | Extra params (approx.) |")
    assert header.rstrip(" |").endswith("Key strength | Best for")
    assert "eval_loss ↓" in header and "Token acc. ↑" in header
    for row in table.rows:
        line = next(l for l in lines if l.startswith(f"| `{row.variant}` |"))
        family = FAMILIES[row.adapter_type]
        assert family.approx_extra_params in line and family.key_strength in line and family.best_for in line
        acc = format_value("eval_token_accuracy", row.cells["eval_token_accuracy"].value)
        assert (f"**{acc}**" in line) == row.cells["eval_token_accuracy"].best
        assert f"{row.finished} ok" in line
    pissa = next(l for l in lines if l.startswith("| `lora+pissa` |"))
    # The mean over 3 seeds with Student's t 95% interval (the synthetic runs log no predictions).
    from scipy import stats as st

    low, high = st.t.interval(0.95, 2, loc=1.06, scale=st.sem(LOSS[("lora+pissa", 8)]))
    assert f"**1.0600 [{low:.4f}, {high:.4f}] (n=3)** | best |" in pissa
    assert "| r=8 alpha=16 init_lora_weights=pissa |" in pissa
    ln = next(l for l in lines if l.startswith("| `ln_tuning` |"))
    assert "2 ok / 1 failed" in ln


def test_csv_json_html_carry_the_same_numbers(table):
    from sweep.results.render import render

    rows = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    data = json.loads(render(table, "json"))
    html = render(table, "html")
    for row, line, jrow in zip(table.rows, rows, data["rows"]):
        assert line["variant"] == jrow["variant"] == row.variant
        for col in table.columns:
            assert float(line[col.key]) == row.cells[col.key].value
            assert jrow["cells"][col.key]["value"] == row.cells[col.key].value
            assert jrow["cells"][col.key]["best"] == row.cells[col.key].best
        assert int(line["failed"]) == jrow["trials"]["failed"] == row.failed
    assert data["metric"] == {"name": "eval_loss", "goal": "minimize"}
    assert html.count("<tr>") == len(table.rows) + 1 and "<strong>" in html


# --- plots ----------------------------------------------------------------------------


def test_plots_are_valid_pngs(table, synthetic, tmp_path):
    from mlflow import MlflowClient
    from PIL import Image

    from sweep.results.plots import CURVES, PARETO, make_plots, pareto_front

    paths = make_plots(MlflowClient(synthetic.uri), table, tmp_path)
    assert {p.name for p in paths} == {CURVES, PARETO}
    for p in paths:
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    assert pareto_front([(1, 3.0), (2, 2.0), (3, 2.5), (0.5, 4.0)], "minimize") == [(0.5, 4.0), (1, 3.0), (2, 2.0)]
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.9)], "maximize") == [(1, 0.5), (3, 0.9)]


# --- the CLI --------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_cli_table_markdown_and_artifacts_logged_to_parent(synthetic, tmp_path):
    from mlflow import MlflowClient

    result = invoke("table", SWEEP, "--tracking-uri", synthetic.uri, "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    assert "| Adapter | Extra params (approx.) |" in result.stdout
    assert (tmp_path / "plots" / "pareto.png").stat().st_size > 0
    logged = {f.path for f in MlflowClient(synthetic.uri).list_artifacts(synthetic.parent_run_id, "comparison")}
    assert {"comparison/COMPARISON.md", "comparison/comparison.csv", "comparison/comparison.json",
            "comparison/pareto.png", "comparison/eval_loss_curves.png"} <= logged


def test_cli_table_from_spec_path_and_uri_precedence(synthetic, tmp_path, monkeypatch):
    out = tmp_path / "t.csv"
    # The spec names the sweep and its tracking URI.
    result = invoke("table", str(synthetic.spec_path), "--format", "csv", "--out", str(out), "--no-log")
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("variant,")
    # --tracking-uri beats MLFLOW_TRACKING_URI, which beats the spec.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/mlflow.db")
    assert invoke("table", SWEEP, "--tracking-uri", synthetic.uri, "--no-log", "--format", "json").exit_code == 0
    bad = invoke("table", str(synthetic.spec_path), "--no-log")
    assert bad.exit_code == 2 and "no MLflow store at /nonexistent/mlflow.db" in bad.output


def test_cli_latest_sweep_of_an_experiment(synthetic):
    result = invoke("table", "--tracking-uri", synthetic.uri, "--experiment", SWEEP, "--format", "json", "--no-log")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parent_run_id"] == synthetic.parent_run_id


def test_cli_by_and_json(synthetic):
    result = invoke("table", SWEEP, "--tracking-uri", synthetic.uri, "--by", "adapter.r", "--format", "json", "--no-log")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["by"] == ["adapter.r"] and {(r["variant"], r["by"]["adapter.r"]) for r in data["rows"]} >= {("lora", 4), ("lora", 8)}
    typo = invoke("table", SWEEP, "--tracking-uri", synthetic.uri, "--by", "adapter.rr", "--no-log")
    assert typo.exit_code == 2 and "did you mean 'adapter.r'" in typo.output


def test_cli_user_errors_exit_2_without_traceback(synthetic, tmp_path):
    from mlflow import MlflowClient

    cases = [
        (["table", "nosuch", "--tracking-uri", synthetic.uri], "no sweep named 'nosuch'"),
        (["table", SWEEP, "--tracking-uri", f"sqlite:///{tmp_path}/missing.db"], "no MLflow store at"),
        (["table", SWEEP, "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow server"),
        (["table", SWEEP, "--tracking-uri", synthetic.uri, "--experiment", "nope"], "experiment 'nope' not found"),
        (["table", SWEEP, "--tracking-uri", synthetic.uri, "--format", "xls"], "--format xls"),
        (["table", SWEEP, "--tracking-uri", synthetic.uri, "--format", "peft-mc"], "--out DIR"),
        (["export", "nosuch", "--tracking-uri", synthetic.uri], "no sweep named 'nosuch'"),
    ]
    client = MlflowClient(synthetic.uri)
    exp = client.create_experiment("table-empty")
    client.create_run(exp, tags={ROLE_TAG: "sweep", SWEEP_TAG: "table-empty"})
    cases.append((["table", "table-empty", "--tracking-uri", synthetic.uri], "has no trial runs yet"))
    cases.append((["export", "table-empty", "--tracking-uri", synthetic.uri], "has no trial runs yet"))
    for args, needle in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)


def test_cli_peft_mc_results(synthetic, tmp_path):
    out = tmp_path / "results"
    result = invoke("table", SWEEP, "--tracking-uri", synthetic.uri, "--format", "peft-mc", "--out", str(out), "--no-log")
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.json"))
    assert len(files) == len(synthetic.finished())
    by_name = {r.trial.trial_id: r for r in synthetic.finished()}
    for f in files:
        data = json.loads(f.read_text())
        assert set(data) == {"run_info", "train_info", "meta_info"}
        assert {"created_at", "total_time", "experiment_name", "peft_branch", "train_config", "peft_config", "error_msg"} <= set(data["run_info"])
        assert {"accelerator_memory_reserved_avg", "accelerator_memory_max", "accelerator_memory_reserved_99th", "train_time",
                "file_size", "num_trainable_params", "num_total_params", "status", "metrics"} <= set(data["train_info"])
        assert {"model_info", "dataset_info", "package_info", "system_info", "pytorch_info"} <= set(data["meta_info"])
        adapter_type, trial_id = data["run_info"]["experiment_name"].split("/")
        assert f.name == f"{adapter_type}--{trial_id}.json"
        run = by_name[trial_id]
        info = data["train_info"]
        assert info["status"] == "success"
        assert info["num_trainable_params"] == run.metrics["trainable_params"]
        assert info["file_size"] == run.metrics["adapter_bytes"]
        assert info["train_time"] == run.metrics["train_s"] and data["run_info"]["total_time"] == run.metrics["wall_s"]
        assert [(m["step"], m["valid loss"]) for m in info["metrics"]] == run.history["eval_loss"]
        assert data["run_info"]["peft_config"]["peft_type"] == FAMILIES[adapter_type].peft_config(run.trial.adapter).peft_type.value
        assert data["meta_info"]["package_info"]["peft-version"] == "0.21.2"
        assert data["run_info"]["train_config"]["trainer"]["learning_rate"] == run.trial.trainer.learning_rate


# --- export ---------------------------------------------------------------------------


def _expected_best(runs: list[Logged]) -> Logged:
    """The best seed of the configuration with the lowest mean eval_loss (computed here
    independently of sweep.tracking.reader)."""
    configs: dict[str, list[Logged]] = {}
    for r in runs:
        configs.setdefault(_config(r), []).append(r)
    seeds = min(configs.values(), key=lambda rs: (statistics.fmean(x.metrics["eval_loss"] for x in rs),
                                                   statistics.fmean(x.metrics["trainable_params"] for x in rs)))
    return min(seeds, key=lambda r: (r.metrics["eval_loss"], r.metrics["trainable_params"], r.trial.trial_id))


def test_export_best(synthetic, tmp_path):
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sweep.results.export import export_best

    (exported,), _ = export_best(MlflowClient(synthetic.uri), synthetic.parent_run_id, tmp_path / "best")
    expected = _expected_best(synthetic.finished())
    assert exported.trial.run_id == expected.run_id
    # lora+pissa has the best mean (1.06); the single lowest losses (1.00) belong to other configs.
    assert expected.variant == "lora+pissa" and expected.metrics["eval_loss"] == 1.05
    assert (tmp_path / "best" / "selection.json").is_file()

    out = tmp_path / "best"
    best = yaml.safe_load((out / "best.yaml").read_text())
    trial = expected.trial
    assert best["model_type"] == "llm" and best["base_model"] == trial.model.base_model
    assert best["input_features"] == [{"name": trial.data.prompt_field, "type": "text"}]
    assert best["output_features"] == [{"name": trial.data.response_field, "type": "text"}]
    assert best["adapter"] == FAMILIES[trial.adapter.type].ludwig(trial.adapter)
    assert best["trainer"]["type"] == "finetune"
    assert best["trainer"]["learning_rate"] == trial.trainer.learning_rate
    assert best["trainer"]["batch_size"] == trial.trainer.batch_size
    assert best["trainer"]["gradient_accumulation_steps"] == trial.trainer.gradient_accumulation_steps

    assert TrialConfig.load(out / "trial.json") == trial
    spec, spec_dir = load_spec(out / "spec.yaml")
    (again,) = expand(spec, spec_dir).trials
    assert again.model_dump(exclude={"trial_id"}) == trial.model_dump(exclude={"trial_id"})
    assert spec.tracking.uri == synthetic.uri and spec.metric.name == "eval_loss"

    # The adapter directory is the real saved adapter: it loads onto the base model.
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(synthetic.model_dir), out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "hra_" in n) == expected.metrics["trainable_params"]


def test_table_export_and_the_parent_tag_pick_the_same_trial_ties_included(synthetic, table, tmp_path):
    """Every reader picks the same trial: the table, export and the parent run's tag."""
    from mlflow import MlflowClient

    from sweep.results.export import export_best
    from sweep.tracking.reader import best_of_sweep

    client = MlflowClient(synthetic.uri)
    (exported,), _ = export_best(client, synthetic.parent_run_id, tmp_path / "best")
    recorded = best_of_sweep(client, synthetic.experiment_id, synthetic.parent_run_id, "eval_loss", "minimize")
    assert table.best_trial_id == exported.trial.trial_id == recorded.trial_id == _expected_best(synthetic.finished()).trial.trial_id


def test_export_by_variant_via_cli(synthetic, tmp_path):
    out = tmp_path / "exp"
    result = invoke("export", SWEEP, "--tracking-uri", synthetic.uri, "--out", str(out), "--by-variant")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "export.json").read_text())
    variants = {r.variant for r in synthetic.runs}
    assert {v["variant"] for v in index["variants"]} == variants
    for v in index["variants"]:
        folder = out / v["dir"]
        expected = _expected_best([r for r in synthetic.finished() if r.variant == v["variant"]])
        assert v["run_id"] == expected.run_id and v["eval_loss"] == expected.metrics["eval_loss"]
        for name in ("best.yaml", "trial.json", "spec.yaml", "adapter/adapter_config.json"):
            assert (folder / name).is_file(), (folder, name)
        load_spec(folder / "spec.yaml")
    assert (out / "lora-pissa").is_dir()


# --- ui -------------------------------------------------------------------------------


def _read_lines(proc: subprocess.Popen, sink: list[str]) -> None:
    for line in proc.stdout:
        sink.append(line)


def test_ui_starts_serves_and_stops(synthetic, mlflow_server):
    port = free_port()
    db = mlflow_server.root / "mlflow.db"
    cmd = [sys.executable, "-m", "sweep", "ui", SWEEP, "--port", str(port), "--tracking-uri", f"sqlite:///{db}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **SERVER_ENV})
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(l.startswith("serving ") for l in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        text = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert f"MLflow UI: {base}" in text
        assert f"{base}/#/experiments/{synthetic.experiment_id}" in text
        assert f"/runs/{synthetic.parent_run_id}" in text
        with urllib.request.urlopen(base + "/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read(4096).lower()
        url = f"{base}/api/2.0/mlflow/experiments/get?experiment_id={synthetic.experiment_id}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert json.loads(resp.read())["experiment"]["name"] == SWEEP
    finally:
        proc.terminate()  # SIGTERM to `sweep ui` by its PID; it stops its mlflow ui group
        rc = proc.wait(30)
    assert rc == 0, "".join(lines)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"the mlflow ui on port {port} outlived `sweep ui`")


def test_ui_for_a_server_uri_just_links(synthetic):
    result = invoke("ui", SWEEP, "--tracking-uri", synthetic.uri)
    assert result.exit_code == 0, result.output
    assert f"{synthetic.uri}/#/experiments/{synthetic.experiment_id}" in result.output


# --- scale ----------------------------------------------------------------------------


def test_table_over_1000_runs(mlflow_server, capsys):
    """1,000 child runs are written straight into the server's sqlite store (through MLflow's
    own store API, without per-commit fsync to keep set-up short) and read back through the
    server, as `sweep table` reads them."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from sweep.results.render import to_markdown
    from sweep.results.table import build_table

    http = MlflowClient(mlflow_server.uri)
    exp = http.create_experiment("table-big")
    parent = http.create_run(exp, tags={ROLE_TAG: "sweep", SWEEP_TAG: "table-big"}).info.run_id

    def no_fsync(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()

    event.listen(Engine, "connect", no_fsync)
    try:
        direct = MlflowClient(f"sqlite:///{mlflow_server.root / 'mlflow.db'}")
        types = list(FAMILIES)
        started = time.perf_counter()
        failed = 0
        for i in range(1000):
            adapter = types[i % len(types)]
            lr, seed = (1e-4, 3e-4, 1e-3, 3e-3)[(i // len(types)) % 4], i % 3
            status = "FAILED" if i % 20 == 7 else "FINISHED"
            failed += status == "FAILED"
            tags = {PARENT_TAG: parent, "adapter.type": adapter, "adapter.variant": adapter, "trial_id": f"t{i:04d}", SWEEP_TAG: "table-big"}
            run_id = direct.create_run(exp, tags=tags).info.run_id
            ts = int(time.time() * 1000)
            values = {"eval_loss": 1.0 + (i % 97) / 100, "eval_token_accuracy": 0.5 + (i % 13) / 100, "s_per_step": 0.1,
                      "tokens_per_s": 900.0 + i % 50, "peak_memory_mb": 700.0, "trainable_params": 1000.0 + i % 8,
                      "trainable_percent": 0.1 + (i % 8) / 100, "adapter_bytes": 4096.0, "train_s": 3.0, "wall_s": 9.0}
            params = {"adapter.type": adapter, "adapter.r": str(4 * (1 + i % 4)), "trainer.learning_rate": str(lr),
                      "seed": str(seed), "model.base_model": "m", "data.train": "/d/train.jsonl",
                      **{f"trainer.k{j}": str(j) for j in range(24)}}
            direct.log_batch(run_id, metrics=[Metric(k, v, ts, 30) for k, v in values.items()],
                             params=[Param(k, v) for k, v in params.items()])
            direct.set_terminated(run_id, status)
        logged_s = time.perf_counter() - started
    finally:
        event.remove(Engine, "connect", no_fsync)

    started = time.perf_counter()
    big = build_table(http, parent)
    md = to_markdown(big)
    took = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n[scale] logged 1000 runs in {logged_s:.1f} s; table from 1000 runs via the server: {took:.2f} s")
    assert big.counts == {"trials": 1000, "finished": 1000 - failed, "failed": failed, "other": 0}
    assert {r.variant for r in big.rows} == set(types)
    assert sum(r.finished + r.failed for r in big.rows) == 1000
    assert md.count("\n| `") == len(types)
