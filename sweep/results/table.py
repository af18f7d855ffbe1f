"""The comparison table: one row per adapter variant (and `--by` value), from measured runs.

`build_rows` is pure: trials in, a Table out, so it can be tested on hand-made trials.
`build_table` adds the reads from MLflow (one search request per 1000 runs; no metric
histories). `sweep.results.render` turns a Table into markdown, CSV, HTML or JSON.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sweep.tracking.layout import PREDICTIONS_FILE
from sweep.tracking.reader import (
    NOT_CONFIG,
    Sweep,
    TrialRun,
    best_trial,
    load_sweep,
    load_trials,
    metric_value,
    parse_param,
    rank_configs,
    read_jsonl,
)
from trials.adapters import FAMILIES
from trials.metrics import METRICS

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Measured columns after the sweep's own metric, in display order.
MEASURED = ("trainable_percent", "eval_loss", "eval_token_accuracy", "s_per_step", "tokens_per_s", "peak_memory_mb",
            "adapter_bytes", "device_hours")
# The sweep's metric per device-hour of the trial: what a unit of compute buys (for a metric
# to maximize; a loss per device-hour means nothing).
PER_DEVICE_HOUR = "per_device_hour"
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
    "device_hours": "Device-h",
}
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
    stats: Any = None  # sweep.results.significance.RowStats, once annotated

    @property
    def trials(self) -> int:
        return self.finished + self.failed + self.other

    @property
    def label(self) -> str:
        by = " ".join(f"{k.split('.')[-1]}={plain(v)}" for k, v in self.by.items())
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
    best_trial_id: str | None = None  # the single best finished trial (the one export writes)
    significance: dict[str, Any] = field(default_factory=dict)  # how rows were compared with the best

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
            "best_trial_id": self.best_trial_id,
            "significance": self.significance,
            "columns": [asdict(c) for c in self.columns],
            "rows": [
                {
                    "variant": r.variant,
                    "adapter_type": r.adapter_type,
                    "by": r.by,
                    "trials": {"finished": r.finished, "failed": r.failed, "other": r.other},
                    # The ranking metric: mean over seeds, its interval, and the test against the best row.
                    **(r.stats.to_json() if r.stats is not None else {}),
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


def columns_for(metric: str, goal: str, beside: Sequence[str] = ()) -> list[Column]:
    """The sweep's metric first (its goal as declared by the spec), then what is reported beside
    it (its test-split twin, forgetting), then the measured columns, each with the direction
    `trials.metrics.METRICS` declares."""

    def column(key: str, goal_: str | None = None) -> Column:
        known = METRICS.get(key)
        return Column(key, TITLES.get(key, key), known.unit if known else "", goal_ or (known.goal if known else "none"))

    cost = [Column(PER_DEVICE_HOUR, f"{metric}/device-h", "1/device-h", "maximize")] if goal == "maximize" else []
    return [column(metric, goal)] + [column(k) for k in beside] + [
        column(k) for k in MEASURED if k != metric and k not in beside] + cost


def cell_value(trial: TrialRun, key: str, metric: str) -> float | None:
    """A run's value for a column: a metric, or the sweep's metric per device-hour."""
    if key == PER_DEVICE_HOUR:
        value, hours = metric_value(trial, metric), metric_value(trial, "device_hours")
        return value / hours if value is not None and hours else None
    return metric_value(trial, key)


def test_twin(metric: str) -> str | None:
    """The test-split counterpart of an eval metric (eval_exact_match -> test_exact_match)."""
    twin = "test_" + metric.removeprefix("eval_") if metric.startswith("eval_") else None
    return twin if twin in METRICS else None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _varying(trials: Sequence[TrialRun]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for t in trials:
        for k, v in t.params.items():
            if k not in NOT_CONFIG:
                seen.setdefault(k, set()).add(v)
    return sorted(k for k, values in seen.items() if len(values) > 1)


def build_rows(
    trials: Sequence[TrialRun], metric: str, goal: str, by: Sequence[str] = (), *, sweep: str = "",
    items: dict[str, list[dict[str, Any]]] | None = None,
) -> Table:
    """Group trials into rows and pick each row's best config by its mean metric over seeds;
    `items` (run id -> its predictions.jsonl rows) feed the intervals and paired tests.

    Only FINISHED runs contribute numbers; failed and unfinished runs are only counted.
    """
    from sweep.results.significance import annotate

    beside = [k for k in (test_twin(metric), "forgetting") if k and any(k in t.metrics for t in trials)]
    columns = columns_for(metric, goal, beside)
    varying = _varying(trials)
    groups: dict[tuple, list[TrialRun]] = {}
    for t in trials:
        key = (t.variant, tuple(t.params.get(f, t.tags.get(f)) for f in by))
        groups.setdefault(key, []).append(t)

    sign = 1.0 if goal == "minimize" else -1.0
    rows: list[Row] = []
    for (variant, by_values), members in groups.items():
        done = [t for t in members if t.finished]
        ranked = rank_configs(done, metric, goal)
        best_key, best_runs = ranked[0] if ranked else ((), [])
        cells: dict[str, Cell] = {}
        for col in columns:
            values = [v for t in best_runs if (v := cell_value(t, col.key, metric)) is not None]
            mean, std = _mean_std(values)
            cells[col.key] = Cell(mean, std, len(values), values)
        family = FAMILIES.get(members[0].adapter_type)
        top = best_trial(members, metric, goal)
        config = dict(best_key)
        # What tells this row's configs apart, plus sweep-wide choices outside the adapter (e.g. the
        # learning rate); the adapter's own key fields are described by the catalogue instead.
        shown = set(_varying(done)) | {k for k in varying if not k.startswith("adapter.")}
        trainable = [v for t in best_runs if (v := metric_value(t, "trainable_params")) is not None]
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
                best_trial_value=metric_value(top, metric) if top else None,
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
    top = best_trial(trials, metric, goal)
    table = Table(sweep, metric, goal, tuple(by), columns, rows, varying, counts, trials=list(trials),
                  best_trial_id=top.trial_id if top else None)
    annotate(table, items or {})
    return table


def build_table(client: MlflowClient, parent_run_id: str | Sweep, by: Sequence[str] = ()) -> Table:
    """Read a sweep's child runs from MLflow and build its table, with intervals and paired
    tests from the rows' per-example predictions (one download per seed of each row's best
    configuration)."""
    from sweep.results.significance import ITEM_MEASURES, annotate

    sweep = parent_run_id if isinstance(parent_run_id, Sweep) else load_sweep(client, parent_run_id)
    trials = load_trials(client, sweep)
    table = build_rows(trials, sweep.metric, sweep.goal, by, sweep=sweep.name)
    table.parent_run_id = sweep.parent_run_id
    table.experiment = sweep.experiment_name
    items = {}
    if sweep.metric in ITEM_MEASURES:
        for row in table.rows:
            for run_id in row.config_runs:
                rows = read_jsonl(client, run_id, PREDICTIONS_FILE)
                if rows:
                    items[run_id] = rows
    annotate(table, items)
    return table


def by_problems(fields: Sequence[str], trials: Sequence[TrialRun]) -> list[str]:
    """One line per `--by` field that no trial has, with the nearest name."""
    import difflib

    known = {k for t in trials for k in (*t.params, *t.tags)}
    problems = []
    for f in fields:
        if f not in known:
            close = difflib.get_close_matches(f, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "use a trial param such as adapter.r or trainer.learning_rate"
            problems.append(f"--by {f}: no trial has this param or tag ({hint})")
    return problems


# --- formatting -----------------------------------------------------------------------


def _typed(raw: Any) -> Any:
    return parse_param(raw) if isinstance(raw, str) else raw


def plain(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
