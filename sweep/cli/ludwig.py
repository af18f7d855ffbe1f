"""`sweep import-ludwig`: a Ludwig LLM config as a peft-sweep spec, written out and planned."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.markup import escape

from sweep.cli.app import app, err, out
from sweep.cli.planning import plan
from sweep.errors import SpecError
from sweep.spec.ludwig import ludwig_to_spec
from trials.data import DEFAULT_EVAL_FRACTION, read_pairs
from trials.errors import TrialError


def _read_config(path: Path) -> object:
    if not path.is_file():
        raise SpecError([f"{path}: file not found"])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}"]) from None


def _counter(train: Path, held_out: bool):
    """Training examples as a trial sees them: the train file, less the held-out eval rows."""

    def count(prompt_field: str, response_field: str) -> int:
        try:
            n = len(read_pairs(train, prompt_field, response_field, "train"))
        except TrialError as e:
            raise SpecError([f"--data-train: {e}"]) from None
        return n - min(n - 1, max(1, round(DEFAULT_EVAL_FRACTION * n))) if held_out else n

    return count


@app.command("import-ludwig")
def import_ludwig(
    config: Path = typer.Argument(..., help="Ludwig config YAML (model_type: llm)."),
    data_train: Path = typer.Option(..., "--data-train", help="Training data, as `ludwig train --dataset`."),
    data_eval: Optional[Path] = typer.Option(None, "--data-eval", help="Eval data (default: hold out 10% of train)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="The spec to write (default: <config stem>.sweep.yaml "
                                                                "beside the config)."),
    seed: int = typer.Option(0, help="Trial seed (Ludwig takes it from `ludwig train --random_seed`)."),
    config_only: bool = typer.Option(False, "--config-only", help="Plan from the model's config.json alone."),
) -> None:
    """Convert a Ludwig LLM config (adapter, trainer, hyperopt) into a sweep spec, write it, and plan it
    as `sweep plan` does; every Ludwig key without an equivalent is a warning line."""
    raw = _read_config(config)
    target = out_path or config.with_name(f"{config.stem}.sweep.yaml")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", config.stem).lstrip("_.-") or "ludwig"
    spec, warnings = ludwig_to_spec(
        raw, train=str(data_train.expanduser().resolve()),
        eval=str(data_eval.expanduser().resolve()) if data_eval else None, name=name, seed=seed,
        count_train=_counter(data_train.expanduser(), held_out=data_eval is None))
    local = Path(spec["model"]["base_model"]).expanduser()
    if local.exists():  # Ludwig resolves a local base_model against the working folder; the spec, against its own
        spec["model"]["base_model"] = str(local.resolve())
    for line in warnings:
        err.print(f"[yellow]warning[/] {escape(line)}", highlight=False, soft_wrap=True)
    header = f"# Imported from the Ludwig config {config} by `sweep import-ludwig`.\n"
    header += "".join(f"# warning: {line}\n" for line in warnings)
    target.write_text(header + yaml.safe_dump(spec, sort_keys=False, default_flow_style=None))
    out.print(f"wrote {escape(str(target))}", highlight=False, soft_wrap=True)
    plan(target, as_json=False, write_trials=None, skip_invalid=False, config_only=config_only)
