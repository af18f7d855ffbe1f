"""Real services for end-to-end tests, one per test session: an `mlflow server` and a Ray head.

Loaded as a pytest plugin (tests/conftest.py: `pytest_plugins = ["services"]`), so any test
can ask for `mlflow_server` or `ray_cluster`. Both are subprocesses this session starts and
stops by PID; nothing else on the machine (another Ray cluster, another MLflow) is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sweep.util.net import free_port, wait_healthy
from sweep.util.procs import stop_group

# No background job runner, no telemetry: the server is only a tracking store here.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


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
    try:
        if not wait_healthy(uri + "/health", 120, alive=lambda: proc.poll() is None):
            raise RuntimeError(f"mlflow server not healthy after 120 s (exit code {proc.poll()}):\n{_tail(log)}")
        yield MlflowServer(uri=uri, root=root, pid=proc.pid)
    finally:
        stop_group(proc, timeout=30)


@dataclass
class RayCluster:
    address: str
    dashboard: str
    pid: int
    # The cluster runs with token authentication, as Ray 2.60 clusters do by default; its
    # clients need the mode and the token (a fresh one per test session, never ~/.ray's).
    client_env: dict[str, str]
    node_ids: dict[str, str] = field(default_factory=dict)  # "head" / "worker-N" -> Ray node id
    temp_dirs: list[str] = field(default_factory=list)  # each node's session folder (its logs)


def _ray_env() -> tuple[dict[str, str], dict[str, str]]:
    # `ray start` refuses token mode without a token; one from the environment keeps the test
    # independent of whatever ~/.ray holds on the machine.
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    return client_env, {**os.environ, "RAY_TRAIN_V2_ENABLED": "1", **client_env}


def _ray_nodes(address: str, env: dict[str, str]) -> list[dict[str, Any]]:
    listed = subprocess.run(["ray", "list", "nodes", "--address", address, "--format", "json", "--limit", "100"],
                            capture_output=True, text=True, env=env, timeout=60)
    try:
        return [n for n in json.loads(listed.stdout) if n.get("state") == "ALIVE"]
    except json.JSONDecodeError:
        return []


@contextmanager
def ray_nodes(root: Path, *, cpus: list[int], resources: list[dict[str, float]] | None = None, attempts: int = 3,
              node_env: dict[str, str] | None = None):
    """A Ray cluster of len(cpus) nodes on this machine: `ray start --head --block` plus
    `ray start --address ... --block` per extra node, each with its own CPUs and custom
    resources, all on loopback (this host's primary address may not route to itself). Each
    `ray start --block` takes its node's processes down with it, so stopping its process
    group stops the node; nothing else on the machine is touched. `node_env` is added to every
    node's environment (what a cluster launcher's env or a KubeRay Secret gives a real node).

    A start is retried on fresh ports: a port found free can be taken by another process
    before Ray binds it (seen once with the head's client server)."""
    resources = resources or [{} for _ in cpus]
    procs: list[subprocess.Popen] = []
    temp_dirs: list[str] = []
    try:
        for attempt in range(1, attempts + 1):
            try:
                cluster = _start_nodes(root / f"attempt-{attempt}", cpus, resources, procs, temp_dirs, node_env or {})
                break
            except RuntimeError:
                _stop_nodes(procs, temp_dirs)
                if attempt == attempts:
                    raise
        yield cluster
    finally:
        _stop_nodes(procs, temp_dirs)


def _stop_nodes(procs: list[subprocess.Popen], temp_dirs: list[str]) -> None:
    # Ray's graceful shutdown of a whole group takes ~30 s; a test cluster needs none of it.
    for proc in reversed(procs):
        stop_group(proc, signal.SIGTERM, timeout=5)
    for path in temp_dirs:
        shutil.rmtree(path, ignore_errors=True)
    procs.clear()
    temp_dirs.clear()


def _start_nodes(root: Path, cpus: list[int], resources: list[dict[str, float]], procs: list[subprocess.Popen],
                 temp_dirs: list[str], node_env: dict[str, str]) -> RayCluster:
    root.mkdir(parents=True, exist_ok=True)
    port, dash, client = free_port(), free_port(), free_port()
    client_env, env = _ray_env()
    env = {**env, **node_env}
    address = f"127.0.0.1:{port}"
    logs: list[Path] = []

    def start(cmd: list[str], name: str, n_cpus: int, res: dict[str, float]) -> None:
        # Each node its own session folder, as on separate machines: nodes sharing one would
        # unpack a job's working dir into the same path, the later replacing the folder the
        # job's driver already runs in. Short, since Ray's socket paths live under it.
        temp_dirs.append(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        # Each node its own dashboard-agent port too: on one machine the second node's agent
        # cannot bind the default 52365, dies, and the job server then answers a submission
        # with "No available agent to submit job" whenever it picks that node (measured).
        cmd = cmd + ["--dashboard-agent-listen-port", str(free_port())]
        cmd = cmd + ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(n_cpus), "--num-gpus", "0",
                     "--temp-dir", temp_dirs[-1], "--disable-usage-stats"] + (
                         ["--resources", json.dumps(res)] if res else [])
        log = root / f"{name}.log"
        logs.append(log)
        with log.open("wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env,
                                          start_new_session=True))

    start(["ray", "start", "--head", "--port", str(port), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client)],
          "head", cpus[0], resources[0])
    _wait_nodes(address, env, 1, procs, logs)
    for i, (n_cpus, res) in enumerate(zip(cpus[1:], resources[1:]), 1):
        start(["ray", "start", "--address", address], f"worker-{i}", n_cpus, res)
    nodes = _wait_nodes(address, env, len(cpus), procs, logs)
    head = next(n["node_id"] for n in nodes if n.get("is_head_node"))
    workers = sorted(n["node_id"] for n in nodes if not n.get("is_head_node"))
    ids = {"head": head, **{f"worker-{i}": w for i, w in enumerate(workers, 1)}}
    return RayCluster(address=address, dashboard=f"http://127.0.0.1:{dash}", pid=procs[0].pid,
                      client_env=client_env, node_ids=ids, temp_dirs=list(temp_dirs))


def _wait_nodes(address: str, env: dict[str, str], count: int, procs: list[subprocess.Popen], logs: list[Path],
                timeout: float = 180) -> list[dict[str, Any]]:
    deadline = time.time() + timeout
    while True:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{_tail(log)}")
        nodes = _ray_nodes(address, env)
        if len(nodes) >= count:
            return nodes
        if time.time() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} Ray nodes up after {timeout:.0f} s:\n"
                               + "\n".join(_tail(log) for log in logs))
        time.sleep(1)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """One Ray head for the session (2 CPUs). The dashboard runs because Ray Train's
    placement-group cleaner polls the state API it serves."""
    with ray_nodes(tmp_path_factory.mktemp("ray-head"), cpus=[2]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This test process connected to the session's Ray head as a driver (for tests that use
    gang and board actors directly); disconnected, and its environment restored, afterwards."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    saved = {k: os.environ.get(k) for k in ray_cluster.client_env}
    os.environ.update(ray_cluster.client_env)
    reset_auth_token_state()  # Ray reads the auth mode and token once per process; read them again
    ray.init(address=ray_cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray_cluster
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()
