"""Parameter importance: how much each swept field explains the sweep's metric.

The finished trials are replayed into an in-memory Optuna study (nothing is stored), and
one of Optuna's importance evaluators scores the fields that vary across them:

- ``fanova`` (default): a random forest fitted to the metric, its variance decomposed per
  parameter. Works from a handful of trials and on any goal. Optuna fits the forest with
  scikit-learn, which `mlflow` (not `mlflow-skinny`) already installs; without it we fall
  back to PED-ANOVA rather than add a dependency.
- ``ped-anova``: how differently each parameter is distributed among the top trials than
  among all of them. Needs no scikit-learn, but wants a few trials above the quantile, so
  more trials in all.
"""

from __future__ import annotations

import importlib.util
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sweep.tracking.reader import NOT_CONFIG, TrialRun, parse_param

EVALUATORS = ("fanova", "ped-anova")
# Below these counts the scores are noise: a forest on 4 points, or a "top" set of 1 trial.
MIN_TRIALS = {"fanova": 5, "ped-anova": 10}
ABSENT = "(absent)"  # marks a field the trial's adapter lacks (adapter.r for ln_tuning); imputed below
NOT_PARAMS = NOT_CONFIG  # repeats and ids, not choices the sweep makes
SEED = 0  # the forest's seed: the same runs give the same scores


@dataclass
class Importance:
    method: str
    metric: str
    n_trials: int
    scores: list[tuple[str, float]] = field(default_factory=list)  # best first, summing to 1
    reason: str | None = None  # why there are no scores

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"] = [{"param": name, "importance": value} for name, value in self.scores]
        return out


def _columns(trials: Sequence[TrialRun]) -> dict[str, list[str]]:
    """Every field's raw value per trial, "variant" first; only fields that vary."""
    keys = sorted({k for t in trials for k in t.params} - NOT_PARAMS)
    cols = {"variant": [t.variant for t in trials]}
    cols.update({k: [t.params.get(k, ABSENT) for t in trials] for k in keys})
    kept: dict[str, list[str]] = {}
    seen: set[tuple[int, ...]] = set()
    for name, values in cols.items():
        if len(set(values)) < 2:
            continue
        # A field the variant fixes (adapter.type; init_lora_weights, part of a LoRA variant's
        # name) says nothing the variant does not, and would take a share of the variant's score.
        if name != "variant" and len(set(zip(cols["variant"], values))) == len(set(cols["variant"])):
            continue
        # Likewise a field that only relabels an earlier one (alpha always 2 * r).
        codes: dict[str, int] = {}
        pattern = tuple(codes.setdefault(v, len(codes)) for v in values)
        if pattern in seen:
            continue
        seen.add(pattern)
        kept[name] = values
    return kept


def _distribution(name: str, raw: list[str]):
    """A numeric distribution where the values allow it, else categorical; and the values."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    # Trials without the field (adapter.r under ln_tuning) get a value drawn from those the
    # others have. A placeholder would be a copy of "which variant": the field would take the
    # variant's share. Drawn at random it carries no signal, and the field is judged on the
    # trials that have it.
    rng = random.Random(f"{SEED}:{name}")
    present = sorted({v for v in raw if v != ABSENT})
    raw = [rng.choice(present) if v == ABSENT else v for v in raw]
    parsed = [parse_param(v) for v in raw]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in parsed)
    # Two values give no order to exploit: categorical.
    if not numeric or len(set(parsed)) <= 2:
        return CategoricalDistribution(sorted(set(raw))), raw
    low, high = min(parsed), max(parsed)
    # Learning rates and positive values spanning more than a decade are judged on a log scale.
    log = low > 0 and (high / low > 10 or name.endswith("learning_rate"))
    if all(isinstance(v, int) for v in parsed) and (low >= 1 or not log):
        return IntDistribution(int(low), int(high), log=log), [int(v) for v in parsed]
    return FloatDistribution(float(low), float(high), log=log), [float(v) for v in parsed]


def _has_sklearn() -> bool:
    """Optuna's fANOVA fits its forest with scikit-learn (see the module docstring)."""
    return importlib.util.find_spec("sklearn") is not None


