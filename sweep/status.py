"""`sweep status`: a sweep's trials, from Ray Tune's experiment state and the MLflow runs."""

from __future__ import annotations

import logging
from typing import Any

from sweep import state as sweep_state
from sweep import tracking


def _tune_trials(storage: str) -> list[dict[str, Any]]:
    """Trials as Tune last recorded them (no Ray runtime needed)."""
    import os

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    for name in ("ray", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(storage)
    out = []
    for trial in analysis.trials:
        cfg = trial.config.get("trial") if isinstance(trial.config, dict) else None
        last = trial.last_result or {}
        out.append({
            "tune_trial_id": trial.trial_id,
            "trial_id": (cfg or {}).get("trial_id") or str(trial),
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
        from sweep.spec import load_spec

        spec, _ = load_spec(st.spec_path)
        report["metric"] = spec.metric.name
    except Exception:
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
        client = tracking.client(st.tracking_uri)
        report["parent_status"] = client.get_run(st.parent_run_id).info.status
        for run in tracking.children(client, st.experiment_id, st.parent_run_id):
            trial_id = run.data.tags.get("trial_id", run.info.run_id)
            row = rows.setdefault(trial_id, {"trial_id": trial_id})
            row.update(mlflow=run.info.status, run_id=run.info.run_id, variant=run.data.tags.get("adapter.variant"))
            if run.data.tags.get("error"):
                row["error"] = run.data.tags["error"]
            if run.data.tags.get(tracking.EARLY_STOP_TAG):
                row["mlflow"] = f"{run.info.status} (stopped early)"
            if metric in run.data.metrics:
                row["metric"] = run.data.metrics[metric]
    except Exception as err:
        report["warning"] = (report.get("warning", "") + f"; MLflow at {st.tracking_uri} unreachable: "
                             f"{str(err).splitlines()[0][:160]}").lstrip("; ")
    report["trials"] = sorted(rows.values(), key=lambda r: r["trial_id"])
    return report
