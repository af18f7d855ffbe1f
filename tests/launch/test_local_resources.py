"""A trial the embedded local runtime cannot place is refused before anything starts: one
line, exit 2, no Ray session, no MLflow run (Ray would otherwise wait forever for the
placement group)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("resources", "needle"),
    [
        ({"workers_per_trial": 8}, "one trial needs 8 CPUs in one placement group (workers_per_trial 8 x cpus_per_worker 1)"),
        ({"workers_per_trial": 1, "gpus_per_worker": 1}, "one trial needs 1 GPUs (workers_per_trial 1 x gpus_per_worker 1)"),
    ],
)
def test_unplaceable_trial_is_refused_before_anything_starts(tmp_path, tiny_model, resources, needle):
    db = tmp_path / "mlflow.db"
    spec = {"name": "too-big", "model": {"base_model": str(tiny_model)},
            "data": {"train": str(tiny_model / "task" / "train.jsonl"), "eval": str(tiny_model / "task" / "eval.jsonl")},
            "search": {"adapters": [{"type": "lora"}], "trainer": {"max_steps": 1}},
            "resources": resources, "tracking": {"uri": f"sqlite:///{db}"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "sweep", "run", str(tmp_path / "spec.yaml")], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr and "this machine has" in result.stderr
    assert not db.exists() and not any(ray_tmp.iterdir())
    assert not (tmp_path / "runs").exists()
