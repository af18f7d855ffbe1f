"""`sweep plan` and `sweep schema`: the spec checked, nothing launched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from sweep.cli.app import app, err, fail, out
from sweep.spec import SweepSpec, load_spec, make_plan
from trials.adapters import FAMILIES


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Sweep spec YAML."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    write_trials: Optional[Path] = typer.Option(None, help="Write every trial as DIR/<trial_id>.json."),
    skip_invalid: bool = typer.Option(False, help="Drop invalid trials (with their reason) instead of failing."),
    config_only: bool = typer.Option(False, "--config-only", help="Check shapes from the model's config.json alone "
                                                                    "(no weight files needed; `sweep run` needs them)."),
) -> None:
    """Expand the spec, check every trial against the model's real module shapes and every data
    file once, launch nothing."""
    sweep_spec, spec_dir = load_spec(spec)
    result = make_plan(sweep_spec, spec_dir, config_only=config_only)
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
    numeric = ("lr", "seed", "trainable", "% of base", "est. mem/worker", "device-h")
    for col in ("trial", "adapter", "key params", *numeric):
        table.add_column(col, justify="right" if col in numeric else "left")
    for t in result.trials:
        table.add_row(
            t.trial.trial_id,
            FAMILIES[t.trial.adapter.type].variant(t.trial.adapter),
            FAMILIES[t.trial.adapter.type].describe(t.trial.adapter),
            f"{t.trial.trainer.learning_rate:g}",
            str(t.trial.seed),
            f"{t.trainable:,}",
            f"{t.percent:.4f}",
            _memory_text(t.estimate),
            "—" if t.estimate is None or t.estimate.device_hours is None else f"{t.estimate.device_hours:.3g}",
        )
    out.print(table)
    if sweep_spec.search.strategy == "optuna":
        out.print(f"optuna samples {sweep_spec.search.num_samples} trials from {len(result.candidates)} adapter configurations while running")
    out.print(f"base model parameters: {result.base_params:,}")
    totals = result.totals()
    if totals["tokens"]:
        hours = totals["device_hours"]
        out.print(f"estimate: {totals['tokens']:,} trained tokens; "
                  + (f"{hours:.3g} GPU-hours at {sweep_spec.resources.gpu_peak_tflops:g} TFLOPS peak x "
                     f"{sweep_spec.resources.assumed_mfu:.0%} MFU" if hours is not None else "CPU workers (no GPU-hours)")
                  + (f"; {totals['trials_that_do_not_fit']} trials do not fit in "
                     f"{sweep_spec.resources.gpu_memory_gb:g} GB" if totals["trials_that_do_not_fit"] else ""),
                  highlight=False, soft_wrap=True)
    for r in result.data:
        tokens = "" if r.tokens is None else (
            f", {r.tokens:,} tokens, {r.truncated_share:.1%} truncated at max_length={sweep_spec.data.max_length}"
            + (f", {r.dropped} dropped (no response left)" if r.dropped else ""))
        out.print(f"data.{r.role}: {r.examples:,} {'documents' if r.role == 'forgetting' else 'examples'}{tokens} "
                  f"({escape(r.path)})", highlight=False, soft_wrap=True)
    for t in result.trials:
        for w in t.warnings:
            out.print(f"[yellow]warning[/] {t.trial.trial_id}: {escape(w)}", highlight=False, soft_wrap=True)
    if write_trials is not None:
        out.print(f"wrote {len(result.trials)} trial files to {write_trials}")


def _memory_text(est) -> str:
    if est is None:
        return "—"
    text = f"{est.peak_memory_mb / 1024:.1f} GiB" if est.peak_memory_mb >= 1024 else f"{est.peak_memory_mb:.0f} MiB"
    return text + (" (does not fit)" if est.fits is False else "")


@app.command()
def schema() -> None:
    """Print the JSON schema of the sweep spec."""
    print(json.dumps(SweepSpec.model_json_schema(), indent=2))


def load_and_plan(spec: Path):
    """Parse and plan the spec; any user mistake exits 2 before anything is launched."""
    sweep_spec, spec_dir = load_spec(spec)
    result = make_plan(sweep_spec, spec_dir)
    if result.rejected:
        fail([f"{r.where}: {line}" for r in result.rejected for line in r.lines]
             + ["(run `sweep plan` to see every trial; nothing was launched)"])
    if not result.trials and sweep_spec.search.strategy != "optuna":
        fail(["search: the spec has no trials to run"])
    return sweep_spec, spec_dir, result
