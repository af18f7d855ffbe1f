"""Writing a sweep's MLflow records: the parent run, each trial's child run, failures.

Everything goes through `MlflowClient` with explicit run ids (never the fluent "active
run", which is per process): the driver opens and closes the parent, each trial attempt's
rank-0 worker opens its child (`sweep.tracking.reporter`), and the Tune trial function
records a failure the workers could not. Nothing here assumes a shared filesystem.

Child runs are keyed by the `trial_id` tag (the TrialConfig's content id). Opening a child
for a trial that already has one under the same parent (a resumed sweep, a Tune retry)
closes the old one as KILLED and soft-deletes it when it never finished, and reuses the
result when it did, so an experiment ends with exactly one FINISHED child per trial.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, Run, RunTag, ViewType

from sweep.tracking.layout import (
    ADAPTER_TYPE_TAG,
    ATTEMPT_TAG,
    ATTEMPT_TOKEN_TAG,
    BEST_TRIAL_TAG,
    COMPARISON_DIR,
    DUPLICATE_TAG,
    EARLY_STOP_TAG,
    ERROR_FILE,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    MAX_TAG_CHARS,
    PARENT_TAG,
    PLAN_FILE,
    ROLE_TAG,
    RUN_NAME_TAG,
    SPEC_FILE,
    STOPPED_TAG,
    SUPERSEDED_TAG,
    SWEEP_TAG,
    TRAINING_KIND,
    TRIAL_ID_TAG,
    TUNE_TRIAL_TAG,
    VARIANT_TAG,
    children,
    local_store_dir,
)
from sweep.tracking.views import ensure_trials_view
from trials.artifacts import versions

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from sweep.spec import SweepSpec
    from trials.config import TrialConfig


def ensure_experiment(c: MlflowClient, name: str, uri: str) -> str:
    """The sweep's experiment, marked as a training experiment: MLflow 3's UI otherwise opens
    it as a GenAI experiment (an empty overview of traces) instead of its runs."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    store = local_store_dir(uri)
    # A local store would otherwise put artifacts in ./mlruns of whichever process created
    # the experiment; keep them next to the database instead.
    location = (store / "mlartifacts" / name).as_uri() if store is not None and uri.startswith("sqlite") else None
    try:
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    except Exception:
        exp = c.get_experiment_by_name(name)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


# --- the sweep's parent run ------------------------------------------------------------


def git_sha(folder: Path) -> str | None:
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def start_sweep_run(c: MlflowClient, experiment_id: str, spec: SweepSpec, spec_path: Path,
                    plan_json: dict[str, Any], storage: str) -> str:
    tags = {
        SWEEP_TAG: spec.name,
        ROLE_TAG: "sweep",
        RUN_NAME_TAG: spec.name,
        "peft_sweep.strategy": spec.search.strategy,
        "peft_sweep.storage": storage,
        "peft_sweep.spec_path": str(spec_path.resolve()),
        "mlflow.source.name": "sweep run",
        **{f"version.{k}": v for k, v in versions().items()},
    }
    sha = git_sha(spec_path.resolve().parent)
    if sha:
        tags["mlflow.source.git.commit"] = sha.removesuffix("-dirty")
        tags["peft_sweep.git_sha"] = sha
    run = c.create_run(experiment_id, tags=tags, run_name=spec.name)
    run_id = run.info.run_id
    params = [
        Param("strategy", spec.search.strategy),
        Param("trials_planned", str(len(plan_json.get("trials", [])))),
        Param("metric", spec.metric.name),
        Param("goal", spec.metric.goal),
        Param("scheduler", spec.scheduler.type),
        Param("workers_per_trial", str(spec.resources.workers_per_trial)),
        Param("base_model", spec.model.base_model),
    ]
    c.log_batch(run_id, params=params)
    c.log_text(run_id, spec_path.read_text(), SPEC_FILE)
    c.log_dict(run_id, plan_json, PLAN_FILE)
    ensure_trials_view(c, experiment_id, run_id, spec.name, spec.metric.name, spec.metric.goal)
    return run_id


def reopen(c: MlflowClient, run_id: str) -> None:
    c.update_run(run_id, status="RUNNING")


def finish_sweep_run(c: MlflowClient, run_id: str, counts: dict[str, int], best: dict[str, Any] | None,
                     interrupted: bool = False, stopped: str | None = None, failed: bool = False) -> None:
    """Close the parent run; `stopped` says why trials were left (a budget, resources)."""
    now = _now_ms()
    metrics = [Metric(f"trials_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
    tags = [RunTag(STOPPED_TAG, stopped[:MAX_TAG_CHARS])] if stopped else []
    if best:
        tags.append(RunTag(BEST_TRIAL_TAG, str(best["trial_id"])))
        if best.get("value") is not None and math.isfinite(best["value"]):
            metrics.append(Metric(f"best_{best['metric']}", float(best["value"]), now, 0))
    c.log_batch(run_id, metrics=metrics, tags=tags)
    if not stopped and STOPPED_TAG in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, STOPPED_TAG)  # a resume finished what a budget had stopped
    status = "KILLED" if interrupted else ("FAILED" if counts.get("ERROR", 0) or failed else "FINISHED")
    c.set_terminated(run_id, status=status)


# --- a trial's child run ---------------------------------------------------------------


def flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value and all(_valid_key(str(k)) for k in value):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (dict, list)):
        out[prefix] = json.dumps(value, sort_keys=True)
    else:
        out[prefix] = str(value)


