"""PNG plots of a sweep: eval-loss curves of each row's best configuration (mean over seeds
with a band), a Pareto chart with each row's interval, and parameter importance.

Matplotlib runs on the Agg backend (no display). Only the curves read metric histories,
and only for the seeds of one configuration per row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sweep.results.table import ARROWS, Table

if TYPE_CHECKING:
    from mlflow import MlflowClient

CURVES = "eval_loss_curves.png"
PARETO = "pareto.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_eval_curves(client: MlflowClient, table: Table, path: str | Path, metric: str = "eval_loss") -> Path | None:
    """One line per row: the metric's history averaged over the seeds of the row's best
    configuration, with a band of the 95% t interval across those seeds at each step (for
    steps every seed reached). None when no row has a history."""
    from sweep.results.stats import seed_interval

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    drawn = 0
    try:
        for row in table.rows:
            histories = []
            for run_id in row.config_runs:
                points = {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric),
                                                          key=lambda m: (m.step, m.timestamp))}
                if points:
                    histories.append(points)
            if not histories:
                continue
            steps = sorted(set.intersection(*(set(h) for h in histories)))
            intervals = [seed_interval([h[s] for h in histories]) for s in steps]
            (line,) = ax.plot(steps, [iv.mean for iv in intervals], marker="o", markersize=3,
                              label=f"{row.label} (n={len(histories)})")
            if len(histories) > 1:
                ax.fill_between(steps, [iv.low for iv in intervals], [iv.high for iv in intervals],
                                color=line.get_color(), alpha=0.18, linewidth=0)
            drawn += 1
        if not drawn:
            return None
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.set_title(f"{table.sweep}: {metric}, mean over seeds of each row's best config (band: 95% CI)")
        ax.grid(True, alpha=0.3)
        return _save(fig, ax, path)
    finally:
        plt.close(fig)


def _save(fig, ax, path: str | Path) -> Path:
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def pareto_front(points: Sequence[tuple[float, float]], goal: str) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer trainable % and a better metric, by increasing x."""
    sign = 1.0 if goal == "minimize" else -1.0
    front: list[tuple[float, float]] = []
    best = math.inf
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            front.append((x, y))
            best = sign * y
    return front


def plot_pareto(table: Table, path: str | Path) -> Path | None:
    """Every finished trial (faint dots): trainable % of base (log x) against the sweep's
    metric, with the frontier; each row's best configuration as its mean with a 95% interval."""
    plt = _pyplot()
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for t in table.trials:
        x, y = t.metrics.get("trainable_percent"), t.metrics.get(table.metric)
        if t.finished and x is not None and y is not None and x > 0 and not (math.isnan(x) or math.isnan(y)):
            by_variant.setdefault(t.variant, []).append((x, y))
    if not by_variant:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        colors = {}
        for variant, pts in sorted(by_variant.items()):
            dots = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.35, label=variant)
            colors[variant] = dots.get_facecolor()[0]
        # Each row's best configuration: its mean with the 95% interval (sweep.results.significance).
        for row in table.rows:
            st, x = row.stats, row.cells.get("trainable_percent")
            if st is None or st.mean is None or x is None or not x.value or st.ci_low is None:
                continue
            ax.errorbar([x.value], [st.mean], yerr=[[st.mean - st.ci_low], [st.ci_high - st.mean]], fmt="D",
                        markersize=5, capsize=4, color=colors.get(row.variant, "black"), markeredgecolor="black")
        front = pareto_front([p for pts in by_variant.values() for p in pts], table.goal)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1.2, label="Pareto frontier")
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=60, facecolors="none", edgecolors="black")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of base, log scale)")
        ax.set_ylabel(f"{table.metric} {ARROWS.get(table.goal, '')}".strip())
        ax.set_title(f"{table.sweep}: {table.metric} vs trainable % ({table.goal})")
        ax.grid(True, which="both", alpha=0.3)
        return _save(fig, ax, path)
    finally:
        plt.close(fig)


def make_plots(client: MlflowClient, table: Table, out_dir: str | Path) -> list[Path]:
    """Write the plots that have data into out_dir; returns their paths."""
    out = Path(out_dir)
    made = [plot_eval_curves(client, table, out / CURVES), plot_pareto(table, out / PARETO)]
    return [p for p in made if p is not None]
