"""Export the best trial: a Ludwig-style YAML, the PEFT adapter, its TrialConfig, and a
one-trial sweep spec that `sweep run` can re-run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from sweep.errors import SweepLookupError
from sweep.tracking.layout import ADAPTER_DIR, METRICS_FILE, TRIAL_FILE
from sweep.tracking.reader import (
    Sweep,
    TrialRun,
    best_trial,
    download,
    load_sweep,
    read_json,
    require_trials,
    unflatten,
)
from trials.adapters import FAMILIES
from trials.artifacts import TRAINED_BASE_FILE
from trials.config import TrialConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass
class Exported:
    out_dir: Path
    trial: TrialRun
    config: TrialConfig
    value: float
    files: list[Path]


def trial_config(client: MlflowClient, trial: TrialRun) -> TrialConfig:
    """The trial's TrialConfig from its `trial.json` artifact (else rebuilt from its params)."""
    recorded = read_json(client, trial.run_id, TRIAL_FILE)
    try:
        if recorded is not None:
            return TrialConfig.model_validate(recorded)
    except ValidationError:
        pass
    try:  # older or partial runs: the flattened params hold the same fields
        return TrialConfig.model_validate(unflatten(dict(trial.params)))
    except ValidationError as err:
        raise SweepLookupError(
            [f"run {trial.run_id} ({trial.trial_id}) has no readable {TRIAL_FILE} artifact and its params do not "
             f"form a TrialConfig: {err.errors()[0]['msg']}"]
        ) from None


def ludwig_config(config: TrialConfig) -> dict[str, Any]:
    """The trial as a Ludwig LLM config, in the seed page's shape."""
    family = FAMILIES[config.adapter.type]
    t = config.trainer
    trainer: dict[str, Any] = {
        "type": "finetune",
        "learning_rate": t.learning_rate,
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_steps": t.max_steps,
        "learning_rate_scheduler": {"warmup_fraction": t.warmup_ratio, "decay": "cosine"},
        "optimizer": {"type": "adamw", "weight_decay": t.weight_decay},
    }
    # Written also when off: Ludwig clips at 0.5 when the key is absent.
    trainer["gradient_clipping"] = {"clipglobalnorm": t.max_grad_norm if t.max_grad_norm > 0 else None}
    # How often to evaluate, and on how many batches: Ludwig's names for eval_every and eval_batches.
    trainer["steps_per_checkpoint"] = t.eval_every
    if t.eval_batches is not None:
        trainer["eval_steps"] = t.eval_batches
    out = {
        "model_type": "llm",
        "base_model": config.model.base_model,
        "input_features": [{"name": config.data.prompt_field, "type": "text"}],
        "output_features": [{"name": config.data.response_field, "type": "text"}],
        "adapter": family.ludwig(config.adapter),
        "trainer": trainer,
        "preprocessing": {"global_max_sequence_length": config.data.max_length},
    }
    # A format string is Ludwig's prompt.template over the prompt column; `chat` and chat rows
    # have no Ludwig equivalent (the spec.yaml beside this file carries them).
    if config.data.template not in ("plain", "chat"):
        out["prompt"] = {"template": config.data.template.replace("{prompt}", "{" + config.data.prompt_field + "}")}
    return out


def _trained_base_note(config: TrialConfig) -> str:
    """What to load an adapter with that was trained on rewritten base weights (LoftQ)."""
    a = config.adapter  # LoRA fields: LoftQ is the one init that leaves a trained base
    kind = "NF4" if a.loftq_bits == 4 else "int8"
    return (
        f"# The trained PEFT adapter is in ./adapter. It was trained on the LoftQ backbone: {config.model.base_model}\n"
        f"# with its targeted weights replaced by their {kind} quantization ({a.loftq_iter} LoftQ step(s)),\n"
        f"# saved as ./adapter/{TRAINED_BASE_FILE}. On the original weights it is wrong: load it with\n"
        "# trials.artifacts.load_trained(base_model, 'adapter'), which puts those weights back first\n"
        "# (quantize that backbone to serve it in 4 or 8 bits; PeftModel.from_pretrained alone skips them).\n"
    )


def one_trial_spec(config: TrialConfig, sweep: Sweep, name: str) -> dict[str, Any]:
    """A sweep spec whose expansion is exactly this trial (absolute paths, so it runs from anywhere)."""
    original = sweep.spec or {}
    spec: dict[str, Any] = {
        "name": name,
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json", exclude_none=True),
        "search": {
            "strategy": "grid",
            "seeds": [config.seed],
            "adapters": [_type_first(config.adapter.model_dump(mode="json", exclude_none=True))],
            "trainer": config.trainer.model_dump(mode="json", exclude_none=True),
        },
        "metric": {"name": sweep.metric, "goal": sweep.goal},
        "deepspeed": config.deepspeed.model_dump(mode="json"),
        "tracking": {"uri": sweep.tracking_uri, "experiment": sweep.experiment_name},
    }
    for section in ("resources", "failure"):
        if isinstance(original.get(section), dict):
            spec[section] = original[section]
    return spec


