"""How sure the table is: each row's interval on the ranking metric, and whether it is
really worse than the best row or statistically tied with it.

- Interval: with two or more seeds, Student's t over the seeds' values; with one seed, a
  bootstrap over the eval items of that trial's `predictions.jsonl`.
- Against the best row: a paired sign-flip permutation test over the eval items both rows'
  configurations were scored on (each item's value averaged over the seeds of the row's
  best configuration), Holm-corrected across the rows; p >= ALPHA means tied.

Items come from the trials' `predictions.jsonl` (`trials.evaluate`); indices are the
examples' rows in the eval file, the same for every trial of a sweep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

from sweep.results.stats import ALPHA, CONFIDENCE, RESAMPLES, holm, item_interval, paired_p, seed_interval, seeds_p
from trials.metrics import METRICS


@dataclass(frozen=True)
class ItemMeasure:
    """Which field of a prediction row measures the metric, and how rows combine into it."""

    field: str
    token_weighted: bool  # eval_loss and token accuracy are means over tokens, not examples
    transform: Callable[[float], float] | None = None


ITEM_MEASURES: dict[str, ItemMeasure] = {
    "eval_loss": ItemMeasure("loss", True),
    "eval_perplexity": ItemMeasure("loss", True, lambda v: float(math.exp(v)) if v < 700 else math.inf),
    "eval_token_accuracy": ItemMeasure("token_accuracy", True),
    "eval_exact_match": ItemMeasure("correct", False),
    "eval_answer_accuracy": ItemMeasure("answer_correct", False),
}


@dataclass
class RowStats:
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    ci_method: str | None
    n_seeds: int
    n_items: int  # eval items the paired test used (0: no test)
    p_raw: float | None = None
    p_vs_best: float | None = None  # Holm-adjusted
    tied_with_best: bool | None = None  # None for the best row itself and for rows without items
    p_seeds: float | None = None  # Welch's t over seed values against the best row (None: < 2 seeds)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _values(rows: list[dict[str, Any]], measure: ItemMeasure) -> dict[int, tuple[float, float]]:
    """index -> (value, weight) of one trial's prediction rows."""
    out = {}
    for r in rows:
        v = r.get(measure.field)
        if v is None:
            continue
        weight = float(r.get("tokens", 1)) if measure.token_weighted else 1.0
        out[int(r["index"])] = (float(v), weight)
    return out


def config_items(runs: list[str], items: dict[str, list[dict[str, Any]]],
                 measure: ItemMeasure) -> dict[int, tuple[float, float]]:
    """Per eval item, the mean over the configuration's seeds (items every seed scored)."""
    per_run = [_values(items[r], measure) for r in runs if items.get(r)]
    if not per_run:
        return {}
    common = set.intersection(*(set(v) for v in per_run))
    return {i: (sum(v[i][0] for v in per_run) / len(per_run), per_run[0][i][1]) for i in sorted(common)}


def annotate(table, items: dict[str, list[dict[str, Any]]]) -> None:
    """Set `row.stats` for every row and `table.significance` (what was tested, and how)."""
    metric = table.metric
    measure = ITEM_MEASURES.get(metric)
    per_row = {id(r): (config_items(r.config_runs, items, measure) if measure else {}) for r in table.rows}
    for row in table.rows:
        cell = row.cells[metric]
        if cell.n >= 2:
            iv = seed_interval(cell.values)
        elif cell.n == 1 and per_row[id(row)]:
            values, weights = zip(*per_row[id(row)].values())
            iv = item_interval(values, weights, transform=measure.transform)
        else:
            iv = None
        low, high = (iv.low, iv.high) if iv else (None, None)
        if iv and METRICS.get(metric) is not None and METRICS[metric].unit == "fraction":
            low, high = max(0.0, low), min(1.0, high)  # t intervals know no bounds; a fraction does
        row.stats = RowStats(cell.value, low, high, iv.method if iv else None, cell.n, 0)

    scored = [r for r in table.rows if r.cells[metric].value is not None]
    best = scored[0] if scored else None
    best_items = per_row[id(best)] if best is not None else {}
    others = scored[1:]
    raw: list[float | None] = []
    for row in others:
        row.stats.p_seeds = seeds_p(row.cells[metric].values, best.cells[metric].values)
        mine = per_row[id(row)]
        common = sorted(set(mine) & set(best_items))
        if len(common) < 2:
            raw.append(None)
            continue
        row.stats.n_items = len(common)
        raw.append(paired_p([mine[i][0] for i in common], [best_items[i][0] for i in common]))
    for row, p, adjusted in zip(others, raw, holm(raw)):
        row.stats.p_raw, row.stats.p_vs_best = p, adjusted
        row.stats.tied_with_best = None if adjusted is None else adjusted >= ALPHA
    tested = [r for r in others if r.stats.tied_with_best is not None]
    table.significance = {
        "metric": metric,
        "best_row": best.label if best is not None else None,
        "interval": f"{CONFIDENCE:.0%}, Student's t over seeds (n >= 2), else a bootstrap over eval items",
        "test": (f"paired sign-flip permutation test over eval items ({measure.field} per item, averaged over seeds; "
                 f"{RESAMPLES} resamples or exact)") if measure else None,
        "correction": "holm",
        "seeds_test": "Welch's t over the seeds' values (p_seeds): whether other seeds would separate the rows",
        "alpha": ALPHA,
        "tested_rows": len(tested),
        "tied_rows": [r.label for r in tested if r.stats.tied_with_best],
        "untestable_rows": [r.label for r in others if r.stats.tied_with_best is None],
    }
