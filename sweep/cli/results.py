"""`sweep table`, `sweep export` and `sweep ui`: reading a sweep's MLflow runs back.

Each command imports the results and tracking code itself: MLflow and matplotlib take
seconds to import, and `sweep plan` should not pay for them."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from sweep.cli.app import app, err, fail, out
from sweep.errors import SweepLookupError
from sweep.util.net import port_free

TABLE_FORMATS = ("md", "csv", "html", "json", "peft-mc")
_NAME_HELP = "Sweep name or spec path (default: the latest sweep in the store)."
_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the spec's tracking.uri)."


def _open_sweep(name: Optional[str], tracking_uri: Optional[str], experiment: Optional[str] = None):
    from sweep.tracking.reader import open_sweep

    # Per-download progress bars would interleave with the table on the terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if name is not None and tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_uri, experiment = _indexed_store(name, experiment)
    try:
        return open_sweep(name, tracking_uri, experiment)
    except SweepLookupError as err:
        from sweep.launch import state

        known = sorted(state.INDEX.read())
        if known and name is not None:
            err.lines.append(f"sweeps this machine ran or submitted: {', '.join(known)}")
        raise


def _indexed_store(name: str, experiment: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """A sweep name this machine ran or submitted: its own tracking URI and experiment, from
    the sweep's state (found through the same index `sweep status` and `resume` use), so the
    commands work from any folder. A spec path or an unknown name resolves as before."""
    from sweep.errors import StateError
    from sweep.launch import state

    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return None, experiment
    try:
        st = state.load(state.locate(name))
    except (StateError, OSError, ValueError):
        return None, experiment
    return st.tracking_uri, experiment or None


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
    importance: bool = typer.Option(False, "--importance", help="Also rank the swept fields by how much they explain "
                                                                  "the metric (Optuna's fANOVA over the finished trials)."),
) -> None:
    """The comparison table of a sweep's measured runs, one row per adapter variant, with
    95% intervals and paired tests against the best row."""
    from sweep.results.peft_mc import write_results
    from sweep.results.plots import make_plots
    from sweep.results.render import log_to_parent, render
    from sweep.results.table import build_table, by_problems
    from sweep.tracking.reader import require_trials

    if fmt not in TABLE_FORMATS:
        fail([f"--format {fmt}: use one of {', '.join(TABLE_FORMATS)}"])
    if fmt == "peft-mc" and out_path is None:
        fail(["--format peft-mc writes one JSON per trial: give a folder with --out DIR"])
    client, sweep = _open_sweep(name, tracking_uri, experiment)
    table = build_table(client, sweep, by or [])
    require_trials(table.trials, sweep)
    problems = by_problems(by or [], table.trials)
    if problems:
        fail(problems)

    ranked = None
    if importance:
        from sweep.results.importance import importance_text, parameter_importance

        ranked = parameter_importance(table.trials, sweep.metric, sweep.goal)
    if fmt == "peft-mc":
        paths = write_results(client, table, out_path)
        err.print(f"wrote {len(paths)} PEFT method_comparison results to {out_path}", highlight=False)
    else:
        text = render(table, fmt)
        if ranked is not None and fmt == "json":
            text = json.dumps({**json.loads(text), "importance": ranked.to_json()}, indent=2) + "\n"
        elif ranked is not None and fmt == "md":
            text += "\n" + importance_text(ranked) + "\n"
        elif ranked is not None:
            err.print(importance_text(ranked), highlight=False, markup=False)
        if out_path is None:
            sys.stdout.write(text)
        else:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(text)
            err.print(f"wrote {out_path}", highlight=False)

    made = []
    with tempfile.TemporaryDirectory() as tmp:
        if plots is not None or log:
            made = make_plots(client, table, plots if plots is not None else tmp)
            if ranked is not None:
                from sweep.results.importance import plot_importance

                chart = plot_importance(ranked, Path(plots if plots is not None else tmp) / "importance.png")
                made += [chart] if chart is not None else []
            if plots is not None:
                for p in made:
                    err.print(f"wrote {p}", highlight=False)
        if log:
            try:
                log_to_parent(client, table, made)
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
    by: Optional[list[str]] = typer.Option(None, "--by", help="Compare the choice with rows split by this param too, "
                                                              "as `sweep table --by` (repeatable)."),
) -> None:
    """Export the best finished trial: best.yaml (Ludwig), adapter/ (PEFT), trial.json, spec.yaml."""
    from sweep.results.export import export_best

    client, sweep = _open_sweep(name, tracking_uri, experiment)
    target = out_dir if out_dir is not None else Path(f"{sweep.name}-best")
    results, picked = export_best(client, sweep, target, by_variant=by_variant, by=by or [])
    for r in results:
        out.print(
            f"{r.trial.variant}: trial {r.trial.trial_id} ({sweep.metric} {r.value:.6g}) -> {r.out_dir}/ "
            f"[{', '.join(p.name for p in r.files)}]",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    top = next(r for r in results if r.trial.trial_id == picked["chosen"]["trial_id"])
    tied = picked["tied_with_chosen"]
    if tied:
        names = ", ".join(f"{t['row']} ({t['best_trial_id']}, p={t['p_vs_best']:.2g})" for t in tied)
        out.print(f"{top.trial.trial_id} is the best, but statistically tied with: {names}", highlight=False,
                  markup=False, soft_wrap=True)
    elif picked["test"]["tested_rows"]:
        out.print(f"{top.trial.trial_id} is the best; every other row is worse on the eval items (paired test, "
                  f"Holm-corrected, p < {picked['test']['alpha']})", highlight=False, markup=False, soft_wrap=True)
    unsettled = picked["unsettled_by_seeds"]
    if unsettled:
        names = ", ".join(f"{t['row']} (seeds p={t['p_seeds']:.2g})" for t in unsettled)
        out.print(f"but the seeds do not settle it against: {names}; more seeds would", highlight=False,
                  markup=False, soft_wrap=True)
    out.print(f"selection: {top.out_dir / 'selection.json'}", highlight=False, markup=False)
    out.print(f"re-run the best with: sweep run {top.out_dir / 'spec.yaml'}", highlight=False, markup=False)


@app.command("ui")
def ui_cmd(
    name: Optional[str] = typer.Argument(None, help="Sweep name or spec path; its experiment and parent run are linked."),
    port: int = typer.Option(5000, "--port", help="Port on 127.0.0.1."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=_URI_HELP),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment holding the sweep."),
) -> None:
    """Serve the MLflow dashboard for the sweep's store on 127.0.0.1 (Ctrl-C stops it)."""
    from sweep.results import ui
    from sweep.tracking import layout, views
    from sweep.tracking.reader import find_sweep

    sweep = None
    if name is not None:
        _, sweep = _open_sweep(name, tracking_uri, experiment)
        uri = sweep.tracking_uri
    else:
        uri, _ = layout.use_credentials(layout.tracking_uri(tracking_uri))
        layout.check_store(uri)
        try:
            sweep = find_sweep(layout.client(uri), uri, None, experiment)
        except SweepLookupError:
            sweep = None  # an empty store still has a dashboard worth opening

    view = None
    if sweep is not None:  # sweeps recorded before views existed get theirs now
        view = views.ensure_trials_view(layout.client(uri), sweep.experiment_id, sweep.parent_run_id, sweep.name,
                                        sweep.metric, sweep.goal)

    def links(base: str) -> None:
        print(f"MLflow UI: {base}", flush=True)
        if sweep is not None:
            print(f"experiment {sweep.experiment_name}: {ui.experiment_url(base, sweep.experiment_id)}", flush=True)
            print(f"sweep {sweep.name} (parent run): {ui.experiment_url(base, sweep.experiment_id, sweep.parent_run_id)}", flush=True)
            print(f"trials of {sweep.name} by {sweep.metric}: {views.trials_url(base, sweep.experiment_id, view)}",
                  flush=True)

    if layout.is_server(uri):
        # The store is already an MLflow server, which serves the same dashboard.
        links(uri.rstrip("/"))
        return
    if not port_free(port):
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
