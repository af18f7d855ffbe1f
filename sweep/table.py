"""The comparison table: one row per adapter variant (and `--by` value), from measured runs.

`build_rows` is pure: trials in, a Table out, so it can be tested on hand-made trials.
`build_table` adds the reads from MLflow (one search request per 1000 runs; no metric
histories). The renderers turn a Table into markdown shaped like the seed page's table,
CSV, HTML or JSON.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from sweep.lookup import Sweep, TrialRun, load_sweep, load_trials, parse_param
from trials.adapters import FAMILIES
from trials.metrics import METRICS

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Measured columns after the sweep's own metric, in display order.
MEASURED = ("trainable_percent", "eval_loss", "eval_token_accuracy", "s_per_step", "tokens_per_s", "peak_memory_mb", "adapter_bytes")
TITLES = {
    "trainable_params": "Trainable params",
    "trainable_percent": "Trainable (measured)",
    "eval_loss": "Eval loss",
    "eval_token_accuracy": "Token acc.",
    "eval_perplexity": "Perplexity",
    "s_per_step": "s/step",
    "tokens_per_s": "Tokens/s",
    "peak_memory_mb": "Peak mem",
    "adapter_bytes": "Adapter file",
}
# Params that identify a trial rather than configure it: seeds are averaged over, ids differ.
NOT_CONFIG = {"seed", "trial_id"}
ARROWS = {"minimize": "↓", "maximize": "↑", "none": ""}


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    unit: str
    goal: str  # minimize | maximize | none


@dataclass
class Cell:
    """A column's value for a row: the mean over the best config's finished seeds."""

    value: float | None = None
    std: float | None = None  # sample std over seeds; None with fewer than two
    n: int = 0
    values: list[float] = field(default_factory=list)
    best: bool = False


@dataclass
class Row:
    variant: str
    adapter_type: str
    by: dict[str, Any]
    finished: int
    failed: int
    other: int  # running, killed or scheduled: neither a result nor a failure
    cells: dict[str, Cell]
    trainable_params: float | None
    best_config: dict[str, Any]  # hyperparameters that vary (in the row, or outside the adapter across the sweep)
    adapter: dict[str, Any]  # the best config's adapter fields (typed, without the `adapter.` prefix)
    config_runs: list[str]  # run ids of the best config's finished seeds
    best_trial_run: str | None  # the single best finished trial of the row
    best_trial_id: str | None
    best_trial_value: float | None
    approx_extra_params: str
    key_strength: str
    best_for: str

    @property
    def trials(self) -> int:
        return self.finished + self.failed + self.other

    @property
    def label(self) -> str:
        by = " ".join(f"{k.split('.')[-1]}={_plain(v)}" for k, v in self.by.items())
        return f"{self.variant} {by}".strip()


@dataclass
class Table:
    sweep: str
    metric: str
    goal: str
    by: tuple[str, ...]
    columns: list[Column]
    rows: list[Row]
    varying: list[str]  # params that differ between configs anywhere in the sweep
    counts: dict[str, int]
    parent_run_id: str = ""
    experiment: str = ""
    trials: list[TrialRun] = field(default_factory=list, repr=False)

    def column(self, key: str) -> Column:
        return next(c for c in self.columns if c.key == key)

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep,
            "experiment": self.experiment,
            "parent_run_id": self.parent_run_id,
            "metric": {"name": self.metric, "goal": self.goal},
            "by": list(self.by),
            "counts": self.counts,
            "columns": [asdict(c) for c in self.columns],
            "rows": [
                {
                    "variant": r.variant,
                    "adapter_type": r.adapter_type,
                    "by": r.by,
                    "trials": {"finished": r.finished, "failed": r.failed, "other": r.other},
                    "trainable_params": r.trainable_params,
                    "cells": {k: {"value": c.value, "std": c.std, "n": c.n, "best": c.best} for k, c in r.cells.items()},
                    "best_config": r.best_config,
                    "config_runs": r.config_runs,
                    "best_trial": {"run_id": r.best_trial_run, "trial_id": r.best_trial_id, "value": r.best_trial_value},
                    "approx_extra_params": r.approx_extra_params,
                    "key_strength": r.key_strength,
                    "best_for": r.best_for,
                }
                for r in self.rows
            ],
        }


# --- building -------------------------------------------------------------------------


def columns_for(metric: str, goal: str) -> list[Column]:
    """The sweep's metric first (its goal as declared by the spec), then the measured columns,
    each with the direction `trials.metrics.METRICS` declares."""

    def column(key: str, goal_: str | None = None) -> Column:
        known = METRICS.get(key)
        return Column(key, TITLES.get(key, key), known.unit if known else "", goal_ or (known.goal if known else "none"))

    return [column(metric, goal)] + [column(k) for k in MEASURED if k != metric]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _config_key(trial: TrialRun) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in trial.params.items() if k not in NOT_CONFIG))


def _metric_of(trial: TrialRun, metric: str) -> float | None:
    v = trial.metrics.get(metric)
    return None if v is None or math.isnan(v) else v


def _varying(trials: Sequence[TrialRun]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for t in trials:
        for k, v in t.params.items():
            if k not in NOT_CONFIG:
                seen.setdefault(k, set()).add(v)
    return sorted(k for k, values in seen.items() if len(values) > 1)


def best_trial(trials: Iterable[TrialRun], metric: str, goal: str) -> TrialRun | None:
    """The best finished trial by the metric; ties go to fewer trainable params, then trial id."""
    scored = [(t, _metric_of(t, metric)) for t in trials if t.finished]
    scored = [(t, v) for t, v in scored if v is not None]
    if not scored:
        return None
    sign = 1.0 if goal == "minimize" else -1.0
    return min(scored, key=lambda tv: (sign * tv[1], tv[0].metrics.get("trainable_params", math.inf), tv[0].trial_id))[0]


def build_rows(
    trials: Sequence[TrialRun], metric: str, goal: str, by: Sequence[str] = (), *, sweep: str = ""
) -> Table:
    """Group trials into rows and pick each row's best config by its mean metric over seeds.

    Only FINISHED runs contribute numbers; failed and unfinished runs are only counted.
    """
    columns = columns_for(metric, goal)
    varying = _varying(trials)
    groups: dict[tuple, list[TrialRun]] = {}
    for t in trials:
        key = (t.variant, tuple(t.params.get(f, t.tags.get(f)) for f in by))
        groups.setdefault(key, []).append(t)

    sign = 1.0 if goal == "minimize" else -1.0
    rows: list[Row] = []
    for (variant, by_values), members in groups.items():
        done = [t for t in members if t.finished]
        configs: dict[tuple, list[TrialRun]] = {}
        for t in done:
            configs.setdefault(_config_key(t), []).append(t)

        def rank(item: tuple[tuple, list[TrialRun]]) -> tuple:
            key, runs = item
            mean, _ = _mean_std([v for t in runs if (v := _metric_of(t, metric)) is not None])
            params = statistics.fmean([t.metrics.get("trainable_params", math.inf) for t in runs])
            return (mean is None, sign * mean if mean is not None else 0.0, params, key)

        best_key, best_runs = min(configs.items(), key=rank) if configs else ((), [])
        cells: dict[str, Cell] = {}
        for col in columns:
            values = [v for t in best_runs if (v := _metric_of(t, col.key)) is not None]
            mean, std = _mean_std(values)
            cells[col.key] = Cell(mean, std, len(values), values)
        family = FAMILIES.get(members[0].adapter_type)
        top = best_trial(members, metric, goal)
        config = dict(best_key)
        # What tells this row's configs apart, plus sweep-wide choices outside the adapter (e.g. the
        # learning rate); the adapter's own key fields are described by the catalogue instead.
        shown = set(_varying(done)) | {k for k in varying if not k.startswith("adapter.")}
        trainable = [v for t in best_runs if (v := _metric_of(t, "trainable_params")) is not None]
        rows.append(
            Row(
                variant=variant,
                adapter_type=members[0].adapter_type,
                by={f: _typed(v) for f, v in zip(by, by_values)},
                finished=len(done),
                failed=sum(t.failed for t in members),
                other=sum(not t.finished and not t.failed for t in members),
                cells=cells,
                trainable_params=statistics.fmean(trainable) if trainable else None,
                best_config={k: _typed(config[k]) for k in sorted(shown) if k in config},
                adapter={k.removeprefix("adapter."): _typed(v) for k, v in config.items() if k.startswith("adapter.")},
                config_runs=[t.run_id for t in best_runs],
                best_trial_run=top.run_id if top else None,
                best_trial_id=top.trial_id if top else None,
                best_trial_value=_metric_of(top, metric) if top else None,
                approx_extra_params=family.approx_extra_params if family else "",
                key_strength=family.key_strength if family else "",
                best_for=family.best_for if family else "",
            )
        )

    for col in columns:
        if col.goal == "none":
            continue
        present = [r.cells[col.key].value for r in rows if r.cells[col.key].value is not None]
        if not present:
            continue
        top_value = min(present) if col.goal == "minimize" else max(present)
        for r in rows:
            v = r.cells[col.key].value
            r.cells[col.key].best = v is not None and math.isclose(v, top_value, rel_tol=1e-12, abs_tol=0.0)

    metric_key = columns[0].key
    rows.sort(key=lambda r: (r.cells[metric_key].value is None, sign * (r.cells[metric_key].value or 0.0), r.label))
    counts = {
        "trials": len(trials),
        "finished": sum(t.finished for t in trials),
        "failed": sum(t.failed for t in trials),
        "other": sum(not t.finished and not t.failed for t in trials),
    }
    return Table(sweep, metric, goal, tuple(by), columns, rows, varying, counts, trials=list(trials))


def build_table(client: MlflowClient, parent_run_id: str | Sweep, by: Sequence[str] = ()) -> Table:
    """Read a sweep's child runs from MLflow and build its table."""
    sweep = parent_run_id if isinstance(parent_run_id, Sweep) else load_sweep(client, parent_run_id)
    trials = load_trials(client, sweep)
    table = build_rows(trials, sweep.metric, sweep.goal, by, sweep=sweep.name)
    table.parent_run_id = sweep.parent_run_id
    table.experiment = sweep.experiment_name
    return table


