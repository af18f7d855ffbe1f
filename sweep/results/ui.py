"""Serve the MLflow dashboard for a sweep's store on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sweep.util.net import LOOPBACK as HOST
from sweep.util.net import wait_healthy
from sweep.util.procs import stop_group


def base_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The experiment's runs table (MLflow 3's landing page of an experiment is its overview
    tab), or one run's page."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{url}/{run_id}" if run_id else url


def start_ui(tracking_uri: str, port: int, host: str = HOST, log_path: str | Path | None = None) -> subprocess.Popen:
    """`mlflow ui` for the store, in its own process group so it can be stopped with its workers."""
    env = dict(os.environ)
    # The job runner only serves GenAI features and doubles start-up time; the user may opt back in.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port)]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        if log_path:
            log.close()  # the child holds its own descriptor


def wait_serving(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """True once `url/health` answers; False if the process exits or the timeout passes."""
    return wait_healthy(url.rstrip("/") + "/health", timeout, alive=lambda: proc.poll() is None)


def stop(proc: subprocess.Popen) -> None:
    """Stop the UI and the workers it started (its own process group)."""
    stop_group(proc)
