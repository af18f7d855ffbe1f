"""Datasets named by hub id (`owner/name`) load offline from the local Hugging Face datasets
cache, in a trial and in `sweep plan`; what is not cached, and wrong splits or subsets, are
one line each (exit 2). The cache is a temporary HF_HOME built by tests/hf_cache.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hf_cache import build_cached_dataset

REPO = "peft-sweep-tests/rot"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    task = tiny_model / "task"
    build_cached_dataset(home, REPO, {"train": rows(task / "train.jsonl"), "validation": rows(task / "eval.jsonl")},
                         subset="main")
    build_cached_dataset(home, REPO, {"train": rows(task / "train.jsonl")[:20]}, subset="small")
    return home


def run(*cmd: str, hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONWARNINGS": "ignore"}
    env.pop("HF_DATASETS_CACHE", None)
    return subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def spec(tmp_path: Path, model: Path, **data) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hub-data", "model": {"base_model": str(model)},
        "data": {"train": REPO, "eval": REPO, "subset": "main", "max_length": 32, **data},
        "search": {"adapters": [{"type": "lora"}], "trainer": {"max_steps": 2, "batch_size": 4}},
    }))
    return path


def test_a_trial_trains_on_a_cached_dataset_offline(hf_home, tiny_model, tmp_path):
    cfg = {"model": {"base_model": str(tiny_model)},
           "data": {"train": REPO, "eval": REPO, "subset": "main", "max_length": 32},
           "adapter": {"type": "lora"}, "trainer": {"max_steps": 2, "batch_size": 4, "eval_batches": 1}}
    (tmp_path / "trial.json").write_text(json.dumps(cfg))
    result = run("trials", "run", str(tmp_path / "trial.json"), "--out", str(tmp_path / "out"), hf_home=hf_home,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["step"] == 2 and metrics["eval_loss"] > 0


def test_plan_reads_each_split_of_the_cached_dataset(hf_home, tiny_model, tmp_path):
    result = run("sweep", "plan", str(spec(tmp_path, tiny_model)), "--json", hf_home=hf_home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = {d["role"]: d for d in json.loads(result.stdout)["data"]}
    task = tiny_model / "task"
    assert data["train"]["path"] == REPO and data["train"]["examples"] == len(rows(task / "train.jsonl"))
    assert data["eval"]["examples"] == len(rows(task / "eval.jsonl"))  # the validation split
    small = run("sweep", "plan", str(spec(tmp_path, tiny_model, subset="small", eval_fraction=0.1, eval=None)),
                "--json", hf_home=hf_home, cwd=tmp_path)
    assert small.returncode == 0, small.stderr
    assert json.loads(small.stdout)["data"][0]["examples"] == 20


@pytest.mark.parametrize(("data", "needles"), [
    ({"train": "nobody/nothing", "eval": None, "subset": None},
     ["data.train 'nobody/nothing'", "never download", "datasets.load_dataset('nobody/nothing')"]),
    ({"test": REPO}, ["data.test_split", "unknown split", "'validation'"]),
    ({"subset": None}, ["data.subset", "small", "main"]),
    ({"subset": "large"}, ["data.subset", "large"]),
], ids=["not-cached", "unknown-split", "subset-needed", "subset-not-cached"])
def test_what_the_cache_lacks_is_one_line(hf_home, tiny_model, tmp_path, data, needles):
    result = run("sweep", "plan", str(spec(tmp_path, tiny_model, **data)), hf_home=hf_home, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert any(all(n in ln for n in needles) for ln in lines), result.stderr
