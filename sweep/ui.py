"""Serve the MLflow dashboard for a sweep's store on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def base_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{url}/runs/{run_id}" if run_id else url


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the UI and the workers it started (its own process group, led by its PID)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
