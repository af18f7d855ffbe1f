"""The `sweep` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sweep.spec import SpecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sweep PEFT adapters as DeepSpeed trials on Ray Tune, tracked in MLflow.",
)
# Wide when piped (CI logs, files): rich would otherwise wrap tables at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EXIT_USER_ERROR = 2


def fail(lines: list[str]) -> None:
    """Report user mistakes one per line and exit 2: nothing has been launched."""
    for line in lines:
        err.print(f"[bold red]error[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Sweep spec YAML."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    write_trials: Optional[Path] = typer.Option(None, help="Write every trial as DIR/<trial_id>.json."),
    skip_invalid: bool = typer.Option(False, help="Drop invalid trials (with their reason) instead of failing."),
) -> None:
    """Expand the spec, check every trial against the model's real module shapes, launch nothing."""
    from sweep.plan import make_plan
    from sweep.spec import load_spec
    from trials.adapters import FAMILIES

    try:
        sweep_spec, spec_dir = load_spec(spec)
        result = make_plan(sweep_spec, spec_dir)
    except SpecError as e:
        fail(e.lines)
    if result.rejected and not skip_invalid:
        fail([f"{r.where}: {line}" for r in result.rejected for line in r.lines])
    for r in result.rejected:
        err.print(f"[yellow]skipped[/] {escape(r.where)}: {escape('; '.join(r.lines))}", highlight=False, soft_wrap=True)
    if write_trials is not None:
        write_trials.mkdir(parents=True, exist_ok=True)
        for t in result.trials:
            t.trial.dump(write_trials / f"{t.trial.trial_id}.json")
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    table = Table(title=f"sweep {sweep_spec.name}: {len(result.trials)} trials on {sweep_spec.model.base_model}")
    for col in ("trial", "adapter", "key params", "lr", "seed", "trainable", "% of base"):
        table.add_column(col, justify="right" if col in ("lr", "seed", "trainable", "% of base") else "left")
    for t in result.trials:
        table.add_row(
            t.trial.trial_id,
            FAMILIES[t.trial.adapter.type].variant(t.trial.adapter),
            FAMILIES[t.trial.adapter.type].describe(t.trial.adapter),
            f"{t.trial.trainer.learning_rate:g}",
            str(t.trial.seed),
            f"{t.trainable:,}",
            f"{t.percent:.4f}",
        )
    out.print(table)
    if sweep_spec.search.strategy == "optuna":
        out.print(f"optuna samples {sweep_spec.search.num_samples} trials from {len(result.candidates)} adapter configurations while running")
    out.print(f"base model parameters: {result.base_params:,}")
    for t in result.trials:
        for w in t.warnings:
            out.print(f"[yellow]warning[/] {t.trial.trial_id}: {escape(w)}", highlight=False, soft_wrap=True)
    if write_trials is not None:
        out.print(f"wrote {len(result.trials)} trial files to {write_trials}")


@app.command()
def schema() -> None:
    """Print the JSON schema of the sweep spec."""
    from sweep.spec import SweepSpec

    print(json.dumps(SweepSpec.model_json_schema(), indent=2))


TABLE_FORMATS = ("md", "csv", "html", "json", "peft-mc")
_NAME_HELP = "Sweep name or spec path (default: the latest sweep in the store)."
_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the spec's tracking.uri)."


def _open_sweep(name: Optional[str], tracking_uri: Optional[str], experiment: Optional[str] = None):
    import os

    from sweep.lookup import SweepLookupError, open_sweep

    # Per-download progress bars would interleave with the table on the terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return open_sweep(name, tracking_uri, experiment)
    except SweepLookupError as e:
        fail(e.lines)


