"""Credentials never land in Tune's state, the MLflow store or Ray's logs, on the real local
runtime and through `--forward-env` on the session's Ray head (the 2-node `sweep submit`
case is in test_multinode.py). Every file of those folders is searched, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from services import tags
from sweeping import fake_secrets, files_holding, show, sweep_cli, sweep_runs, write_spec

pytestmark = pytest.mark.slow

ONE_TRIAL = [{"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}]


def test_nothing_secret_is_kept_by_a_local_sweep(tmp_path, tiny_model, mlflow_server):
    secrets = fake_secrets("local")
    password = f"uri-password-{uuid.uuid4().hex[:12]}"
    with_password = mlflow_server.uri.replace("http://", f"http://sweeper:{password}@")
    spec = write_spec(tmp_path, "secrets-local", tiny_model, mlflow_server.uri, ONE_TRIAL)
    # The embedded runtime's session folder goes under $RAY_TMPDIR/ray; short, since Ray's
    # socket paths live under it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    env = {**os.environ, **secrets, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "sweep", "run", str(spec), "--quiet", "--tracking-uri",
                            with_password], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, show(result)
    # A quiet start: the plan first, and no Ray banner about its default token authentication.
    assert result.stdout.splitlines()[0].startswith("plan: 1 trials (lora), 2 DeepSpeed workers each, on a local Ray")
    assert "Token authentication" not in result.stdout + result.stderr, show(result)
    _, children = sweep_runs(mlflow_server, "secrets-local")
    assert [c["info"]["status"] for c in children] == ["FINISHED"]  # rank 0 logged with the credentials
    state = json.loads((tmp_path / "runs" / "secrets-local" / "sweep_state.json").read_text())
    assert state["tracking_uri"] == mlflow_server.uri and state["tracking_credentials"]
    values = [*secrets.values(), password]
    assert not [v for v in values if v in result.stdout + result.stderr], show(result)
    sessions = list(ray_tmp.glob("ray/session_2*"))  # this sweep's own Ray session
    assert len(sessions) == 1 and (sessions[0] / "logs" / "runtime_env_agent.log").is_file()
    assert files_holding([tmp_path / "runs", mlflow_server.root, sessions[0]], values) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_forwarded_variable_reaches_rank_0_and_nothing_keeps_it(tmp_path, tiny_model, mlflow_server, ray_cluster):
    """The head's processes never had the variable: only `--forward-env` can bring it."""
    name, value = "PEFT_SWEEP_FORWARDED_TOKEN", f"forwarded-{uuid.uuid4().hex[:12]}"
    spec = write_spec(tmp_path, "secrets-forward", tiny_model, mlflow_server.uri, ONE_TRIAL)
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--quiet", "--forward-env", name,
                       cluster=ray_cluster, extra_env={name: value})
    assert result.returncode == 0, show(result)
    _, (child,) = sweep_runs(mlflow_server, "secrets-forward")
    assert tags(child)["peft_sweep.forwarded_env"] == name
    roots = [tmp_path / "runs", mlflow_server.root, *map(Path, ray_cluster.temp_dirs)]
    assert files_holding(roots, [value]) == []
    assert value not in result.stdout + result.stderr


def test_forwarding_an_unset_variable_is_refused_before_anything_starts(tmp_path, tiny_model, mlflow_server,
                                                                        ray_cluster):
    spec = write_spec(tmp_path, "secrets-unset", tiny_model, mlflow_server.uri, ONE_TRIAL)
    result = sweep_cli("run", str(spec), "--address", ray_cluster.address, "--forward-env", "PEFT_SWEEP_NOT_SET",
                       cluster=ray_cluster)
    assert result.returncode == 2, show(result)
    assert "--forward-env PEFT_SWEEP_NOT_SET: not set in this shell" in result.stderr
    assert "Traceback" not in result.stderr
    assert mlflow_server.experiment_id("secrets-unset") is None and not (tmp_path / "runs").exists()
