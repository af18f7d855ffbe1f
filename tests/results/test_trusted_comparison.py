"""The comparison a user decides on, from a real sweep (Ray, DeepSpeed, MLflow, PEFT):
generation metrics and their per-example records, the test split and forgetting, intervals,
paired tests against the best row, parameter importance, and an export that says how sure
it is.

The sweep plants its answer: LoRA trained at learning rate 3e-3 against the same LoRA at
1e-9 (untrained, in effect), each with eval_every 5 or 10, which changes nothing about
training. So the learning rate is the only field that matters, the 1e-9 rows must be worse
than the best, and the two 3e-3 rows must be tied.
"""

from __future__ import annotations

import json

import pytest
import yaml
from services import metrics, tags
from sweeping import show, sweep_cli, sweep_runs, write_spec

from trials import artifacts

pytestmark = pytest.mark.slow

NAME = "e2e-stats"
STEPS = 10
ROWS = ["--by", "trainer.learning_rate", "--by", "trainer.eval_every"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model, mlflow_server, ray_cluster):
    root = tmp_path_factory.mktemp("stats")
    eval_rows = (tiny_model / "task" / "eval.jsonl").read_text().splitlines()
    (root / "test.jsonl").write_text("\n".join(eval_rows[-13:]) + "\n")
    (root / "forgetting.txt").write_text("copy abc = abc\nreverse hello = olleh\nadd 2 3 = 5\n")
    spec = write_spec(root, NAME, tiny_model, mlflow_server.uri,
                      [{"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
    raw = yaml.safe_load(spec.read_text())
    raw["data"].update(test=str(root / "test.jsonl"), forgetting=str(root / "forgetting.txt"))
    raw["search"]["seeds"] = [0, 1]
    raw["search"]["trainer"].update(learning_rate=[1.0e-9, 3.0e-3], max_steps=STEPS, eval_every=[5, 10])
    raw["evaluation"] = {"generate": True, "max_new_tokens": 6, "answer_pattern": "([a-z]+)"}
    raw["metric"] = {"name": "eval_loss"}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    table = sweep_cli("table", NAME, "--tracking-uri", mlflow_server.uri, "--format", "json", "--importance",
                      "--plots", str(root / "plots"), *ROWS, cluster=ray_cluster)
    assert table.returncode == 0, show(table)
    return {"root": root, "spec": spec, "table": json.loads(table.stdout)}


def test_every_trial_generates_tests_and_measures_forgetting(planted, mlflow_server):
    _, children = sweep_runs(mlflow_server, NAME)
    assert len(children) == 8
    for run in children:
        m, run_id = metrics(run), run["info"]["run_id"]
        rows = [json.loads(line) for line in mlflow_server.download(run_id, artifacts.PREDICTIONS_FILE).splitlines()]
        # The same eval items, in the same order, for every trial: 2 workers x 2 batches x 8.
        assert [r["index"] for r in rows] == list(range(32))
        assert m["eval_exact_match"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert m["eval_answer_accuracy"] == pytest.approx(sum(r["answer_correct"] for r in rows) / len(rows))
        tested = mlflow_server.download(run_id, artifacts.TEST_PREDICTIONS_FILE).splitlines()
        assert len(tested) == 13 and "test_loss" in m and "test_exact_match" in m
        assert m["forgetting"] == pytest.approx(m["forgetting_after"] - m["forgetting_before"])
        # Forgetting is measured against the base model itself: the same for every trial.
        assert m["forgetting_before"] == pytest.approx(metrics(children[0])["forgetting_before"], rel=1e-6)


def test_the_planted_winner_is_significant_and_the_no_op_is_tied(planted):
    table = planted["table"]
    rows = {(r["by"]["trainer.learning_rate"], r["by"]["trainer.eval_every"]): r for r in table["rows"]}
    best = table["rows"][0]
    assert best["by"]["trainer.learning_rate"] == 3e-3 and best["tied_with_best"] is None
    twin = rows[(3e-3, 15 - best["by"]["trainer.eval_every"])]
    assert twin["tied_with_best"] is True and twin["p_vs_best"] == 1.0  # identical training: no difference at all
    assert twin["mean"] == pytest.approx(best["mean"], abs=1e-9)
    for every in (5, 10):
        slow = rows[(1e-9, every)]
        assert slow["tied_with_best"] is False and slow["p_vs_best"] < 0.05, slow
        assert slow["n_seeds"] == 2 and slow["ci_low"] <= slow["mean"] <= slow["ci_high"]
    assert table["significance"]["tied_rows"] == [twin["variant"] + " " + " ".join(
        f"{k.split('.')[-1]}={v:g}" for k, v in twin["by"].items())]
    # The test split is reported beside the ranking metric, which stays the eval split's.
    assert table["metric"]["name"] == "eval_loss" and table["columns"][1]["key"] == "test_loss"
    means = [r["mean"] for r in table["rows"]]
    assert means == sorted(means)


def test_importance_puts_the_learning_rate_first(planted):
    importance = planted["table"]["importance"]
    assert importance["reason"] is None and importance["n_trials"] == 8
    assert importance["scores"][0]["param"] == "trainer.learning_rate" and importance["scores"][0]["importance"] > 0.8
    assert (planted["root"] / "plots" / "importance.png").stat().st_size > 1000
    assert {p.name for p in (planted["root"] / "plots").glob("*.png")} >= {"pareto.png", "eval_loss_curves.png"}


def test_export_names_the_tied_rows_and_its_prediction_regenerates(planted, mlflow_server, ray_cluster, tiny_model,
                                                                    tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = sweep_cli("export", NAME, "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "best"), *ROWS,
                       cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    assert "is the best, but statistically tied with: lora" in result.stdout
    picked = json.loads((tmp_path / "best" / "selection.json").read_text())
    parent, children = sweep_runs(mlflow_server, NAME)
    assert picked["chosen"]["trial_id"] == tags(parent)["best_trial_id"]
    assert [t["row"] for t in picked["tied_with_chosen"]] == planted["table"]["significance"]["tied_rows"]
    assert picked["test"]["correction"] == "holm" and picked["metric"] == {"name": "eval_loss", "goal": "minimize"}

    # The chosen trial's first prediction, regenerated outside the sweep from the exported adapter.
    chosen = next(r for r in children if tags(r)["trial_id"] == picked["chosen"]["trial_id"])
    first = json.loads(mlflow_server.download(chosen["info"]["run_id"], artifacts.PREDICTIONS_FILE).splitlines()[0])
    prompt = json.loads((tiny_model / "task" / "eval.jsonl").read_text().splitlines()[first["index"]])["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      str(tmp_path / "best" / "adapter")).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == first["prediction"]


def test_the_sweep_is_found_by_name_from_any_folder(planted, ray_cluster, tmp_path):
    """No --tracking-uri, no MLFLOW_TRACKING_URI, another folder: the name resolves through the
    index of sweeps this machine ran to the sweep's own store."""
    result = sweep_cli("table", NAME, "--format", "json", "--no-log", *ROWS, cluster=ray_cluster, cwd=tmp_path)
    assert result.returncode == 0, show(result)
    again = json.loads(result.stdout)
    assert again["parent_run_id"] == planted["table"]["parent_run_id"]
    assert [r["mean"] for r in again["rows"]] == [r["mean"] for r in planted["table"]["rows"]]
    unknown = sweep_cli("table", "no-such-sweep-here", cluster=ray_cluster, cwd=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_the_mlflow_ui_opens_on_the_trial_runs_in_a_real_browser(planted, mlflow_server, ray_cluster):
    """`sweep ui` links the experiment's runs table; headless Chromium renders it from the
    real server: the training-runs page with the sweep's run and its 8 trials, not the GenAI
    overview an experiment's bare link opens on."""
    import re
    import shutil
    import subprocess

    result = sweep_cli("ui", NAME, "--tracking-uri", mlflow_server.uri, cluster=ray_cluster)
    assert result.returncode == 0, show(result)
    parent, _ = sweep_runs(mlflow_server, NAME)
    exp = parent["info"]["experiment_id"]
    runs_url = f"{mlflow_server.uri}/#/experiments/{exp}/runs"
    assert f"experiment {NAME}: {runs_url}\n" in result.stdout
    assert f"{runs_url}/{parent['info']['run_id']}" in result.stdout
    exp_tags = {t["key"]: t["value"] for t in mlflow_server.call("GET", "experiments/get", experiment_id=exp)
                ["experiment"]["tags"]}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
    view = f"mlflow.sharedViewState.peftsweep{parent['info']['run_id']}"
    assert set(exp_tags) == {"mlflow.experimentKind", view}
    trials_url = f"{runs_url}?viewStateShareKey=peftsweep{parent['info']['run_id']}"
    assert f"trials of {NAME} by eval_loss: {trials_url}\n" in result.stdout

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for the browser check (.ci/run installs Debian's chromium)"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", runs_url], capture_output=True, text=True, timeout=120).stdout
    assert "Training runs" in dom and f">{NAME}<" in dom
    matching = re.search(r"<strong>(\d+)</strong> matching runs", dom)
    assert matching and int(matching.group(1)) == 9, dom[-2000:]  # the sweep's run and its 8 trial runs
    assert "No data available for the selected time range" not in dom  # the GenAI overview's empty charts

    # The sweep's own view: its 8 trial runs as rows (not the parent), with the metric columns a
    # person compares.
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--window-size=1600,900", "--dump-dom", trials_url],
                         capture_output=True, text=True, timeout=120).stdout
    assert "You're viewing a shared view" in dom, dom[-2000:]
    matching = re.search(r"<strong>(\d+)</strong> matching runs", dom)
    assert matching and int(matching.group(1)) == 8, dom[-2000:]
    for column in ("eval_loss", "peak_memory_mb", "device_hours"):
        assert f">{column}<" in dom or f'"{column}"' in dom, column
