"""Reading a sweep back from MLflow: find its parent run, its trial runs, their artifacts,
and the one rule for the best trial.

The layout read here is the one `sweep.tracking.runs` writes (see `sweep.tracking.layout`).
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from mlflow.exceptions import MlflowException

from sweep.errors import SpecError, SweepLookupError
from sweep.spec import load_spec
from sweep.tracking.layout import (ADAPTER_TYPE_TAG, ROLE_TAG, SPEC_FILE, SWEEP_TAG, TRIAL_ID_TAG, VARIANT_TAG,
                                   check_store, children, client, tracking_uri, use_credentials)
from trials.metrics import METRICS

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

@dataclass(frozen=True)
class TrialRun:
    """One child run, reduced to what the table, plots and exports read."""

    run_id: str
    status: str
    trial_id: str
    adapter_type: str
    variant: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    start_time: int | None = None
    end_time: int | None = None

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"


@dataclass
class Sweep:
    """A sweep's parent run and what it declares about ranking its trials."""

    name: str
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent_run_id: str
    metric: str = "eval_loss"
    goal: str = "minimize"
    spec: dict[str, Any] | None = None


def parse_param(raw: str) -> Any:
    """MLflow stores params as text; get back numbers, booleans, lists and None."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return raw


def unflatten(params: dict[str, str]) -> dict[str, Any]:
    """`{"adapter.r": "8"}` -> `{"adapter": {"r": 8}}` (the TrialConfig shape)."""
    out: dict[str, Any] = {}
    for key in sorted(params):
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a scalar and a section share a name; keep the scalar
                break
            node = child
        else:
            node[leaf] = parse_param(params[key])
    return out


# --- finding the sweep ----------------------------------------------------------------


def _latest_parent(client: MlflowClient, experiment_ids: list[str], name: str | None) -> Run | None:
    query = f"tags.`{ROLE_TAG}` = 'sweep'"
    if name is not None:
        query += f" and tags.`{SWEEP_TAG}` = '{name}'"
    runs = client.search_runs(experiment_ids, query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _sweep_names(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    runs = client.search_runs(experiment_ids, f"tags.`{ROLE_TAG}` = 'sweep'", max_results=200)
    return sorted({r.data.tags.get(SWEEP_TAG, "?") for r in runs})


def find_sweep(client: MlflowClient, tracking_uri: str, name: str | None = None, experiment: str | None = None) -> Sweep:
    """The latest parent run of sweep `name` (or the latest sweep at all when `name` is None).

    Looks in `experiment` when given, else in the experiment named like the sweep, else in
    every experiment of the store (a spec may set tracking.experiment to anything).
    """
    if name is not None and "'" in name:  # it would break out of the search filter's quotes
        raise SweepLookupError([f"no sweep named {name!r} (sweep names are letters, digits, _ . -)"])
    try:
        if experiment is not None:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
                raise SweepLookupError([f"experiment {experiment!r} not found at {tracking_uri} (experiments there: {known})"])
            scopes = [[exp.experiment_id]]
        else:
            scopes = []
            if name is not None:
                exp = client.get_experiment_by_name(name)
                if exp is not None:
                    scopes.append([exp.experiment_id])
            everything = [e.experiment_id for e in client.search_experiments()]
            if everything:
                scopes.append(everything)
        parent = None
        for ids in scopes:
            parent = _latest_parent(client, ids, name)
            if parent is not None:
                break
        if parent is None:
            ids = scopes[-1] if scopes else []
            names = _sweep_names(client, ids) if ids else []
            where = f"experiment {experiment!r}" if experiment else tracking_uri
            what = f"no sweep named {name!r}" if name else "no sweep"
            hint = f"sweeps there: {', '.join(names)}" if names else "run `sweep run spec.yaml` first, or pass --tracking-uri"
            raise SweepLookupError([f"{what} in {where} ({hint})"])
        exp = client.get_experiment(parent.info.experiment_id)
    except MlflowException as err:
        raise SweepLookupError([f"MLflow at {tracking_uri}: {err.message}"]) from None
    sweep = Sweep(
        name=parent.data.tags.get(SWEEP_TAG, name or ""),
        tracking_uri=tracking_uri,
        experiment_id=exp.experiment_id,
        experiment_name=exp.name,
        parent_run_id=parent.info.run_id,
    )
    _read_declaration(client, sweep, parent)
    return sweep


def load_sweep(client: MlflowClient, parent_run_id: str, tracking_uri: str | None = None) -> Sweep:
    """A Sweep from a known parent run id (what a caller holding the run id, e.g. a test, uses)."""
    parent = client.get_run(parent_run_id)
    exp = client.get_experiment(parent.info.experiment_id)
    sweep = Sweep(
        name=parent.data.tags.get(SWEEP_TAG, parent.info.run_name or parent_run_id),
        tracking_uri=tracking_uri or client.tracking_uri,
        experiment_id=exp.experiment_id,
        experiment_name=exp.name,
        parent_run_id=parent_run_id,
    )
    _read_declaration(client, sweep, parent)
    return sweep


def _read_declaration(client: MlflowClient, sweep: Sweep, parent: Run) -> None:
    """The metric and goal: the parent's spec.yaml artifact, else its params or tags."""
    spec: dict[str, Any] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(sweep.parent_run_id, SPEC_FILE, tmp)
            loaded = yaml.safe_load(Path(local).read_text())
            spec = loaded if isinstance(loaded, dict) else None
    except Exception:  # a parent logged without the artifact still has params/tags to fall back on
        spec = None
    sweep.spec = spec
    declared = (spec or {}).get("metric") or {}
    fields = {**parent.data.tags, **parent.data.params}
    name = declared.get("name") or fields.get("metric.name") or fields.get("metric") or "eval_loss"
    known = METRICS.get(name)
    default_goal = known.goal if known is not None and known.goal != "none" else "minimize"
    goal = declared.get("goal") or fields.get("metric.goal") or fields.get("goal") or default_goal
    sweep.metric, sweep.goal = str(name), str(goal)