# --- formatting -----------------------------------------------------------------------


def _typed(raw: Any) -> Any:
    return parse_param(raw) if isinstance(raw, str) else raw


def _plain(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_value(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if key in ("eval_loss", "eval_loss_before", "train_loss"):
        return f"{v:.4f}"
    if key == "eval_token_accuracy":
        return f"{v:.3f}"
    if key == "eval_perplexity":
        return f"{v:.3f}"
    if key == "s_per_step":
        return f"{v:.3g}"
    if key in ("tokens_per_s", "trainable_params", "total_params"):
        return f"{v:,.0f}"
    if key == "peak_memory_mb":
        return f"{v:,.0f} MiB"
    if key == "adapter_bytes":
        return human_bytes(v)
    if key == "trainable_percent":
        return f"{v:.3g}%"
    return f"{v:.4g}"


def _cell_text(table: Table, row: Row, key: str) -> str:
    cell = row.cells[key]
    if key == "trainable_percent":
        count = format_value("trainable_params", row.trainable_params)
        text = f"{count} ({format_value(key, cell.value)})" if row.trainable_params is not None else format_value(key, cell.value)
    else:
        text = format_value(key, cell.value)
    if key == table.metric and cell.value is not None:
        if cell.std is not None:
            text = f"{text} ± {format_value(key, cell.std).removesuffix('%')}"
        text += f" (n={cell.n})"
    return text


def _trials_text(row: Row) -> str:
    text = f"{row.finished} ok"
    if row.failed:
        text += f" / {row.failed} failed"
    if row.other:
        text += f" / {row.other} unfinished"
    return text


def _describe_adapter(row: Row) -> str | None:
    family = FAMILIES.get(row.adapter_type)
    if family is None or not row.adapter:
        return None
    try:
        fields = family.fields.model_validate({k: v for k, v in row.adapter.items() if v is not None})
    except Exception:  # params from another version of the catalogue: fall back to the raw values
        return None
    return family.describe(fields)


def _hparams_text(row: Row) -> str:
    described = _describe_adapter(row)
    parts = [described] if described else []
    for k, v in row.best_config.items():
        if described is not None and k.startswith("adapter."):
            continue
        parts.append(f"{k.split('.', 1)[-1]}={_plain(v)}")
    return " ".join(parts) or "—"


def _header(col: Column, table: Table) -> str:
    arrow = ARROWS.get(col.goal, "")
    title = f"{col.title} {arrow}".strip()
    if col.key == table.metric:
        title = f"{col.key} {arrow} (best config, mean ± std)".replace("  ", " ")
    return title


def _grid(table: Table, emphasis) -> tuple[list[str], list[list[str]]]:
    headers = ["Adapter", *[f"{f}" for f in table.by], "Extra params (approx.)"]
    headers += [_header(c, table) for c in table.columns]
    headers += ["Trials", "Best hyperparameters", "Key strength", "Best for"]
    body = []
    for r in table.rows:
        line = [r.variant, *[_plain(r.by[f]) for f in table.by], r.approx_extra_params]
        for c in table.columns:
            text = _cell_text(table, r, c.key)
            line.append(emphasis(text) if r.cells[c.key].best else text)
        line += [_trials_text(r), _hparams_text(r), r.key_strength, r.best_for]
        body.append(line)
    return headers, body


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    headers, body = _grid(table, lambda s: f"**{s}**")
    for line in body:
        line[0] = f"`{line[0]}`"
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md_escape(c) if i else c for i, c in enumerate(line)) + " |" for line in body]
    c = table.counts
    directions = "; ".join(
        f"{col.key} {'lower' if col.goal == 'minimize' else 'higher'} is better" for col in table.columns if col.goal != "none"
    )
    notes = [
        "",
        f"Sweep `{table.sweep}`: {c['trials']} trials, {c['finished']} finished, {c['failed']} failed"
        + (f", {c['other']} unfinished" if c["other"] else "")
        + f". Ranked by `{table.metric}` ({table.goal}).",
        "Each row reports its best configuration (best mean over seeds); failed and unfinished trials are counted, never averaged. "
        "Bold: best in its column. " + directions + ".",
        "Extra params (approx.) is the catalogue's typical range; Trainable (measured) is what this sweep's model trained.",
    ]
    return "\n".join(out + notes) + "\n"


