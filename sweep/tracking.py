"""MLflow records of a sweep: one parent run per sweep, one child run per trial.

Everything goes through `MlflowClient` with explicit run ids (never the fluent "active
run", which is per process): the driver opens the parent, each trial's Tune function opens
and closes its child, and the trial's rank-0 worker logs metrics and uploads artifacts into
that child from whatever node it runs on. Nothing here assumes a shared filesystem.

Child runs are keyed by the `trial_id` tag (the TrialConfig's content id). Opening a child
for a trial that already has one under the same parent (a resumed sweep, a Tune retry)
closes the old one as KILLED and soft-deletes it when it never finished, and reuses the
result when it did, so an experiment ends with exactly one FINISHED child per trial.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from sweep.spec import SweepSpec
    from trials.config import TrialConfig

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "peft_sweep.role"
TUNE_TRIAL_TAG = "peft_sweep.tune_trial_id"
ATTEMPT_TAG = "peft_sweep.attempt"
EARLY_STOP_TAG = "peft_sweep.early_stopped"
SUPERSEDED_TAG = "peft_sweep.superseded"
ATTEMPT_TOKEN_TAG = "peft_sweep.attempt_token"
DUPLICATE_TAG = "peft_sweep.duplicate_of"
_VERSIONED = ("peft-sweep", "ray", "mlflow", "torch", "deepspeed", "peft", "transformers", "optuna")
_MAX_ERROR_TAG = 4000


# --- where the runs go -----------------------------------------------------------------


def resolve_tracking_uri(cli_uri: str | None, spec: SweepSpec, spec_dir: Path) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else spec.tracking.uri; a relative
    sqlite path (or a bare relative path) resolves against the spec's folder."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    return absolute_uri(uri, spec_dir)


def absolute_uri(uri: str, base: Path) -> str:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return "sqlite:///" + str((base / path).resolve())
        return uri
    if "://" not in uri and not uri.startswith("databricks"):
        return (base / uri).resolve().as_uri()
    return uri


def local_store_dir(uri: str) -> Path | None:
    """The folder of a local tracking store (sqlite file or file: store), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None


