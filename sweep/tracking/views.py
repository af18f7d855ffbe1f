"""The MLflow UI view of a sweep's trials: one flat table of the trial runs with the columns a
person compares (variant, the sweep's metric, loss, size, memory, cost), best first.

MLflow 3's runs page nests child runs under their collapsed parent and shows three
attribute columns by default; which columns and rows a page shows is browser-local state.
Its "share view" feature is the one way to hand that state over a link: the state is an
experiment tag `mlflow.sharedViewState.<key>` holding `{"name", "createdAt", "state"}`,
`state` being the page's UI state as JSON, zlib-deflated and base64-encoded behind a
`deflate;` prefix (what the UI itself writes), opened by `#/experiments/<id>/runs?
viewStateShareKey=<key>`. The view filters on the parent run, so the trials are the rows;
MLflow does not share which parents are expanded.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from typing import TYPE_CHECKING

from sweep.tracking.layout import PARENT_TAG, VARIANT_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# Beside the sweep's own metric, in this order (absent metrics show as empty cells).
COLUMNS = ("eval_loss", "trainable_params", "peak_memory_mb", "tokens_per_s", "device_hours")


def view_key(parent_run_id: str) -> str:
    return f"peftsweep{parent_run_id}"


def _deflate(text: str) -> str:
    return "deflate;" + base64.b64encode(zlib.compress(text.encode())).decode()


def view_state(parent_run_id: str, metric: str, goal: str) -> dict:
    metrics = [metric] + [m for m in COLUMNS if m != metric]
    return {
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": goal == "minimize",
        "selectedColumns": ["attributes.`Run Name`", f"tags.`{VARIANT_TAG}`", "params.`seed`",
                            "params.`trainer.learning_rate`"] + [f"metrics.`{m}`" for m in metrics],
        "runsHiddenMode": "SHOW_ALL",
    }


def ensure_trials_view(c: MlflowClient, experiment_id: str, parent_run_id: str, sweep: str, metric: str,
                       goal: str) -> str:
    """Write (or rewrite) the sweep's view; returns its key for `trials_url`."""
    key = view_key(parent_run_id)
    now = int(time.time() * 1000)
    state = json.dumps(view_state(parent_run_id, metric, goal))
    value = {"name": f"sweep {sweep}: trials by {metric}", "createdAt": now, "updatedAt": now,
             "state": _deflate(state)}
    c.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, json.dumps(value))
    return key


def trials_url(base: str, experiment_id: str, key: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}"