def to_html(table: Table) -> str:
    headers, body = _grid(table, lambda s: f"\x00{s}\x01")

    def cell(text: str, tag: str) -> str:
        escaped = html.escape(text).replace("\x00", "<strong>").replace("\x01", "</strong>")
        return f"<{tag}>{escaped}</{tag}>"

    rows = ["<tr>" + "".join(cell(h, "th") for h in headers) + "</tr>"]
    rows += ["<tr>" + "".join(cell(c, "td") for c in line) + "</tr>" for line in body]
    title = html.escape(f"sweep {table.sweep}: ranked by {table.metric} ({table.goal})")
    return f"<table>\n<caption>{title}</caption>\n" + "\n".join(rows) + "\n</table>\n"


def to_csv(table: Table) -> str:
    """One line per row with raw numbers (no units, no marks), for pandas or a spreadsheet."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["variant", *table.by, "finished", "failed", "unfinished", "trainable_params"]
    for c in table.columns:
        head += [c.key, f"{c.key}_std", f"{c.key}_n", f"{c.key}_best"]
    head += ["best_hyperparameters", "best_trial_id", "best_trial_run", "approx_extra_params", "key_strength", "best_for"]
    w.writerow(head)
    for r in table.rows:
        line: list[Any] = [r.variant, *[r.by[f] for f in table.by], r.finished, r.failed, r.other, r.trainable_params]
        for c in table.columns:
            cell = r.cells[c.key]
            line += [cell.value, cell.std, cell.n, cell.best]
        line += [json.dumps(r.best_config, sort_keys=True), r.best_trial_id, r.best_trial_run, r.approx_extra_params, r.key_strength, r.best_for]
        w.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def render(table: Table, fmt: str) -> str:
    if fmt == "md":
        return to_markdown(table)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "html":
        return to_html(table)
    if fmt == "json":
        return json.dumps(table.to_json(), indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


# --- logging back to the sweep --------------------------------------------------------


def log_to_parent(client: MlflowClient, table: Table, plots: Sequence[str] = (), artifact_dir: str = "comparison") -> None:
    """Attach the table (md, csv, json) and plots to the sweep's parent run."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / artifact_dir
        folder.mkdir()
        (folder / "COMPARISON.md").write_text(to_markdown(table))
        (folder / "comparison.csv").write_text(to_csv(table))
        (folder / "comparison.json").write_text(render(table, "json"))
        for plot in plots:
            (folder / Path(plot).name).write_bytes(Path(plot).read_bytes())
        client.log_artifacts(table.parent_run_id, str(folder), artifact_dir)