def _valid_key(key: str) -> bool:
    return bool(re.fullmatch(r"[\w\-. /]+", key)) and not key.startswith("/")


def trial_params(cfg: TrialConfig) -> dict[str, str]:
    """Every TrialConfig field, flattened with dots (`adapter.r`, `trainer.learning_rate`)."""
    out: dict[str, str] = {}
    data = cfg.model_dump(mode="json", exclude={"trial_id"})
    for key, value in data.items():
        flatten(key, value, out)
    return {k: v[:6000] for k, v in out.items()}


def retire(c: MlflowClient, run: Run, reason: str) -> None:
    """Close a child that will never finish (KILLED) and soft-delete it: the trial's new
    attempt gets a fresh run with a clean metric history."""
    run_id = run.info.run_id
    c.log_batch(run_id, tags=[RunTag(SUPERSEDED_TAG, reason[:MAX_TAG_CHARS])])
    if run.info.status in ("RUNNING", "SCHEDULED"):
        c.set_terminated(run_id, status="KILLED")
    c.delete_run(run_id)


def open_child(c: MlflowClient, experiment_id: str, parent_run_id: str, sweep: str, cfg: TrialConfig,
               variant: str, tune_trial_id: str, attempt: str) -> str:
    """Create the child run one attempt of a trial logs into, retiring what earlier attempts
    of the same trial left under this parent (an orphaned RUNNING run after the driver died,
    a FAILED run before a retry). A FINISHED run is never touched."""
    number, duplicate_of = 1, None
    for run in children(c, experiment_id, parent_run_id, cfg.trial_id):
        status = run.info.status
        number = max(number, int(run.data.tags.get(ATTEMPT_TAG, "0")) + 1)
        if status == "FINISHED":
            duplicate_of = run.info.run_id  # e.g. Optuna sampled the same configuration again
            continue
        if status == "RUNNING" and run.data.tags.get(TUNE_TRIAL_TAG) not in (None, tune_trial_id):
            continue  # another Tune trial with the same content is training right now
        retire(c, run, f"replaced by attempt {number} of trial {cfg.trial_id}")
    tags = {
        PARENT_TAG: parent_run_id,
        ROLE_TAG: "trial",
        RUN_NAME_TAG: cfg.trial_id,
        SWEEP_TAG: sweep,
        TRIAL_ID_TAG: cfg.trial_id,
        ADAPTER_TYPE_TAG: cfg.adapter.type,
        VARIANT_TAG: variant,
        TUNE_TRIAL_TAG: tune_trial_id,
        ATTEMPT_TAG: str(number),
        ATTEMPT_TOKEN_TAG: attempt,
    }
    if duplicate_of:
        tags[DUPLICATE_TAG] = duplicate_of
    run = c.create_run(experiment_id, tags=tags, run_name=cfg.trial_id)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in trial_params(cfg).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])
    return run_id


def attempt_run(c: MlflowClient, experiment_id: str, parent_run_id: str, attempt: str) -> Run | None:
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ATTEMPT_TOKEN_TAG}` = '{attempt}'"
    runs = c.search_runs([experiment_id], flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=1)
    return runs[0] if runs else None


def finished_trials(c: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, dict[str, float]]:
    """trial_id -> final metrics of every trial with a FINISHED child under the parent."""
    out: dict[str, dict[str, float]] = {}
    for run in children(c, experiment_id, parent_run_id):
        if run.info.status == "FINISHED" and run.data.tags.get(TRIAL_ID_TAG):
            out[run.data.tags[TRIAL_ID_TAG]] = dict(run.data.metrics)
    return out


def started_trials(c: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, dict[str, float]]:
    """trial_id -> metrics of every trial that ran under the parent (its latest run)."""
    out: dict[str, dict[str, float]] = {}
    for run in children(c, experiment_id, parent_run_id):
        if run.data.tags.get(TRIAL_ID_TAG):
            out[run.data.tags[TRIAL_ID_TAG]] = dict(run.data.metrics)  # oldest first: the latest stays
    return out


def failed_trials(c: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial_id -> the error line of every trial with a FAILED child under the parent."""
    return {run.data.tags[TRIAL_ID_TAG]: run.data.tags.get(ERROR_TAG, "failed")
            for run in children(c, experiment_id, parent_run_id)
            if run.info.status == "FAILED" and run.data.tags.get(TRIAL_ID_TAG)}


def fail_child(c: MlflowClient, run_id: str, message: str, detail: str | None = None) -> None:
    """Close a child as FAILED: the one-line reason as a tag, the whole story as error.txt."""
    try:
        c.log_text(run_id, detail or message, ERROR_FILE)
    finally:
        c.log_batch(run_id, tags=[RunTag(ERROR_TAG, message[:MAX_TAG_CHARS] or "error")])
        c.set_terminated(run_id, status="FAILED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def attach_to_parent(c: MlflowClient, parent_run_id: str, files: list[Path]) -> None:
    """The comparison table and plots, as artifacts of the sweep's parent run."""
    for path in files:
        c.log_artifact(parent_run_id, str(path), COMPARISON_DIR)


def mark_early_stopped(c: MlflowClient, run_id: str) -> None:
    """Close a child whose trial the scheduler stopped: its result so far is final."""
    c.log_batch(run_id, tags=[RunTag(EARLY_STOP_TAG, "true")])
    c.set_terminated(run_id, status="FINISHED")
