"""`sweep status`: a sweep's trials, from Ray Tune's experiment state and the MLflow runs."""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import ExperimentAnalysis

from sweep.errors import LaunchError, SpecError
from sweep.launch import state as sweep_state
from sweep.spec import load_spec
from sweep.tracking import layout


def _tune_trials(storage: str) -> list[dict[str, Any]]:
    """Trials as Tune last recorded them (no Ray runtime needed)."""
    for name in ("ray", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    analysis = ExperimentAnalysis(storage)
    out = []
    for trial in analysis.trials:
        config = trial.config if isinstance(trial.config, dict) else {}
        last = trial.last_result or {}
        out.append({
            "tune_trial_id": trial.trial_id,
            # grid/random configs carry the planned trial id; Optuna's trials are named by it
            "trial_id": config.get("trial_id") or str(trial),
            "tune": trial.status,
            "step": last.get("step"),
            "result": last,
        })
    return out


def sweep_status(name_or_path: str) -> dict[str, Any]:
    storage = sweep_state.locate(name_or_path)
    st = sweep_state.load(storage)
    report: dict[str, Any] = {"sweep": st.to_json(), "trials": [], "metric": "eval_loss"}
    try:
        spec, _ = load_spec(st.spec_path)
        report["metric"] = spec.metric.name
    except SpecError:  # the spec moved or changed since: the trials still show
        pass
    metric = report["metric"]
    rows: dict[str, dict[str, Any]] = {}
    try:
        for t in _tune_trials(storage):
            row = rows.setdefault(t["trial_id"], {"trial_id": t["trial_id"]})
            row.update(tune=t["tune"], step=t["step"], tune_trial_id=t["tune_trial_id"])
            if isinstance(t["result"].get(metric), (int, float)):
                row["metric"] = t["result"][metric]
    except Exception as err:  # no experiment state yet, or an unreadable one
        report["warning"] = f"no Ray Tune experiment state readable in {storage} ({str(err).splitlines()[0][:160]})"
    try:
        layout.check_server(st.tracking_uri)  # seconds, not MLflow's minutes of retries, when it is gone
        client = layout.client(st.tracking_uri)
        report["parent_status"] = client.get_run(st.parent_run_id).info.status
        for run in layout.children(client, st.experiment_id, st.parent_run_id):
            trial_id = run.data.tags.get(layout.TRIAL_ID_TAG, run.info.run_id)
            row = rows.setdefault(trial_id, {"trial_id": trial_id})
            row.update(mlflow=run.info.status, run_id=run.info.run_id, variant=run.data.tags.get(layout.VARIANT_TAG))
            if run.data.tags.get(layout.ERROR_TAG):
                row["error"] = run.data.tags[layout.ERROR_TAG]
            if run.data.tags.get(layout.EARLY_STOP_TAG):
                row["mlflow"] = f"{run.info.status} (stopped early)"
            if metric in run.data.metrics:
                row["metric"] = run.data.metrics[metric]
    except LaunchError as err:
        report["warning"] = (report.get("warning", "") + f"; {err.lines[0]}").lstrip("; ")
    except Exception as err:
        report["warning"] = (report.get("warning", "") + f"; MLflow at {st.tracking_uri} unreachable: "
                             f"{str(err).splitlines()[0][:160]}").lstrip("; ")
    report["trials"] = sorted(rows.values(), key=lambda r: r["trial_id"])
    return report