def open_sweep(target: str | None, cli_uri: str | None = None, experiment: str | None = None) -> tuple[MlflowClient, Sweep]:
    """Resolve NAME (a sweep name or a spec path) and the tracking URI, then find the sweep."""
    name: str | None = target
    spec_uri: str | None = None
    spec_dir: Path | None = None
    if target is not None and (target.endswith((".yaml", ".yml")) or Path(target).is_file()):
        try:
            spec, spec_dir = load_spec(target)
        except SpecError as err:
            raise SweepLookupError(err.lines) from None
        name = spec.name
        spec_uri = spec.tracking.uri
        experiment = experiment or spec.tracking.experiment or spec.name
    uri, _ = use_credentials(tracking_uri(cli_uri, spec_uri, spec_dir))
    check_store(uri)
    c = client(uri)
    return c, find_sweep(c, uri, name, experiment)


# --- reading the trials ---------------------------------------------------------------


def trial_from_run(run: Run) -> TrialRun:
    tags = run.data.tags
    params = run.data.params
    adapter_type = tags.get(ADAPTER_TYPE_TAG) or params.get("adapter.type") or "?"
    return TrialRun(
        run_id=run.info.run_id,
        status=run.info.status,
        trial_id=tags.get(TRIAL_ID_TAG) or params.get("trial_id") or run.info.run_name or run.info.run_id,
        adapter_type=adapter_type,
        variant=tags.get(VARIANT_TAG) or adapter_type,
        params=dict(params),
        metrics=dict(run.data.metrics),
        tags=dict(tags),
        start_time=run.info.start_time,
        end_time=run.info.end_time,
    )


def load_trials(client: MlflowClient, sweep: Sweep) -> list[TrialRun]:
    try:
        return [trial_from_run(r) for r in children(client, sweep.experiment_id, sweep.parent_run_id)]
    except MlflowException as err:
        raise SweepLookupError([f"MLflow at {sweep.tracking_uri}: {err.message}"]) from None


def require_trials(trials: list[TrialRun], sweep: Sweep, *, finished: bool = False) -> None:
    if not trials:
        raise SweepLookupError(
            [f"sweep {sweep.name!r} (parent run {sweep.parent_run_id} in experiment {sweep.experiment_name!r}) has no trial runs yet"]
        )
    if finished and not any(t.finished for t in trials):
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        raise SweepLookupError([f"sweep {sweep.name!r} has no finished trial ({summary}); nothing to export"])


