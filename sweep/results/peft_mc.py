"""Finished trials as HF PEFT `method_comparison` result files.

Mirrors the key names of PEFT's MetaMathQA `log_results` (run_info / train_info /
meta_info) so PEFT's comparison tooling can read a sweep next to its own results. What
a sweep does not measure (reserved-memory averages, model/dataset hub shas) is null.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweep.results.table import Table
from sweep.tracking.layout import METRICS_FILE
from sweep.tracking.reader import TrialRun, read_json, unflatten
from trials.adapters import FAMILIES
from trials.artifacts import PACKAGES

if TYPE_CHECKING:
    from mlflow import MlflowClient

# History metrics per eval step, under PEFT-style names.
STEP_METRICS = {"eval_loss": "valid loss", "eval_token_accuracy": "valid accuracy", "train_loss": "train loss", "tokens_per_s": "tokens / sec"}


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).isoformat(timespec="seconds")


def _int(v: float | None) -> int | None:
    return None if v is None else int(round(v))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    if hasattr(v, "value"):  # enums such as PeftType / TaskType
        return v.value
    return str(v)


def package_info(recorded: dict[str, str] | None = None) -> dict[str, str | None]:
    """The versions the trial recorded in its metrics.json; the exporting environment's otherwise."""
    info: dict[str, str | None] = {}
    names = list(recorded) if recorded else list(PACKAGES)
    for name in names:
        if recorded:
            info[f"{name}-version"] = recorded.get(name)
        else:
            try:
                info[f"{name}-version"] = metadata.version(name)
            except metadata.PackageNotFoundError:
                info[f"{name}-version"] = None
        info[f"{name}-commit-hash"] = None
    return info


def system_info(setup: dict[str, Any]) -> dict[str, str | None]:
    # Platform fields describe the exporting machine; the trial recorded only its device.
    return {
        "system": platform.system(),
        "release": platform.release(),
        "version": platform.version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "accelerator": setup.get("device"),
    }


def trial_record(client: MlflowClient, trial: TrialRun) -> dict[str, Any]:
    """The trial's own metrics.json artifact (versions, setup), or {} when it has none."""
    data = read_json(client, trial.run_id, METRICS_FILE)
    return data if isinstance(data, dict) else {}


def peft_config(train_config: dict[str, Any]) -> dict[str, Any] | None:
    """The PEFT config the catalogue builds for the trial's adapter (no model or data needed)."""
    adapter = train_config.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("type") not in FAMILIES:
        return None
    family = FAMILIES[adapter["type"]]
    try:
        fields = family.fields.model_validate({k: v for k, v in adapter.items() if v is not None})
        cfg = family.peft_config(fields).to_dict()
    except Exception:
        return None
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = (train_config.get("model") or {}).get("base_model")
    return json.loads(json.dumps(cfg, default=_jsonable))


def step_metrics(client: MlflowClient, trial: TrialRun) -> list[dict[str, Any]]:
    """One entry per evaluation step, as PEFT's `train_info.metrics`."""
    histories = {}
    for key in STEP_METRICS:
        if key in trial.metrics:
            histories[key] = {m.step: m.value for m in client.get_metric_history(trial.run_id, key)}
    eval_steps = sorted(histories.get("eval_loss", {}))
    out = []
    for step in eval_steps:
        entry: dict[str, Any] = {"step": step}
        for key, label in STEP_METRICS.items():
            if step in histories.get(key, {}):
                entry[label] = histories[key][step]
        out.append(entry)
    return out


def result_for(client: MlflowClient, trial: TrialRun, pytorch_info: str | None = None) -> dict[str, Any]:
    m = trial.metrics
    train_config = unflatten(trial.params)
    total = m.get("wall_s")
    if total is None and trial.start_time and trial.end_time:
        total = (trial.end_time - trial.start_time) / 1000
    peak = m.get("peak_memory_mb")
    record = trial_record(client, trial)
    setup = record.get("setup") if isinstance(record.get("setup"), dict) else {}
    return {
        "run_info": {
            "created_at": _iso(trial.start_time),
            "total_time": total,
            "experiment_name": f"{trial.adapter_type}/{trial.trial_id}",
            "peft_branch": None,
            "train_config": train_config,
            "peft_config": peft_config(train_config),
            "error_msg": trial.tags.get("error", ""),
        },
        "train_info": {
            "accelerator_memory_reserved_avg": None,
            "accelerator_memory_max": None if peak is None else int(peak * 2**20),
            "accelerator_memory_reserved_99th": None,
            "train_time": m.get("train_s"),
            "file_size": _int(m.get("adapter_bytes")),
            "num_trainable_params": _int(m.get("trainable_params")),
            "num_total_params": _int(m.get("total_params")),
            "status": "success" if trial.finished else "failed",
            "metrics": step_metrics(client, trial),
        },
        "meta_info": {
            "model_info": {"sha": None, "created_at": None},
            "dataset_info": {
                split: {"sha": None, "created_at": None, "path": train_config.get("data", {}).get(split)}
                for split in ("train", "eval")
                if train_config.get("data", {}).get(split)
            },
            "package_info": package_info(record.get("versions") if isinstance(record.get("versions"), dict) else None),
            "system_info": system_info(setup),
            "pytorch_info": pytorch_info,
        },
    }


def write_results(client: MlflowClient, table: Table, out_dir: str | Path) -> list[Path]:
    """One `<adapter>--<trial_id>.json` per finished trial, as PEFT names its result files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        torch_config = torch.__config__.show()
    except Exception:
        torch_config = None
    paths = []
    for trial in table.trials:
        if not trial.finished:
            continue
        data = result_for(client, trial, torch_config)
        path = out / f"{data['run_info']['experiment_name'].replace('/', '--')}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        paths.append(path)
    return paths
