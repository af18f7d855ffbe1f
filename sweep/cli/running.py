"""`sweep run`, `resume`, `submit`, `logs` and `status`: a sweep on Ray, here or on a cluster.

Each command imports `sweep.launch` itself: Ray, Tune and Optuna take seconds to import,
and `sweep plan` or `sweep table` should not pay for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from sweep.cli.app import app, err, fail, out
from sweep.cli.planning import load_and_plan
from sweep.errors import LaunchError, StateError


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Sweep spec YAML."),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT. Default: start a local Ray runtime."
    ),
    storage: Optional[str] = typer.Option(
        None, help="Folder or object-store URI the sweep folder <name>/ goes under. Default: <spec folder>/runs."
    ),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else spec.tracking.uri."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One plain line per trial event (for CI logs)."),
    verbose: bool = typer.Option(False, "--verbose", help="Also stream Ray's and the workers' own logs."),
    forward_env: Optional[list[str]] = typer.Option(
        None, "--forward-env", help="Send this environment variable's value to the workers (repeatable), by a path "
                                    "Ray's logs and Tune's state do not keep. Credentials are never sent otherwise."),
) -> None:
    """Plan the spec, then run every trial on Ray Tune (Ray Train + DeepSpeed inside), tracked in MLflow.

    Exit code: 0 when every trial finished, 1 when any trial failed, 2 for a user error
    (nothing launched)."""
    from sweep.launch.driver import run_sweep

    sweep_spec, spec_dir, result = load_and_plan(spec)
    outcome = run_sweep(sweep_spec, spec, spec_dir, result, address=address, storage_root=storage,
                        cli_uri=tracking_uri, quiet=quiet, verbose=verbose, console=out, forward_env=forward_env or [])
    raise typer.Exit(outcome.exit_code)


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="Sweep spec YAML."),
    address: str = typer.Option(..., help="The cluster's job server (Ray dashboard), e.g. http://HEAD:8265."),
    storage: Optional[str] = typer.Option(
        None, help="Where the sweep folder goes, as the cluster sees it (shared path or object-store URI). "
                   "Default: ~/peft-sweep/runs on the head."
    ),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI every node can reach. Default: $MLFLOW_TRACKING_URI, else spec.tracking.uri."
    ),
    working_dir: Optional[Path] = typer.Option(
        None, help="Folder shipped with the job (must hold the spec; relative paths in the spec resolve in it). "
                   "Default: the spec's folder."
    ),
    wait: bool = typer.Option(False, "--wait", help="Stream the job's output until it ends; exit with its outcome."),
    forward_env: Optional[list[str]] = typer.Option(
        None, "--forward-env", help="Have the job's driver send its value of this variable to the workers "
                                    "(repeatable); the value comes from the cluster's environment, never from here."),
) -> None:
    """Plan the spec here, then run it on a Ray cluster as a job (`sweep run --address auto` there).

    Exit code: 0 submitted (with --wait: every trial finished), 1 with --wait when the job
    failed, 2 for a user error (nothing submitted)."""
    from sweep.launch.submit import submit as submit_job

    sweep_spec, spec_dir, _ = load_and_plan(spec)
    sub = submit_job(sweep_spec, spec, spec_dir, address=address, storage=storage, cli_uri=tracking_uri,
                     working_dir=working_dir, forward_env=forward_env or [])
    out.print(f"submitted sweep {sub.name} as job {sub.job_id} to {sub.address}", highlight=False, soft_wrap=True)
    if not wait:
        out.print(f"follow it with `sweep logs {sub.name} --follow`; `sweep status {sub.name}` shows its trials",
                  highlight=False, soft_wrap=True)
        return
    _follow(sub)


def _follow(sub) -> None:
    from sweep.launch.submit import logs as job_logs

    status = job_logs(sub, follow=True, write=lambda text: print(text, end="", flush=True))
    out.print(f"job {sub.job_id}: {status}", highlight=False)
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@app.command()
def logs(
    sweep: str = typer.Argument(..., help="Name of a sweep submitted from this machine."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends; exit with its outcome."),
) -> None:
    """Print the output of a submitted sweep's job."""
    from sweep.launch.submit import find
    from sweep.launch.submit import logs as job_logs

    sub = find(sweep)
    if sub is None:
        fail([f"no submitted sweep named {sweep!r} on this machine (`sweep submit` records them); "
              "for a sweep run here, its output was the terminal's"])
    if follow:
        _follow(sub)
    job_logs(sub, follow=False, write=lambda text: print(text, end="", flush=True))


