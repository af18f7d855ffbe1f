"""Real services for end-to-end tests, one per test session: an `mlflow server` and a Ray head.

Loaded as a pytest plugin (tests/conftest.py: `pytest_plugins = ["services"]`), so any test
can ask for `mlflow_server` or `ray_cluster`. Both are subprocesses this session starts and
stops by PID; nothing else on the machine (another Ray cluster, another MLflow) is touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


# No background job runner, no telemetry: the server is only a tracking store here.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a fixture's process group (it was started in its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class MlflowServer:
    """A running `mlflow server` and a tiny client for its REST API."""

    uri: str
    root: Path
    pid: int

    def call(self, method: str, endpoint: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def experiment_id(self, name: str) -> str | None:
        try:
            return self.call("GET", "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def search(self, experiment_id: str, filter: str = "", view: str = "ACTIVE_ONLY") -> list[dict[str, Any]]:
        runs, token = [], None
        while True:
            body: dict[str, Any] = {"experiment_ids": [experiment_id], "filter": filter, "max_results": 1000,
                                    "run_view_type": view}
            if token:
                body["page_token"] = token
            page = self.call("POST", "runs/search", body)
            runs.extend(page.get("runs", []))
            token = page.get("next_page_token")
            if not token:
                return runs

    def artifacts(self, run_id: str, path: str = "") -> list[dict[str, Any]]:
        query = {"run_id": run_id, **({"path": path} if path else {})}
        return self.call("GET", "artifacts/list", **query).get("files", [])

    def download(self, run_id: str, path: str) -> bytes:
        url = f"{self.uri}/get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.read()

    def history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        return self.call("GET", "metrics/get-history", run_id=run_id, metric_key=key, max_results=10000).get("metrics", [])


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts (clients upload
    through the server, as workers on other nodes would)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", "mlflow-artifacts:/",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **SERVER_ENV},
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 120 s:\n{_tail(log)}")
            time.sleep(0.5)
        yield MlflowServer(uri=uri, root=root, pid=proc.pid)
    finally:
        _stop(proc)


@dataclass
class RayCluster:
    address: str
    dashboard: str
    pid: int
    # `ray start` turns on token authentication; a client sends the token (~/.ray/auth_token)
    # only in token mode.
    client_env: dict[str, str]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """One Ray head for the session (`ray start --head --block`, 2 CPUs), stopped by its PID:
    `ray start --block` takes its Ray processes down with it. The dashboard runs because Ray
    Train's placement-group cleaner polls the state API it serves."""
    root = tmp_path_factory.mktemp("ray-head")
    port, dash, client = free_port(), free_port(), free_port()
    log = root / "ray.log"
    cmd = [
        # Loopback, like the embedded runtime: this host's primary address may not route to itself.
        "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "0",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--disable-usage-stats",
    ]
    client_env = {"RAY_AUTH_MODE": "token"}
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1", **client_env}
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log)}")
            status = subprocess.run(["ray", "status", "--address", address], capture_output=True, text=True, env=env)
            if status.returncode == 0 and "CPU" in status.stdout:
                break
            if time.time() > deadline:
                raise RuntimeError(f"ray head not up after 180 s:\n{_tail(log)}\n{status.stdout}{status.stderr}")
            time.sleep(1)
        yield RayCluster(address=address, dashboard=f"http://127.0.0.1:{dash}", pid=proc.pid, client_env=client_env)
    finally:
        # Ray's graceful shutdown of a whole group takes ~30 s; the test cluster needs none of it.
        _stop(proc, signal.SIGTERM, timeout=5)
