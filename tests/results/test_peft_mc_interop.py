"""`sweep table --format peft-mc` output, loaded by HF PEFT's own method_comparison loader.

A small synthetic sweep is logged into a local sqlite MLflow store in the layout `sweep run`
writes (parent run, nested child runs with params, stepped metrics, trial.json and
metrics.json artifacts). The CLI writes PEFT result files, and the vendored copy of PEFT's
`processing.py` (tests/results/peft_mc_processing.py) must load them with the values logged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pandas as pd
import pytest
from peft_mc_processing import compute_pareto_frontier, filter_data, get_metric_preferences, get_model_ids, load_df
from typer.testing import CliRunner

from sweep.cli import app
from sweep.tracking.layout import (
    ADAPTER_TYPE_TAG,
    ERROR_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    VARIANT_TAG,
)
from sweep.tracking.runs import trial_params
from trials.adapters import FAMILIES
from trials.config import TrialConfig

pytestmark = pytest.mark.slow  # ~10 s: MLflow sqlite migrations, and the CLI imports peft/torch

SWEEP = "peft-mc-syn"
BASE = "org/tiny-llama"
EVAL_STEPS = (10, 20, 30)
TRAINER = {"max_steps": 30, "batch_size": 4, "gradient_accumulation_steps": 2, "eval_every": 10}
COMMON = {"eval_loss": 1.2, "eval_token_accuracy": 0.61, "tokens_per_s": 812.5, "s_per_step": 0.05, "peak_memory_mb": 734.25,
          "trainable_params": 12288.0, "total_params": 1_012_288.0, "adapter_bytes": 51_200.0, "train_s": 12.4, "wall_s": 20.6,
          "train_loss": 0.93}
# name -> (adapter, status, final metrics on top of COMMON, setup recorded in metrics.json)
TRIALS = {
    # A current run: test split scored by exact match, forgetting and the train totals logged.
    "lora8": ({"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, "FINISHED",
              {"test_exact_match": 0.41, "forgetting": 0.021, "train_samples": 240.0, "train_tokens": 10_075.0, "step": 30.0},
              {"device": "cpu", "world_size": 1}),
    # Answer accuracy is preferred to exact match when both are logged.
    "lora4": ({"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "FINISHED",
              {"test_answer_accuracy": 0.5, "test_exact_match": 0.3, "forgetting": -0.004, "train_samples": 240.0,
               "train_tokens": 9_990.0, "step": 30.0}, {"device": "cpu", "world_size": 1}),
    # A run from before the train totals, test split and forgetting: all derived or defaulted.
    "oft": ({"type": "oft", "oft_block_size": 16, "target_modules": ["q_proj"]}, "FINISHED", {},
            {"device": "cuda", "world_size": 2}),
    # Finished but lacking what PEFT's loader casts to int: written as "incomplete", skipped by it.
    "ln": ({"type": "ln_tuning"}, "FINISHED", {"peak_memory_mb": None, "tokens_per_s": None}, {"device": "cpu"}),
    "failed": ({"type": "hra", "r": 8, "target_modules": ["q_proj"]}, "FAILED", {}, {}),
}


@dataclass
class Logged:
    trial: TrialConfig
    status: str
    metrics: dict[str, float]
    setup: dict = field(default_factory=dict)


def make_trial(adapter: dict) -> TrialConfig:
    return TrialConfig.model_validate({
        "model": {"base_model": BASE}, "adapter": adapter, "trainer": TRAINER,
        "data": {"train": "task/train.jsonl", "eval": "task/eval.jsonl", "test": "task/test.jsonl"},
    }).with_id()


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def synthetic(tmp_path) -> tuple[str, dict[str, Logged]]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(SWEEP, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={ROLE_TAG: "sweep", SWEEP_TAG: SWEEP}, run_name=SWEEP).info.run_id
    logged = {}
    for name, (adapter, status, extra, setup) in TRIALS.items():
        trial = make_trial(adapter)
        final = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
        if status != "FINISHED":
            final = {"eval_loss": 2.5}
        tags = {PARENT_TAG: parent, ROLE_TAG: "trial", SWEEP_TAG: SWEEP, TRIAL_ID_TAG: trial.trial_id,
                ADAPTER_TYPE_TAG: trial.adapter.type, VARIANT_TAG: FAMILIES[trial.adapter.type].variant(trial.adapter)}
        run_id = client.create_run(exp, tags=tags, run_name=trial.trial_id).info.run_id
        ts = int(time.time() * 1000)
        # Eval history at every eval step, train loss at every step; the final value at the last step.
        metrics = [Metric(k, final[k] + 0.01 * (EVAL_STEPS[-1] - s), ts, s) for k in ("eval_loss", "eval_token_accuracy")
                   if k in final for s in EVAL_STEPS[:-1]]
        metrics += [Metric("train_loss", final["train_loss"] + 0.02 * (30 - s), ts, s) for s in range(1, 30) if "train_loss" in final]
        metrics += [Metric(k, v, ts, EVAL_STEPS[-1]) for k, v in final.items()]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in trial_params(trial).items()])
        run_dir = tmp_path / name
        run_dir.mkdir()
        trial.dump(run_dir / "trial.json")
        client.log_artifact(run_id, str(run_dir / "trial.json"))
        if status == "FINISHED":
            (run_dir / "metrics.json").write_text(json.dumps({
                "trial_id": trial.trial_id, "metrics": final, "setup": setup,
                "versions": {"python": "3.12.3", "peft": "0.21.2", "torch": "2.13.0", "transformers": "5.24.0"}}))
            client.log_artifact(run_id, str(run_dir / "metrics.json"))
        else:
            client.set_tag(run_id, ERROR_TAG, "RuntimeError: synthetic failure")
        client.set_terminated(run_id, status)
        logged[name] = Logged(trial, status, final, setup)
    client.set_terminated(parent, "FINISHED")
    return uri, logged


def test_peft_loader_reads_sweep_table_output(synthetic, tmp_path):
    uri, logged = synthetic
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["table", SWEEP, "--tracking-uri", uri, "--format", "peft-mc", "--out", str(out), "--no-log"])
    assert result.exit_code == 0, result.output
    finished = {n: r for n, r in logged.items() if r.status == "FINISHED"}
    assert len(list(out.glob("*.json"))) == len(finished)

    messages: list[str] = []
    df = load_df(str(out), "MetaMathQA", print_fn=messages.append)
    assert messages == ["Skipped 1 of 4 entries because the train status != success"]
    loadable = {n: r for n, r in finished.items() if n != "ln"}
    assert sorted(df["experiment_name"]) == sorted(f"{r.trial.adapter.type}/{r.trial.trial_id}" for r in loadable.values())

    rows = {name: df[df["experiment_name"] == f"{r.trial.adapter.type}/{r.trial.trial_id}"].iloc[0] for name, r in loadable.items()}
    assert rows["lora8"]["test_accuracy"] == pytest.approx(0.41)
    assert rows["lora4"]["test_accuracy"] == pytest.approx(0.5)  # test_answer_accuracy over test_exact_match
    assert rows["oft"]["test_accuracy"] == pytest.approx(COMMON["eval_token_accuracy"])  # the last resort
    assert rows["lora8"]["forgetting*"] == pytest.approx(0.021)
    assert rows["lora4"]["forgetting*"] == pytest.approx(-0.004)
    assert rows["oft"]["forgetting*"] == 123  # not measured: their loader's own default
    assert rows["lora8"]["train_samples"] == 240 and rows["lora8"]["train_total_tokens"] == 10_075
    # Derived for the old run: steps * batch * accumulation * world size, and tokens/s * train seconds.
    assert rows["oft"]["train_samples"] == 30 * 4 * 2 * 2
    assert rows["oft"]["train_total_tokens"] == round(COMMON["tokens_per_s"] * COMMON["train_s"])
    for name, row in rows.items():
        m = logged[name].metrics
        assert row["model_id"] == BASE
        assert row["task_name"] == "MetaMathQA"
        assert row["peft_type"] == FAMILIES[logged[name].trial.adapter.type].peft_config(logged[name].trial.adapter).peft_type.value
        assert row["train_loss"] == pytest.approx(m["train_loss"])
        assert row["train_time"] == round(m["train_s"]) and row["total_time"] == round(m["wall_s"])
        assert row["accelerator_memory_max"] == round(m["peak_memory_mb"] * 2**20)
        assert row["accelerator_memory_reserved_avg"] == row["accelerator_memory_reserved_99th"] == row["accelerator_memory_max"]
        assert row["num_trainable_params"] == m["trainable_params"] and row["file_size"] == m["adapter_bytes"]
        assert row["peft_version"] == "0.21.2" and row["torch_version"] == "2.13.0" and row["transformers_version"] == "5.24.0"
        assert pd.isna(row["datasets_version"]) and pd.isna(row["bitsandbytes_version"])  # not recorded: null
        assert json.loads(row["train_config"])["trainer"]["batch_size"] == 4
        assert row["created_at"].tzinfo is not None

    # Which of our metrics each value came from is in the file (PEFT ignores the key).
    sources = {n: json.loads((out / f"{r.trial.adapter.type}--{r.trial.trial_id}.json").read_text())["meta_info"]["peft_sweep"]["sources"]
               for n, r in finished.items()}
    assert sources["lora8"]["test accuracy"] == "test_exact_match"
    assert sources["lora4"]["test accuracy"] == "test_answer_accuracy"
    assert sources["oft"]["test accuracy"] == "eval_token_accuracy" and sources["oft"]["forgetting"] is None
    assert sources["oft"]["train samples"] == "step * batch_size * gradient_accumulation_steps * world_size"
    ln = json.loads((out / f"ln_tuning--{logged['ln'].trial.trial_id}.json").read_text())
    assert ln["train_info"]["status"] == "incomplete"
    assert "accelerator_memory_max" in ln["run_info"]["error_msg"] and "train total tokens" in ln["run_info"]["error_msg"]

    # What their app does with the frame: model list, filtered table, Pareto frontier.
    assert get_model_ids("MetaMathQA", df) == [BASE]
    shown = filter_data("MetaMathQA", BASE, df)
    front = compute_pareto_frontier(shown, "accelerator_memory_max", "test_accuracy", get_metric_preferences("MetaMathQA"))
    assert list(front["experiment_name"]) == [rows["oft"]["experiment_name"]]  # same memory, best accuracy (0.61)
