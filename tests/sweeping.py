"""Helpers shared by the end-to-end tests that drive the `sweep` command line against
real services (tests/services.py) and read the result back through MLflow's REST API."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from services import tags

MAX_STEPS, EVAL_EVERY = 6, 3


def write_spec(root: Path, name: str, model: Path, uri: str, adapters: list[dict[str, Any]], **extra: Any) -> Path:
    spec = {
        "name": name,
        "model": {"base_model": str(model)},
        "data": {"train": str(model / "task" / "train.jsonl"), "eval": str(model / "task" / "eval.jsonl"), "max_length": 32},
        "search": {
            "strategy": "grid",
            "seeds": [0],
            "adapters": adapters,
            "trainer": {"learning_rate": 1.0e-3, "max_steps": MAX_STEPS, "batch_size": 8, "eval_every": EVAL_EVERY,
                        "eval_batches": 2},
        },
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1},
        "deepspeed": {"zero_stage": 2},
        "tracking": {"uri": uri},
        **extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


THREE_TRIALS = [
    {"type": "lora", "r": [4, 8], "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    {"type": "c3a", "block_size": 32, "trainer": {"learning_rate": 0.05}},
]


def sweep_cli(*args: str, cluster, timeout: float = 600, extra_env: dict[str, str] | None = None, **popen: Any):
    env = {**os.environ, **cluster.client_env, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "sweep", *args]
    if popen.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=popen.pop("stdout"), stderr=subprocess.STDOUT, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def planned_ids(spec: Path) -> dict[str, dict[str, Any]]:
    from sweep.spec import load_spec, make_plan

    s, d = load_spec(spec)
    return {t.trial.trial_id: t.trial.model_dump(mode="json") for t in make_plan(s, d).trials}


def sweep_runs(server, name: str, view: str = "ACTIVE_ONLY") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    exp = server.experiment_id(name)
    assert exp is not None, f"no experiment {name}"
    runs = server.search(exp, view=view)
    parents = [r for r in runs if tags(r).get("peft_sweep.role") == "sweep"]
    assert len(parents) == 1, [tags(r) for r in parents]
    parent = parents[0]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    return parent, children


def by_status(children: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in children:
        out.setdefault(r["info"]["status"], []).append(tags(r)["trial_id"])
    return out


def show(result) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"


@contextmanager
def serving_ui(*args: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> Iterator[tuple[list[str], Any]]:
    """`sweep ui ARGS` in the background until it says it is serving; yields (its output lines
    so far, the process). Stopped on exit by SIGTERM to its PID (it stops its own mlflow ui)."""
    proc = subprocess.Popen([sys.executable, "-m", "sweep", "ui", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        yield lines, proc
    finally:
        proc.terminate()
        proc.wait(30)


def fake_secrets(prefix: str) -> dict[str, str]:
    """Credentials as a user's shell holds them, with values unique to this test."""
    tag = uuid.uuid4().hex[:12]
    return {name: f"{prefix}-{name.lower()}-{tag}" for name in
            ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_HUB_SECRET", "PEFT_SWEEP_API_KEY")}


def files_holding(roots: list[Path], values: list[str]) -> list[str]:
    """Every file under `roots` (all of its bytes, binary or text) that contains one of `values`."""
    needles = [v.encode() for v in values]
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                data = path.read_bytes()
            except OSError:  # a socket, or a file a live process just removed
                continue
            found += [f"{path}: {v.decode()}" for v in needles if v in data]
    return found


def run_refused(tmp_path: Path, spec: dict[str, Any]) -> subprocess.CompletedProcess:
    """`sweep run` of this spec on the embedded local runtime, expected to be refused before
    anything starts: exit 2, no traceback, and no Ray session under its own RAY_TMPDIR."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "sweep", "run", str(tmp_path / "spec.yaml")], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(ray_tmp.iterdir()), "a Ray session was started"
    return result


def tiny_spec(name: str, model: Path, **extra: Any) -> dict[str, Any]:
    """A one-trial spec on the tiny model, for checks that refuse it before it runs."""
    return {"name": name, "model": {"base_model": str(model)},
            "data": {"train": str(model / "task" / "train.jsonl"), "eval": str(model / "task" / "eval.jsonl")},
            "search": {"adapters": [{"type": "lora"}], "trainer": {"max_steps": 1}}, **extra}