def _check_by(fields: list[str], trials) -> None:
    import difflib

    known = {k for t in trials for k in (*t.params, *t.tags)}
    problems = []
    for f in fields:
        if f not in known:
            close = difflib.get_close_matches(f, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "use a trial param such as adapter.r or trainer.learning_rate"
            problems.append(f"--by {f}: no trial has this param or tag ({hint})")
    if problems:
        fail(problems)


@app.command("table")
def table_cmd(
    name: Optional[str] = typer.Argument(None, help=_NAME_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=_URI_HELP),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment holding the sweep."),
    fmt: str = typer.Option("md", "--format", help="md | csv | html | json | peft-mc (one PEFT method_comparison JSON per trial)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Write to this file (a folder for peft-mc) instead of stdout."),
    by: Optional[list[str]] = typer.Option(None, "--by", help="Also split rows by this param (repeatable), e.g. --by adapter.r."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots (eval-loss curves, Pareto chart) into this folder."),
    log: bool = typer.Option(True, "--log/--no-log", help="Attach the table and plots to the sweep's parent run."),
) -> None:
    """The comparison table of a sweep's measured runs, one row per adapter variant."""
    import tempfile

    from sweep.lookup import SweepLookupError, require_trials
    from sweep.table import build_table, log_to_parent, render

    if fmt not in TABLE_FORMATS:
        fail([f"--format {fmt}: use one of {', '.join(TABLE_FORMATS)}"])
    if fmt == "peft-mc" and out_path is None:
        fail(["--format peft-mc writes one JSON per trial: give a folder with --out DIR"])
    client, sweep = _open_sweep(name, tracking_uri, experiment)
    try:
        table = build_table(client, sweep, by or [])
        require_trials(table.trials, sweep)
    except SweepLookupError as e:
        fail(e.lines)
    _check_by(by or [], table.trials)

    if fmt == "peft-mc":
        from sweep.peft_mc import write_results

        paths = write_results(client, table, out_path)
        err.print(f"wrote {len(paths)} PEFT method_comparison results to {out_path}", highlight=False)
    else:
        text = render(table, fmt)
        if out_path is None:
            sys.stdout.write(text)
        else:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(text)
            err.print(f"wrote {out_path}", highlight=False)

    made = []
    with tempfile.TemporaryDirectory() as tmp:
        if plots is not None or log:
            from sweep.plots import make_plots

            made = make_plots(client, table, plots if plots is not None else tmp)
            if plots is not None:
                for p in made:
                    err.print(f"wrote {p}", highlight=False)
        if log:
            try:
                log_to_parent(client, table, [str(p) for p in made])
            except Exception as e:  # the table is already out; a read-only store must not turn it into a failure
                err.print(f"[yellow]warning[/] could not attach the table to run {sweep.parent_run_id}: {escape(str(e))}")
            else:
                err.print(f"attached the table and {len(made)} plots to run {sweep.parent_run_id} (artifacts: comparison/)", highlight=False)
    c = table.counts
    err.print(f"sweep {sweep.name}: {c['trials']} trials ({c['finished']} finished, {c['failed']} failed), {len(table.rows)} rows", highlight=False)


@app.command("export")
def export_cmd(
    name: Optional[str] = typer.Argument(None, help=_NAME_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=_URI_HELP),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment holding the sweep."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./<sweep>-best)."),
    by_variant: bool = typer.Option(False, "--by-variant", help="Export the best trial of every variant, one subfolder each."),
) -> None:
    """Export the best finished trial: best.yaml (Ludwig), adapter/ (PEFT), trial.json, spec.yaml."""
    from sweep.export import export_best
    from sweep.lookup import SweepLookupError
    from sweep.table import best_trial

    client, sweep = _open_sweep(name, tracking_uri, experiment)
    target = out_dir if out_dir is not None else Path(f"{sweep.name}-best")
    try:
        results = export_best(client, sweep, target, by_variant=by_variant)
    except SweepLookupError as e:
        fail(e.lines)
    for r in results:
        out.print(
            f"{r.trial.variant}: trial {r.trial.trial_id} ({sweep.metric} {r.value:.6g}) -> {r.out_dir}/ "
            f"[{', '.join(p.name for p in r.files)}]",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    best = best_trial([r.trial for r in results], sweep.metric, sweep.goal)
    top = next(r for r in results if r.trial is best)
    out.print(f"re-run the best with: sweep run {top.out_dir / 'spec.yaml'}", highlight=False, markup=False)


@app.command("ui")
def ui_cmd(
    name: Optional[str] = typer.Argument(None, help="Sweep name or spec path; its experiment and parent run are linked."),
    port: int = typer.Option(5000, "--port", help="Port on 127.0.0.1."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=_URI_HELP),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment holding the sweep."),
) -> None:
    """Serve the MLflow dashboard for the sweep's store on 127.0.0.1 (Ctrl-C stops it)."""
    import signal
    import tempfile

    from sweep import ui
    from sweep.lookup import SweepLookupError, check_store, find_sweep, make_client, pick_tracking_uri

    sweep = None
    if name is not None:
        _, sweep = _open_sweep(name, tracking_uri, experiment)
        uri = sweep.tracking_uri
    else:
        uri = pick_tracking_uri(tracking_uri)
        try:
            check_store(uri)
        except SweepLookupError as e:
            fail(e.lines)
        try:
            sweep = find_sweep(make_client(uri), uri, None, experiment)
        except SweepLookupError:
            sweep = None  # an empty store still has a dashboard worth opening

    def links(base: str) -> None:
        print(f"MLflow UI: {base}", flush=True)
        if sweep is not None:
            print(f"experiment {sweep.experiment_name}: {ui.experiment_url(base, sweep.experiment_id)}", flush=True)
            print(f"sweep {sweep.name} (parent run): {ui.experiment_url(base, sweep.experiment_id, sweep.parent_run_id)}", flush=True)

    if uri.startswith(("http://", "https://")):
        # The store is already an MLflow server, which serves the same dashboard.
        links(uri.rstrip("/"))
        return
    if not ui.port_free(port):
        fail([f"--port {port}: 127.0.0.1:{port} is already in use; pass another --port"])
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "mlflow-ui.log"
        proc = ui.start_ui(uri, port, log_path=log_path)
        base = ui.base_url(port)

        def on_term(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            if not ui.wait_serving(base, proc):
                tail = log_path.read_text(errors="replace").strip().splitlines()[-8:] if log_path.exists() else []
                ui.stop(proc)
                fail([f"mlflow ui for {uri} did not start on {base}", *tail])
            links(base)
            print(f"serving {uri} (pid {proc.pid}); Ctrl-C to stop", flush=True)
            rc = proc.wait()
            if rc:
                fail([f"mlflow ui exited with status {rc}"])
        except KeyboardInterrupt:
            pass
        finally:
            ui.stop(proc)
            signal.signal(signal.SIGTERM, previous)


def _load_and_plan(spec: Path):
    """Parse and plan the spec; any user mistake exits 2 before anything is launched."""
    from sweep.plan import make_plan
    from sweep.spec import load_spec

    try:
        sweep_spec, spec_dir = load_spec(spec)
        result = make_plan(sweep_spec, spec_dir)
    except SpecError as e:
        fail(e.lines)
    if result.rejected:
        fail([f"{r.where}: {line}" for r in result.rejected for line in r.lines]
             + ["(run `sweep plan` to see every trial; nothing was launched)"])
    if not result.trials and sweep_spec.search.strategy != "optuna":
        fail(["search: the spec has no trials to run"])
    return sweep_spec, spec_dir, result


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
) -> None:
    """Plan the spec, then run every trial on Ray Tune (Ray Train + DeepSpeed inside), tracked in MLflow.

    Exit code: 0 when every trial finished, 1 when any trial failed, 2 for a user error
    (nothing launched)."""
    from sweep.launch import run_sweep

    sweep_spec, spec_dir, result = _load_and_plan(spec)
    _finish(lambda: run_sweep(sweep_spec, spec, spec_dir, result, address=address, storage_root=storage,
                              tracking_uri=tracking_uri, quiet=quiet, verbose=verbose, console=out))


def _finish(launch) -> None:
    """Run a sweep launch and exit with its code; launch and state errors are user errors (exit 2)."""
    from sweep.launch import LaunchError
    from sweep.state import StateError

    try:
        outcome = launch()
    except (StateError, LaunchError) as e:
        fail([str(e)])
    except SpecError as e:
        fail(e.lines)
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
) -> None:
    """Plan the spec here, then run it on a Ray cluster as a job (`sweep run --address auto` there).

    Exit code: 0 submitted (with --wait: every trial finished), 1 with --wait when the job
    failed, 2 for a user error (nothing submitted)."""
    from sweep.launch import LaunchError
    from sweep.submit import submit as submit_job

    sweep_spec, spec_dir, _ = _load_and_plan(spec)
    try:
        sub = submit_job(sweep_spec, spec, spec_dir, address=address, storage=storage, tracking_uri=tracking_uri,
                         working_dir=working_dir)
    except LaunchError as e:
        fail([str(e)])
    out.print(f"submitted sweep {sub.name} as job {sub.job_id} to {sub.address}", highlight=False, soft_wrap=True)
    if not wait:
        out.print(f"follow it with `sweep logs {sub.name} --follow`; `sweep status {sub.name}` shows its trials",
                  highlight=False, soft_wrap=True)
        return
    _follow(sub)


def _follow(sub) -> None:
    from sweep.submit import logs as job_logs

    status = job_logs(sub, follow=True, write=lambda text: print(text, end="", flush=True))
    out.print(f"job {sub.job_id}: {status}", highlight=False)
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@app.command()
def logs(
    sweep: str = typer.Argument(..., help="Name of a sweep submitted from this machine."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends; exit with its outcome."),
) -> None:
    """Print the output of a submitted sweep's job."""
    from sweep.launch import LaunchError
    from sweep.submit import find
    from sweep.submit import logs as job_logs

    sub = find(sweep)
    if sub is None:
        fail([f"no submitted sweep named {sweep!r} on this machine (`sweep submit` records them); "
              "for a sweep run here, its output was the terminal's"])
    try:
        if follow:
            _follow(sub)
        job_logs(sub, follow=False, write=lambda text: print(text, end="", flush=True))
    except LaunchError as e:
        fail([str(e)])


@app.command()
def resume(
    sweep: str = typer.Argument(..., help="Sweep name, sweep folder, or its spec file."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to resume on. Default: the one the sweep started on."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also run failed trials again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One plain line per trial event (for CI logs)."),
    verbose: bool = typer.Option(False, "--verbose", help="Also stream Ray's and the workers' own logs."),
) -> None:
    """Continue an interrupted sweep: finished trials are kept, interrupted ones run again."""
    from sweep.launch import resume_sweep

    _finish(lambda: resume_sweep(sweep, address=address, quiet=quiet, verbose=verbose, retry_failed=retry_failed,
                                 console=out))


@app.command()
def status(
    sweep: str = typer.Argument(..., help="Sweep name, sweep folder, or its spec file."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show a sweep's trials and their states (from Ray Tune's experiment state and MLflow)."""
    from sweep.launch import LaunchError
    from sweep.state import StateError
    from sweep.status import sweep_status
    from sweep.submit import find, job_status

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
        fail([str(problem)])
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
