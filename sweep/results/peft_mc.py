"""Finished trials as HF PEFT `method_comparison` result files.

Mirrors the key names of PEFT's MetaMathQA `log_results` (run_info / train_info /
meta_info) so PEFT's own loader (`method_comparison/processing.py`, `load_df(path,
"MetaMathQA")`) reads a sweep next to its results; docs/peft-mc.md has the key mapping.
That loader casts its integer columns with `astype(int)`, so one null there breaks the
whole folder: such values are derived (and the derivation recorded in
`meta_info.peft_sweep.sources`), and a trial that still lacks one is written with status
"incomplete", which the loader skips. Values it never reads (hub shas) stay null.
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
from sweep.tracking.reader import TrialRun, metric_value, read_json, unflatten
from trials.adapters import FAMILIES
from trials.artifacts import PACKAGES

if TYPE_CHECKING:
    from mlflow import MlflowClient

# History metrics per eval step, under PEFT-style names.
STEP_METRICS = {"eval_loss": "valid loss", "eval_token_accuracy": "valid accuracy", "train_loss": "train loss", "tokens_per_s": "tokens / sec"}
# PEFT's "test accuracy" (answers extracted from generations on a held-out test split):
# the first of ours a trial logged, closest in meaning first.
ACCURACY_SOURCES = ("test_answer_accuracy", "test_exact_match", "eval_answer_accuracy", "eval_exact_match",
                    "eval_token_accuracy")
# package_info keys PEFT's loader indexes directly; they must exist even when null.
PEFT_PACKAGES = ("peft", "transformers", "datasets", "torch", "bitsandbytes")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).isoformat(timespec="seconds")


def _int(v: float | None) -> int | None:
    return None if v is None else int(round(v))


def _measured(trial: TrialRun) -> dict[str, float]:
    # NaN (a failed measurement) as absent: their loader rounds and int-casts several columns.
    return {k: v for k in trial.metrics if (v := metric_value(trial, k)) is not None}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    if hasattr(v, "value"):  # enums such as PeftType / TaskType
        return v.value
    return str(v)


def package_info(recorded: dict[str, str] | None = None) -> dict[str, str | None]:
    """The versions the trial recorded in its metrics.json; the exporting environment's otherwise."""
    info: dict[str, str | None] = {}
    # Every package we track plus any extra recorded: a trial records only what it had installed.
    names = dict.fromkeys([*PACKAGES, *PEFT_PACKAGES, *(recorded or {})])
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


def final_metrics(trial: TrialRun, train_config: dict[str, Any],
                  setup: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str | None]]:
    """PEFT's last `train_info.metrics` entry (the one its loader reads), and the source of each value."""
    m = _measured(trial)
    trainer = train_config.get("trainer") or {}
    steps = m.get("step")
    if steps is None and not m.get("early_stopped"):
        steps = trainer.get("max_steps")
    acc = next((k for k in ACCURACY_SOURCES if k in m), None)
    entry: dict[str, Any] = {"step": _int(steps), "test accuracy": m.get(acc), "train loss": m.get("train_loss")}
    sources: dict[str, str | None] = {"test accuracy": acc, "train loss": "train_loss" if "train_loss" in m else None}

    tokens, sources["train total tokens"] = m.get("train_tokens"), "train_tokens"
    if tokens is None and "tokens_per_s" in m and "train_s" in m:
        # tokens_per_s is trained tokens per second of the training loop, train_s that loop's seconds.
        tokens, sources["train total tokens"] = m["tokens_per_s"] * m["train_s"], "tokens_per_s * train_s"
    samples, sources["train samples"] = m.get("train_samples"), "train_samples"
    world = setup.get("world_size") or (setup.get("engine") or {}).get("dp_world_size")
    if samples is None and steps is not None and trainer.get("batch_size"):
        # Runs from before train_samples existed: every optimizer step sees this many examples.
        samples = steps * trainer["batch_size"] * trainer.get("gradient_accumulation_steps", 1) * (world or 1)
        per_step = "world_size" if world else "1 (world size not recorded)"
        sources["train samples"] = f"step * batch_size * gradient_accumulation_steps * {per_step}"
    entry["train samples"], entry["train total tokens"] = _int(samples), _int(tokens)
    for key in ("train samples", "train total tokens"):
        if entry[key] is None:
            sources[key] = None
    # Absent rather than null: PEFT's loader then shows its own "not measured" default (123).
    if "forgetting" in m:
        entry["forgetting"] = m["forgetting"]
    sources["forgetting"] = "forgetting" if "forgetting" in m else None
    return entry, sources