def _evaluator(method: str, n_trials: int):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if method == "fanova":
        return FanovaImportanceEvaluator(seed=SEED)
    # Top 5 trials while there are few (Optuna's advice for a stable estimate), top 10% beyond 50.
    return PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 5 / n_trials)))


def _study(trials: Sequence[TrialRun], metric: str, goal: str, cols: dict[str, list[str]]):
    import optuna

    dists, values = {}, {}
    for name, raw in cols.items():
        dists[name], values[name] = _distribution(name, raw)
    # create_study logs "A new study created in memory" at INFO; keep the terminal clean.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction=goal)
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials([
        optuna.trial.create_trial(params={n: values[n][i] for n in cols}, distributions=dists, value=t.metrics[metric])
        for i, t in enumerate(trials)
    ])
    return study


def parameter_importance(trials: Sequence[TrialRun], metric: str, goal: str, *, evaluator: str = "fanova") -> Importance:
    """Score the fields that vary across the finished trials with the metric; never raises
    for too little data (the result's `reason` says what is missing)."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown importance evaluator {evaluator!r}; use one of {', '.join(EVALUATORS)}")
    if goal not in ("minimize", "maximize"):
        raise ValueError(f"goal must be minimize or maximize, not {goal!r}")
    method = "ped-anova" if evaluator == "fanova" and not _has_sklearn() else evaluator
    done = [t for t in trials if t.finished and isinstance(t.metrics.get(metric), (int, float))
            and math.isfinite(t.metrics[metric])]
    imp = Importance(method=method, metric=metric, n_trials=len(done))
    if len(done) < MIN_TRIALS[method]:
        imp.reason = f"{method} needs at least {MIN_TRIALS[method]} finished trials with {metric}; there are {len(done)}"
        return imp
    cols = _columns(done)
    if len(cols) < 2:
        only = f" (only {next(iter(cols))} varies)" if cols else ""
        imp.reason = f"importance needs at least 2 swept fields that vary across the finished trials{only}"
        return imp
    if len({t.metrics[metric] for t in done}) < 2:
        imp.reason = f"{metric} is the same in every finished trial"
        return imp

    import optuna.importance

    study = _study(done, metric, goal, cols)
    ev = _evaluator(method, len(done))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / "importances will be equal" notices
        raw = optuna.importance.get_param_importances(study, evaluator=ev, normalize=False)
    total = sum(v for v in raw.values() if math.isfinite(v))
    if total <= 0:
        imp.reason = f"{method} found no parameter that explains {metric}"
        return imp
    imp.scores = sorted(((k, float(v / total) if math.isfinite(v) else 0.0) for k, v in raw.items()),
                        key=lambda kv: (-kv[1], kv[0]))
    return imp


def importance_text(imp: Importance) -> str:
    """The ranked list for the terminal, under a line naming the method and the trial count."""
    head = f"Parameter importance for {imp.metric} ({imp.method}, {imp.n_trials} finished trials)"
    if imp.reason:
        return f"{head}: {imp.reason}"
    width = max(len(name) for name, _ in imp.scores)
    lines = [f"  {i:>2}. {name:<{width}}  {value:.2f}" for i, (name, value) in enumerate(imp.scores, 1)]
    return "\n".join([head, *lines])


def plot_importance(imp: Importance, path: str | Path) -> Path | None:
    """Horizontal bars, most important on top. None when there are no scores."""
    if not imp.scores:
        return None
    from sweep.results.plots import _pyplot  # imported here: plots pulls in the table module

    plt = _pyplot()
    names = [name for name, _ in reversed(imp.scores)]
    values = [value for _, value in reversed(imp.scores)]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.45 * len(names) + 1.2)), dpi=110)
    try:
        bars = ax.barh(names, values, color="tab:blue", alpha=0.8)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
        ax.set_xlim(0, max(1.0, max(values) * 1.15))
        ax.set_xlabel("importance (sums to 1)")
        ax.set_title(f"{imp.metric}: parameter importance ({imp.method}, {imp.n_trials} trials)")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path
    finally:
        plt.close(fig)