# --- the best trial ---------------------------------------------------------------------


def metric_value(trial: TrialRun, metric: str) -> float | None:
    v = trial.metrics.get(metric)
    return None if v is None or math.isnan(v) else v


def rank_key(goal: str, value: float, trainable_params: float | None, trial_id: str) -> tuple:
    """The order of results, best first: the metric in the goal's direction; ties go to fewer
    trainable parameters, then to the smaller trial id, so every reader picks the same one."""
    sign = 1.0 if goal == "minimize" else -1.0
    return (sign * value, math.inf if trainable_params is None else trainable_params, trial_id)


# Params that identify a trial rather than configure it: seeds repeat a configuration.
NOT_CONFIG = frozenset({"seed", "trial_id"})


def config_key(trial: TrialRun) -> tuple[tuple[str, str], ...]:
    """What a trial's configuration is, seeds aside: trials with the same key are its seeds."""
    return tuple(sorted((k, v) for k, v in trial.params.items() if k not in NOT_CONFIG))


def rank_configs(trials: Iterable[TrialRun], metric: str, goal: str) -> list[tuple[tuple, list[TrialRun]]]:
    """Configurations with their finished seeds, best first: by the mean of the metric over
    seeds (so a lucky seed does not win), then fewer trainable parameters, then the key."""
    configs: dict[tuple, list[TrialRun]] = {}
    for t in trials:
        if t.finished and metric_value(t, metric) is not None:
            configs.setdefault(config_key(t), []).append(t)
    sign = 1.0 if goal == "minimize" else -1.0

    def order(item: tuple[tuple, list[TrialRun]]) -> tuple:
        key, runs = item
        mean = sum(metric_value(t, metric) for t in runs) / len(runs)
        params = [t.metrics["trainable_params"] for t in runs if "trainable_params" in t.metrics]
        return (sign * mean, sum(params) / len(params) if params else math.inf, key)

    return sorted(configs.items(), key=order)


def best_trial(trials: Iterable[TrialRun], metric: str, goal: str) -> TrialRun | None:
    """The best finished trial: the best seed (see `rank_key`) of the best configuration (see
    `rank_configs`). The one the table marks, export writes and the sweep's parent run
    records as `best_trial_id`."""
    ranked = rank_configs(trials, metric, goal)
    if not ranked:
        return None
    seeds = ranked[0][1]
    return min(seeds, key=lambda t: rank_key(goal, metric_value(t, metric), t.metrics.get("trainable_params"), t.trial_id))


def best_of_sweep(c: MlflowClient, experiment_id: str, parent_run_id: str, metric: str, goal: str) -> TrialRun | None:
    """The best finished trial of a sweep, read from its child runs (what the driver records
    on the parent run when the sweep ends)."""
    return best_trial((trial_from_run(r) for r in children(c, experiment_id, parent_run_id)), metric, goal)


# --- artifacts --------------------------------------------------------------------------


def download(c: MlflowClient, run_id: str, path: str, dest: Path) -> bool:
    """Copy a run's artifact (file or folder) to `dest`; False when it has none (or an empty one)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(c.download_artifacts(run_id, path, tmp))
        except Exception:  # MLflow raises several types for "no such artifact"
            return False
        if not local.exists() or (local.is_dir() and not any(local.iterdir())):
            return False
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, dest) if local.is_dir() else shutil.copy2(local, dest)
    return True


def read_jsonl(c: MlflowClient, run_id: str, name: str) -> list[dict[str, Any]] | None:
    """A run's JSON-lines artifact as rows; None when it is missing or unreadable."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "artifact.jsonl"
        if not download(c, run_id, name, target):
            return None
        try:
            return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError):
            return None


def read_json(c: MlflowClient, run_id: str, name: str) -> Any | None:
    """A run's JSON artifact, parsed; None when it is missing or unreadable."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "artifact.json"
        if not download(c, run_id, name, target):
            return None
        try:
            return json.loads(target.read_text())
        except (OSError, json.JSONDecodeError):
            return None