def result_for(client: MlflowClient, trial: TrialRun, pytorch_info: str | None = None) -> dict[str, Any]:
    m = _measured(trial)
    # PEFT's TrainConfig names the base model `model_id`; our nested config follows unchanged.
    params = unflatten(trial.params)
    train_config = {"model_id": (params.get("model") or {}).get("base_model"), **params}
    total = m.get("wall_s")
    if total is None and trial.start_time and trial.end_time:
        total = (trial.end_time - trial.start_time) / 1000
    record = trial_record(client, trial)
    setup = record.get("setup") if isinstance(record.get("setup"), dict) else {}
    final, sources = final_metrics(trial, train_config, setup)
    # Our peak (CUDA allocated, or RSS on CPU) stands in for PEFT's reserved-memory average and
    # 99th percentile, which a sweep does not sample: an upper bound of both, and their loader needs ints.
    peak = _int(None if m.get("peak_memory_mb") is None else m["peak_memory_mb"] * 2**20)
    sources.update({"accelerator_memory_max": "peak_memory_mb", "accelerator_memory_reserved_avg": "peak_memory_mb",
                    "accelerator_memory_reserved_99th": "peak_memory_mb"} if peak is not None else {})
    # Without a PEFT config their loader labels the row full fine-tuning; keep at least the type.
    peft_cfg = peft_config(train_config) or {"peft_type": trial.adapter_type.upper()}
    run_info = {
        "created_at": _iso(trial.start_time),
        "total_time": total,
        "experiment_name": f"{trial.adapter_type}/{trial.trial_id}",
        "peft_branch": None,
        "train_config": train_config,
        "peft_config": peft_cfg,
        "error_msg": trial.tags.get("error", ""),
    }
    train_info = {
        "accelerator_memory_reserved_avg": peak,
        "accelerator_memory_max": peak,
        "accelerator_memory_reserved_99th": peak,
        "train_time": m.get("train_s"),
        "file_size": _int(m.get("adapter_bytes")),
        "num_trainable_params": _int(m.get("trainable_params")),
        "num_total_params": _int(m.get("total_params")),
        "status": "success" if trial.finished else "failed",
        "metrics": step_metrics(client, trial),
    }
    # Their loader reads only the last entry; the final eval is usually at the last step, so
    # the final values join that entry (as many entries as evals), else they get their own.
    history = train_info["metrics"]
    if history and final["step"] in (None, history[-1]["step"]):
        history[-1].update({k: v for k, v in final.items() if k != "step"})
    else:
        history.append(final)
    needed = {"model_id": train_config["model_id"], "total_time": total,
              **{k: train_info[k] for k in ("accelerator_memory_max", "train_time", "file_size", "num_trainable_params")},
              **{k: final[k] for k in ("train samples", "train total tokens")}}
    missing = [k for k, v in needed.items() if v is None]
    if missing and trial.finished:
        train_info["status"] = "incomplete"
        run_info["error_msg"] = "not recorded by the trial, needed by PEFT's loader: " + ", ".join(missing)
    return {
        "run_info": run_info,
        "train_info": train_info,
        "meta_info": {
            "model_info": {"sha": None, "created_at": None},
            "dataset_info": {
                split: {"sha": None, "created_at": None, "path": train_config.get("data", {}).get(split)}
                for split in ("train", "eval", "test")
                if train_config.get("data", {}).get(split)
            },
            "package_info": package_info(record.get("versions") if isinstance(record.get("versions"), dict) else None),
            "system_info": system_info(setup),
            "pytorch_info": pytorch_info,
            # Ours, ignored by PEFT: which of our metrics each PEFT value came from (None: not measured).
            "peft_sweep": {"run_id": trial.run_id, "trial_id": trial.trial_id, "variant": trial.variant, "sources": sources},
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
