"""The MLflow run layout of a sweep, and where its store is: the one place that names them.

One experiment (the sweep's name unless `tracking.experiment` says otherwise) holds, per
sweep run, one parent run (tag `peft_sweep.role=sweep`, `sweep=<name>`; artifacts
`spec.yaml`, `plan.json`, later `comparison/`) and one nested child run per trial attempt
(`mlflow.parentRunId`, `peft_sweep.role=trial`, `trial_id`, `adapter.type`,
`adapter.variant`; params = the TrialConfig flattened with dots; metrics named as in
`trials.metrics`; artifacts `adapter/`, `trial.json`, `metrics.json`, `adapter.yaml`).

The tracking URI rule, the same for every command (run, resume, submit, status, table,
export, ui): `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else the spec's `tracking.uri`,
else `sqlite:///mlflow.db`. A relative store path (`sqlite:///rel.db`, `rel/mlruns`)
resolves against the current folder when it comes from the command line or the
environment, as any path typed in a shell does, and against the spec's folder when it comes
from the spec, as every other path in a spec does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.errors import LaunchError, SweepLookupError
from sweep.util.net import health_error
from sweep.util.secrets import split_credentials
from trials.artifacts import (ADAPTER_DIR, METRICS_FILE, PREDICTIONS_FILE, PROBE_FILE, TEST_PREDICTIONS_FILE,
                              TRIAL_FILE)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

# --- tags --------------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
ROLE_TAG = "peft_sweep.role"  # "sweep" on the parent, "trial" on a child
SWEEP_TAG = "sweep"
TRIAL_ID_TAG = "trial_id"
ADAPTER_TYPE_TAG = "adapter.type"
VARIANT_TAG = "adapter.variant"
ERROR_TAG = "error"  # a failed child's one-line reason (the traceback is ERROR_FILE)
TUNE_TRIAL_TAG = "peft_sweep.tune_trial_id"
ATTEMPT_TAG = "peft_sweep.attempt"
ATTEMPT_TOKEN_TAG = "peft_sweep.attempt_token"
EARLY_STOP_TAG = "peft_sweep.early_stopped"
SUPERSEDED_TAG = "peft_sweep.superseded"
DUPLICATE_TAG = "peft_sweep.duplicate_of"
BEST_TRIAL_TAG = "best_trial_id"  # on the parent, set when the sweep ends
STOPPED_TAG = "peft_sweep.stopped"  # on the parent: why trials were left unstarted (a budget, resources)
# MLflow 3 opens an experiment by its kind; training runs are "custom model development".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"

# --- artifacts ---------------------------------------------------------------------------
SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
ERROR_FILE = "error.txt"
ADAPTER_YAML = "adapter.yaml"
# What a trial writes is named by the trial itself (trials.artifacts); the sweep uploads it as is.
TRIAL_ARTIFACTS = (ADAPTER_DIR, TRIAL_FILE, METRICS_FILE, ADAPTER_YAML, PROBE_FILE, PREDICTIONS_FILE,
                   TEST_PREDICTIONS_FILE)
COMPARISON_DIR = "comparison"  # the table and plots, attached to the parent

MAX_TAG_CHARS = 4000  # a tag value MLflow stores whatever the backend

# --- where the store is --------------------------------------------------------------------
DEFAULT_URI = "sqlite:///mlflow.db"
HEALTH_TIMEOUT_S = 10.0  # fail in seconds, not after MLflow's minutes of retries
PAGE_SIZE = 1000  # runs per search request (MLflow's maximum page)


def tracking_uri(cli_uri: str | None = None, spec_uri: str | None = None, spec_dir: Path | None = None) -> str:
    """The tracking URI by the one rule (module docstring), absolute, with a scheme MLflow has
    a store for."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if cli_uri:
        uri, source = absolute_uri(cli_uri, Path.cwd()), "--tracking-uri"
    elif env:
        uri, source = absolute_uri(env, Path.cwd()), "MLFLOW_TRACKING_URI"
    elif spec_uri:
        uri, source = absolute_uri(spec_uri, spec_dir or Path.cwd()), "tracking.uri"
    else:
        uri, source = absolute_uri(DEFAULT_URI, Path.cwd()), "the default tracking URI"
    check_scheme(uri, source)
    return uri


def check_scheme(uri: str, source: str) -> None:
    """Refuse, before anything starts, a URI no installed MLflow tracking store serves (MLflow
    itself would fail later with a traceback)."""
    from urllib.parse import urlparse

    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    scheme = urlparse(uri).scheme
    known = sorted(k for k in _tracking_store_registry._registry if k)
    if scheme and scheme not in known:
        raise SweepLookupError([f"{source} {split_credentials(uri)[0]!r}: MLflow has no tracking store for "
                                f"'{scheme}:' URIs; use a path, or one of {', '.join(k + ':' for k in known)}"])


def use_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """The URI without `user:password@`, which this process's MLflow client then takes from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: the URI can be printed, stored and
    shipped, the password cannot (and is returned for the caller to forward, off the record)."""
    clean, creds = split_credentials(uri)
    os.environ.update(creds)
    return clean, creds


def is_relative_store(uri: str) -> bool:
    """A store path that depends on the folder it is resolved in."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return bool(path) and not path.startswith("/") and path != ":memory:"
    return "://" not in uri and not uri.startswith("databricks") and not Path(uri).expanduser().is_absolute()


def absolute_uri(uri: str, base: Path) -> str:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if is_relative_store(uri):
            return "sqlite:///" + str((base / path).resolve())
        return uri
    if "://" not in uri and not uri.startswith("databricks"):
        return (base / Path(uri).expanduser()).resolve().as_uri()
    return uri


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def local_store_dir(uri: str) -> Path | None:
    """The folder of a local tracking store (sqlite file or file: store), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None


def check_server(uri: str) -> None:
    """A tracking server that does not answer is a launch error, found before anything starts."""
    if not is_server(uri):
        return
    problem = health_error(uri.rstrip("/") + "/health", HEALTH_TIMEOUT_S)
    if problem is not None:
        raise LaunchError(f"cannot reach the MLflow server at {uri}: {problem}")


def check_store(uri: str) -> None:
    """For readers: the store must exist (MLflow would create an empty one) and answer."""
    local = local_store_dir(uri)
    if local is not None:
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite") else local
        if not path.exists():
            raise SweepLookupError(
                [f"no MLflow store at {path} (from tracking URI {uri}); "
                 "pass the sweep's spec path (its tracking.uri is used), --tracking-uri, or set MLFLOW_TRACKING_URI"]
            )
    try:
        check_server(uri)
    except LaunchError as err:
        raise SweepLookupError(err.lines) from None


def client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def children(c: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str | None = None,
             deleted: bool = False) -> list[Run]:
    """The parent's child runs, oldest first, one request per PAGE_SIZE runs."""
    from mlflow.entities import ViewType

    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id is not None:
        flt += f" and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
    runs: list[Run] = []
    token = None
    while True:
        page = c.search_runs([experiment_id], flt, run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY,
                             max_results=PAGE_SIZE, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