@app.command()
def resume(
    sweep: str = typer.Argument(..., help="Sweep name, sweep folder, or its spec file."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to resume on. Default: the one the sweep started on."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also run failed trials again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One plain line per trial event (for CI logs)."),
    verbose: bool = typer.Option(False, "--verbose", help="Also stream Ray's and the workers' own logs."),
    budget_max_trials: Optional[int] = typer.Option(None, "--budget-max-trials", min=1,
                                                    help="A new budget.max_trials for the rest of the sweep."),
    budget_max_device_hours: Optional[float] = typer.Option(None, "--budget-max-device-hours", min=0.0,
                                                            help="A new budget.max_device_hours (the whole sweep's)."),
    budget_max_wall_hours: Optional[float] = typer.Option(None, "--budget-max-wall-hours", min=0.0,
                                                          help="A new budget.max_wall_hours (the whole sweep's)."),
) -> None:
    """Continue an interrupted sweep, or one a budget stopped: finished trials are kept,
    interrupted and budget-skipped ones run."""
    from sweep.launch.driver import resume_sweep

    budget = {k: v for k, v in (("max_trials", budget_max_trials), ("max_device_hours", budget_max_device_hours),
                                ("max_wall_hours", budget_max_wall_hours)) if v is not None}
    outcome = resume_sweep(sweep, address=address, quiet=quiet, verbose=verbose, retry_failed=retry_failed,
                           console=out, budget=budget or None)
    raise typer.Exit(outcome.exit_code)


@app.command()
def status(
    sweep: str = typer.Argument(..., help="Sweep name, sweep folder, or its spec file."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show a sweep's trials and their states (from Ray Tune's experiment state and MLflow)."""
    from sweep.launch.status import sweep_status
    from sweep.launch.submit import find, job_status

    sub = find(sweep)
    job = None
    if sub is not None:
        try:
            job = job_status(sub)
        except LaunchError as e:
            job = {"job_id": sub.job_id, "address": sub.address, "status": "UNKNOWN", "message": str(e)}
    report, problem = None, None
    # A submitted sweep's folder is readable here when its --storage is shared with this machine.
    places = [f"{sub.storage.rstrip('/')}/{sub.name}"] if sub and not sub.storage.startswith("~") else []
    for place in places + [sweep]:
        try:
            report = sweep_status(place)
            break
        except StateError as e:
            problem = problem or e
    if report is None and job is None:
        fail(problem.lines)
    if as_json:
        print(json.dumps({**(report or {}), **({"job": job} if job else {})}, indent=2, default=str))
        return
    if job is not None:
        out.print(f"job {job['job_id']} on {job['address']}: {job['status']}"
                  + (f" ({job['message']})" if job["message"] else ""), highlight=False, soft_wrap=True)
    if report is None:
        out.print("its trials show here once the sweep folder is readable from this machine (a shared --storage)",
                  highlight=False, soft_wrap=True)
        return
    st = report["sweep"]
    out.print(f"sweep {st['name']} ({st['status']}): {st['storage']}", highlight=False, soft_wrap=True)
    out.print(f"mlflow: {st['tracking_uri']} parent run {st['parent_run_id']} ({report.get('parent_status', '?')})",
              highlight=False, soft_wrap=True)
    if st.get("waiting"):
        out.print(f"[yellow]{escape(st['waiting'])}[/]", highlight=False, soft_wrap=True)
    if report.get("warning"):
        err.print(f"[yellow]warning[/] {escape(report['warning'])}", highlight=False, soft_wrap=True)
    table = Table(title=f"{len(report['trials'])} trials")
    for col in ("trial", "adapter", "tune", "mlflow", "step", report["metric"], "run id"):
        table.add_column(col, justify="right" if col in ("step", report["metric"]) else "left")
    for t in report["trials"]:
        value = t.get("metric")
        table.add_row(t["trial_id"], t.get("variant") or "", t.get("tune") or "-", t.get("mlflow") or "-",
                      "" if t.get("step") is None else str(t["step"]),
                      "-" if value is None else f"{value:.4g}", t.get("run_id") or "")
    out.print(table)
    for t in report["trials"]:
        if t.get("error"):
            out.print(f"[red]failed[/] {t['trial_id']}: {escape(t['error'])}", highlight=False, soft_wrap=True)