def _type_first(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": item["type"], **{k: v for k, v in item.items() if k != "type"}}


def _yaml(data: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return (header + body) if header else body


def export_trial(client: MlflowClient, sweep: Sweep, trial: TrialRun, out_dir: str | Path, *, spec_name: str, among: int) -> Exported:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = trial_config(client, trial)
    value = trial.metrics[sweep.metric]
    if not download(client, trial.run_id, ADAPTER_DIR, out / ADAPTER_DIR):
        raise SweepLookupError([f"run {trial.run_id} ({trial.trial_id}) has no `{ADAPTER_DIR}/` artifact to export"])
    header = (
        f"# peft-sweep {sweep.name}: best of {among} finished trials by {sweep.metric} ({sweep.goal}) = {value:.6g}\n"
        f"# trial {trial.trial_id}, MLflow run {trial.run_id} at {sweep.tracking_uri}\n"
        + (_trained_base_note(config) if (out / ADAPTER_DIR / TRAINED_BASE_FILE).is_file() else
           "# The trained PEFT adapter is in ./adapter (load with PeftModel.from_pretrained).\n")
    )
    (out / "best.yaml").write_text(_yaml(ludwig_config(config), header))
    config.dump(out / "trial.json")
    spec_header = f"# One-trial sweep reproducing {trial.trial_id} of sweep {sweep.name}: `sweep run spec.yaml`.\n"
    (out / "spec.yaml").write_text(_yaml(one_trial_spec(config, sweep, spec_name), spec_header))
    files = [out / "best.yaml", out / "adapter", out / "trial.json", out / "spec.yaml"]
    if download(client, trial.run_id, METRICS_FILE, out / METRICS_FILE):
        files.append(out / METRICS_FILE)
    return Exported(out, trial, config, value, files)


def selection(table, chosen: TrialRun) -> dict[str, Any]:
    """How sure the choice is: the chosen trial, its row, and the rows the paired test could
    not tell apart from it (see sweep.results.significance)."""
    sig = table.significance or {}
    best_row = next((r for r in table.rows if r.label == sig.get("best_row")), None)
    tied = [r for r in table.rows if r.stats is not None and r.stats.tied_with_best]

    def row_json(r) -> dict[str, Any]:
        st = r.stats
        return {"row": r.label, "variant": r.variant, "best_trial_id": r.best_trial_id, "mean": st.mean if st else None,
                "ci_low": st.ci_low if st else None, "ci_high": st.ci_high if st else None,
                "n_seeds": st.n_seeds if st else 0, "p_vs_best": st.p_vs_best if st else None,
                "p_seeds": st.p_seeds if st else None}

    return {
        "sweep": table.sweep,
        "metric": {"name": table.metric, "goal": table.goal},
        "chosen": {"trial_id": chosen.trial_id, "run_id": chosen.run_id, "variant": chosen.variant,
                   "value": chosen.metrics.get(table.metric),
                   "row": row_json(best_row) if best_row is not None else None},
        "tied_with_chosen": [row_json(r) for r in tied],
        # Worse on the eval items, but other seeds might reorder them (Welch's t over seeds).
        "unsettled_by_seeds": [row_json(r) for r in table.rows if r.stats is not None and r.stats.tied_with_best is False
                               and r.stats.p_seeds is not None and r.stats.p_seeds >= sig.get("alpha", 0.05)],
        "test": {k: sig.get(k) for k in ("test", "correction", "alpha", "interval", "tested_rows")},
        "untestable_rows": sig.get("untestable_rows", []),
    }


def _dir_name(variant: str) -> str:
    return variant.replace("+", "-")


def export_best(
    client: MlflowClient, parent_run_id: str | Sweep, out_dir: str | Path, *, by_variant: bool = False,
    by: tuple[str, ...] | list[str] = (),
) -> tuple[list[Exported], dict[str, Any]]:
    """Export the best finished trial (or, with by_variant, the best of each variant into
    `out_dir/<variant>/`), and `selection.json`: the chosen trial and the rows statistically
    tied with it (rows as `sweep table --by` splits them). Returns the exports and that selection."""
    from sweep.results.table import build_table, by_problems

    sweep = parent_run_id if isinstance(parent_run_id, Sweep) else load_sweep(client, parent_run_id)
    table = build_table(client, sweep, by)
    trials = table.trials
    require_trials(trials, sweep, finished=True)
    if problems := by_problems(by, trials):
        raise SweepLookupError(problems)
    out = Path(out_dir)
    groups: dict[str, list[TrialRun]] = {}
    if by_variant:
        for t in trials:
            groups.setdefault(t.variant, []).append(t)
    else:
        groups[""] = trials
    results = []
    for variant, members in sorted(groups.items()):
        top = best_trial(members, sweep.metric, sweep.goal)
        if top is None:
            continue
        among = sum(t.finished for t in members)
        suffix = f"-{_dir_name(variant)}" if variant else ""
        results.append(
            export_trial(client, sweep, top, out / _dir_name(variant) if variant else out, spec_name=f"{sweep.name}{suffix}-best", among=among)
        )
    if not results:
        raise SweepLookupError([f"no finished trial of sweep {sweep.name!r} logged the metric {sweep.metric!r}"])
    chosen = best_trial(trials, sweep.metric, sweep.goal)
    chosen_export = next(e for e in results if e.trial.trial_id == chosen.trial_id)
    picked = selection(table, chosen)
    (chosen_export.out_dir / "selection.json").write_text(json.dumps(picked, indent=2) + "\n")
    chosen_export.files.append(chosen_export.out_dir / "selection.json")
    if by_variant:
        index = [
            {"variant": e.trial.variant, "dir": e.out_dir.name, "trial_id": e.trial.trial_id, "run_id": e.trial.run_id, sweep.metric: e.value}
            for e in results
        ]
        (out / "export.json").write_text(json.dumps({"sweep": sweep.name, "metric": sweep.metric, "goal": sweep.goal, "variants": index}, indent=2) + "\n")
    return results, picked
