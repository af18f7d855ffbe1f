"""`sweep submit` / `sweep logs`: a sweep as a Ray job on a cluster's job server.

The job runs `sweep run --address auto` on the cluster. Its runtime environment ships the
spec's folder (so relative model and data paths in the spec resolve the same way there)
and this project's `sweep` and `trials` packages (so the cluster runs the code that planned
the sweep); the cluster's image supplies the libraries. Each submission is remembered on
this machine, so `sweep status NAME` and `sweep logs NAME` can find its job.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.job_submission import JobSubmissionClient

import sweep
import trials
from sweep.errors import LaunchError
from sweep.tracking.layout import is_relative_store, tracking_uri
from sweep.util.secrets import redact_uri, split_credentials
from sweep.util.storage import JsonIndex

# Left out of the shipped folder: earlier local runs and tracking stores.
EXCLUDES = ["runs/", "mlruns/", "mlartifacts/", "mlflow.db", ".git/", "__pycache__/", "*.pyc", ".venv/"]
# The head's home survives jobs; a job's working dir does not.
DEFAULT_STORAGE = "~/peft-sweep/runs"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Submission:
    name: str
    job_id: str
    address: str
    storage: str
    tracking_uri: str
    submitted_at: float


def client(address: str) -> JobSubmissionClient:
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, or a RuntimeError from the version check
        raise LaunchError(f"--address {address}: no Ray job server answers there "
                          f"({str(err).splitlines()[0][:200]}); give the dashboard address, "
                          "e.g. http://HEAD:8265") from None


def _check_tracking_uri(uri: str) -> None:
    """A job's working dir is temporary and other nodes cannot write into it."""
    if is_relative_store(uri):
        raise LaunchError(f"tracking: {uri!r} would live inside the job's temporary working dir; pass "
                          "--tracking-uri with an MLflow server every node can reach (e.g. http://mlflow:5000)")


def entrypoint(spec_rel: str, storage: str, tracking_uri: str | None, forward_env: list[str] = ()) -> str:
    args = ["python", "-m", "sweep", "run", spec_rel, "--address", "auto", "--quiet", "--storage", storage]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    for name in forward_env:  # names only: the job's driver forwards its own values
        args += ["--forward-env", name]
    return " ".join(shlex.quote(a) for a in args)


def submit(spec, spec_path: Path, spec_dir: Path, *, address: str, storage: str | None, cli_uri: str | None,
           working_dir: Path | None, forward_env: list[str] = ()) -> Submission:
    root = Path(working_dir or spec_dir).expanduser().resolve()
    try:
        spec_rel = spec_path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise LaunchError(f"--working-dir {root}: the spec {spec_path} is not inside it; the job ships that "
                          "folder, so it must hold the spec") from None
    # The job runs on the cluster, where only an absolute store or a server means the same
    # thing; the raw value is checked before the one URI rule makes it absolute here.
    raw = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    _check_tracking_uri(raw)
    uri = tracking_uri(cli_uri, spec.tracking.uri, spec_dir)
    if split_credentials(uri)[1]:
        # The entrypoint is shown by the job server to anyone who can list jobs.
        raise LaunchError(f"tracking: {redact_uri(uri)} holds credentials, which the job's command line would "
                          "show; give the cluster MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (README: "
                          "secrets on a cluster) and pass the URI without them")
    jobs = client(address)
    job_id = f"sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runtime_env: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": EXCLUDES,
        "py_modules": [str(Path(sweep.__file__).parent), str(Path(trials.__file__).parent)],
    }
    try:
        jobs.submit_job(entrypoint=entrypoint(spec_rel, storage or DEFAULT_STORAGE, uri, forward_env),
                        submission_id=job_id,
                        runtime_env=runtime_env, metadata={"peft_sweep.name": spec.name})
    except Exception as err:
        raise LaunchError(f"--address {address}: the job server refused the sweep "
                          f"({str(err).splitlines()[0][:300]})") from None
    sub = Submission(spec.name, job_id, address, storage or DEFAULT_STORAGE, uri, time.time())
    remember(sub)
    return sub


# --- this machine's record of submissions -------------------------------------------------


SUBMISSIONS = JsonIndex("submissions.json")  # sweep name -> its latest Submission


def remember(sub: Submission) -> None:
    SUBMISSIONS.put(sub.name, asdict(sub))


def find(name: str) -> Submission | None:
    entry = SUBMISSIONS.get(name)
    return Submission(**entry) if entry else None


def job_status(sub: Submission) -> dict[str, Any]:
    info = client(sub.address).get_job_info(sub.job_id)
    return {"job_id": sub.job_id, "address": sub.address, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message or ""}


def logs(sub: Submission, *, follow: bool, write) -> str:
    """The job's output; with follow, streamed until the job ends. Returns the final status."""
    jobs = client(sub.address)
    if not follow:
        write(jobs.get_job_logs(sub.job_id))
        return str(jobs.get_job_status(sub.job_id).value)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(sub.job_id):
            write(chunk)

    asyncio.run(tail())
    # The log stream closes when the job ends; its status may trail it by a moment.
    for _ in range(50):
        status = str(jobs.get_job_status(sub.job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(0.2)
    return status