def client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(c: MlflowClient, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    store = local_store_dir(uri)
    # A local store would otherwise put artifacts in ./mlruns of whichever process created
    # the experiment; keep them next to the database instead.
    location = (store / "mlartifacts" / name).as_uri() if store is not None and uri.startswith("sqlite") else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:
        exp = c.get_experiment_by_name(name)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


# --- the sweep's parent run ------------------------------------------------------------


def versions() -> dict[str, str]:
    from trials.artifacts import versions as package_versions

    return package_versions(_VERSIONED)


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
        "sweep": spec.name,
        ROLE_TAG: "sweep",
        "mlflow.runName": spec.name,
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
    from mlflow.entities import Param

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
    c.log_text(run_id, spec_path.read_text(), "spec.yaml")
    c.log_dict(run_id, plan_json, "plan.json")
    return run_id


def reopen(c: MlflowClient, run_id: str) -> None:
    c.update_run(run_id, status="RUNNING")


def finish_sweep_run(c: MlflowClient, run_id: str, counts: dict[str, int], best: dict[str, Any] | None,
                     interrupted: bool = False) -> None:
    from mlflow.entities import Metric, RunTag

    now = _now_ms()
    metrics = [Metric(f"trials_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
    tags = []
    if best:
        tags.append(RunTag("best_trial_id", str(best["trial_id"])))
        if best.get("value") is not None and math.isfinite(best["value"]):
            metrics.append(Metric(f"best_{best['metric']}", float(best["value"]), now, 0))
    c.log_batch(run_id, metrics=metrics, tags=tags)
    status = "KILLED" if interrupted else ("FAILED" if counts.get("ERROR", 0) else "FINISHED")
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
    import re

    return bool(re.fullmatch(r"[\w\-. /]+", key)) and not key.startswith("/")


def trial_params(cfg: TrialConfig) -> dict[str, str]:
    """Every TrialConfig field, flattened with dots (`adapter.r`, `trainer.learning_rate`)."""
    out: dict[str, str] = {}
    data = cfg.model_dump(mode="json", exclude={"trial_id"})
    for key, value in data.items():
        flatten(key, value, out)
    return {k: v[:6000] for k, v in out.items()}


def children(c: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str | None = None,
             deleted: bool = False) -> list[Run]:
    from mlflow.entities import ViewType

    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id is not None:
        flt += f" and tags.trial_id = '{trial_id}'"
    runs: list[Run] = []
    token = None
    while True:
        page = c.search_runs([experiment_id], flt, run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY,
                             max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def retire(c: MlflowClient, run: Run, reason: str) -> None:
    """Close a child that will never finish (KILLED) and soft-delete it: the trial's new
    attempt gets a fresh run with a clean metric history."""
    from mlflow.entities import RunTag

    run_id = run.info.run_id
    c.log_batch(run_id, tags=[RunTag(SUPERSEDED_TAG, reason[:_MAX_ERROR_TAG])])
    if run.info.status in ("RUNNING", "SCHEDULED"):
        c.set_terminated(run_id, status="KILLED")
    c.delete_run(run_id)


def open_child(c: MlflowClient, experiment_id: str, parent_run_id: str, sweep: str, cfg: TrialConfig,
               variant: str, tune_trial_id: str, attempt: str) -> str:
    """Create the child run one attempt of a trial logs into, retiring what earlier attempts
    of the same trial left under this parent (an orphaned RUNNING run after the driver died,
    a FAILED run before a retry). A FINISHED run is never touched."""
    from mlflow.entities import Param

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
        "mlflow.runName": cfg.trial_id,
        "sweep": sweep,
        "trial_id": cfg.trial_id,
        "adapter.type": cfg.adapter.type,
        "adapter.variant": variant,
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
    from mlflow.entities import ViewType

    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ATTEMPT_TOKEN_TAG}` = '{attempt}'"
    runs = c.search_runs([experiment_id], flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=1)
    return runs[0] if runs else None


def finished_trials(c: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, dict[str, float]]:
    """trial_id -> final metrics of every trial with a FINISHED child under the parent."""
    out: dict[str, dict[str, float]] = {}
    for run in children(c, experiment_id, parent_run_id):
        if run.info.status == "FINISHED" and run.data.tags.get("trial_id"):
            out[run.data.tags["trial_id"]] = dict(run.data.metrics)
    return out


def fail_child(c: MlflowClient, run_id: str, error: BaseException | str, detail: str | None = None) -> None:
    from mlflow.entities import RunTag

    message = error if isinstance(error, str) else error_message(error)
    text = detail or (message if isinstance(error, str) else "".join(traceback.format_exception(error)))
    try:
        c.log_text(run_id, text, "error.txt")
    finally:
        c.log_batch(run_id, tags=[RunTag("error", message[:_MAX_ERROR_TAG] or "error")])
        c.set_terminated(run_id, status="FAILED")


def error_message(error: BaseException) -> str:
    """The user-facing line of a trial failure: the worker's own exception when Ray wrapped it."""
    inner = error
    failures = getattr(error, "worker_failures", None)
    if failures:
        inner = failures[min(failures)]
    cause = getattr(inner, "cause", None)  # RayTaskError keeps the user exception here
    if isinstance(cause, BaseException):
        inner = cause
    text = str(inner).strip()
    if isinstance(inner, BaseException) and type(inner).__name__ not in ("TrialError",):
        last = text.splitlines()[-1] if text else ""
        return f"{type(inner).__name__}: {last}" if last and not last.startswith(type(inner).__name__) else (last or type(inner).__name__)
    return text.splitlines()[-1] if text else type(inner).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- the rank-0 logger inside a trial ---------------------------------------------------


class MlflowReporter:
    """A trials.metrics.Reporter that logs one trial attempt into its child run; only rank 0
    logs (other ranks get `run=None`). Rank 0 opens the child itself, so the Tune trial
    function never imports MLflow on the way to launching the workers, and closes it as
    FINISHED after uploading the artifacts.

    Per-step metrics are buffered and written with one `log_batch` per evaluation (every
    `eval_every` steps and at the end), so training makes no per-step HTTP calls."""

    def __init__(self, run: dict[str, Any] | None, adapter_block: dict[str, Any],
                 placement: dict[str, str] | None = None, overhead: dict[str, float] | None = None):
        self.adapter_block = adapter_block
        self.placement = placement or {}  # tag -> value: where the trial's processes ran
        self.overhead = overhead or {}  # metric -> seconds spent before the trial's own code
        self._client = None
        self.run_id: str | None = None
        self._buffer: list[Any] = []
        self._logged_at: dict[str, int] = {}
        if run is not None:
            self._client = client(run["tracking_uri"])
            self.run_id = open_child(self._client, run["experiment_id"], run["parent_run_id"], run["sweep"],
                                     run["cfg"], run["variant"], run["tune_trial_id"], run["attempt"])

    def _metric(self, key: str, value: float, step: int):
        from mlflow.entities import Metric

        value = float(value)
        if math.isnan(value):
            value = float("nan")
        elif math.isinf(value):
            value = math.copysign(1.7976931348623157e308, value)
        self._logged_at[key] = step
        return Metric(key, value, _now_ms(), step)

    def _flush(self, tags: list[Any] = ()) -> None:
        if self._client is None or (not self._buffer and not tags):
            return
        batch, self._buffer = self._buffer, []
        for i in range(0, max(len(batch), 1), 1000):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 1000], tags=list(tags) if i == 0 else [])

    def on_setup(self, info: dict[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import RunTag

        for key in ("trainable_params", "total_params", "trainable_percent", "base_params", "world_size",
                    "train_examples", "eval_examples"):
            if isinstance(info.get(key), (int, float)):
                self._buffer.append(self._metric(key, info[key], 0))
        self._buffer += [self._metric(key, value, 0) for key, value in self.overhead.items()]
        tags = [RunTag("trial.device", str(info.get("device", ""))), RunTag("trial.dtype", str(info.get("dtype", "")))]
        tags += [RunTag(key, value) for key, value in self.placement.items()]
        self._flush(tags)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._buffer.append(self._metric(key, value, step))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._buffer.append(self._metric(key, value, step))
        self._flush()

    def on_end(self, result: dict[str, Any], out_dir: str) -> None:
        if self._client is None:
            return
        import yaml

        step = int(result.get("step", max(self._logged_at.values(), default=0)))
        for key, value in result.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if self._logged_at.get(key) == step:
                continue  # the last evaluation already logged this point
            self._buffer.append(self._metric(key, value, step))
        from mlflow.entities import RunTag

        self._flush([RunTag(EARLY_STOP_TAG, "true")] if result.get("early_stopped") else [])
        out = Path(out_dir)
        (out / "adapter.yaml").write_text(yaml.safe_dump({"adapter": self.adapter_block}, sort_keys=False))
        upload(self._client, self.run_id, out)
        self._client.set_terminated(self.run_id, status="FINISHED")


UPLOADED = ("adapter", "trial.json", "metrics.json", "adapter.yaml", "probe_logits.pt")


def upload(c: MlflowClient, run_id: str, out: Path) -> None:
    for name in UPLOADED:
        path = out / name
        if path.is_dir():
            c.log_artifacts(run_id, str(path), name)
        elif path.is_file():
            c.log_artifact(run_id, str(path))
