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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
