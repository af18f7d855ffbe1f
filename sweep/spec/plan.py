"""Shape preflight: check every trial against the real model's modules before any compute.

The base model is built once on the meta device from its config (no weights are read);
each distinct adapter configuration is then wrapped by PEFT on a fresh meta copy, which
gives the exact trainable-parameter count and the modules the adapter really targets.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep.errors import SpecError
from sweep.spec.data_check import DataReport, check_data, load_plan_tokenizer, weight_problems
from sweep.spec.estimate import Estimate, estimate_trial
from sweep.spec.expand import DATA_FILES, Candidate, Expansion, Rejected, expand, resolve_model
from sweep.spec.schema import SweepSpec
from trials.adapters import FAMILIES, Issue, PlanContext, TargetShape
from trials.config import TrialConfig
from trials.sources import is_hub_dataset


@dataclass(frozen=True)
class AdapterCheck:
    """What the preflight learned about one adapter configuration."""

    trainable: int = 0
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    targets: int = 0
    # What the initializer holds while calibrating (CorDA), by the trial's dtype bytes (2 or 4).
    calibration_bytes: tuple[tuple[int, int], ...] = ()


@dataclass
class TrialPlan:
    trial: TrialConfig
    trainable: int
    base_params: int
    warnings: tuple[str, ...] = ()
    estimate: Estimate | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base_params if self.base_params else 0.0


@dataclass
class Plan:
    """The checked sweep. It keeps its expansion, so a launch runs exactly what was planned."""

    spec: SweepSpec
    spec_dir: Path
    base_params: int
    expansion: Expansion
    trials: list[TrialPlan] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    candidates: list[tuple[dict[str, Any], AdapterCheck]] = field(default_factory=list)  # one per expansion candidate
    data: list[DataReport] = field(default_factory=list)  # each data file, read once
    data_check_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.rejected

    def valid_candidates(self) -> list[Candidate]:
        """The expansion's adapter configurations that passed the shape checks (what Optuna picks from)."""
        return [cand for cand, (_, check) in zip(self.expansion.candidates, self.candidates) if not check.errors]

    def totals(self) -> dict[str, Any]:
        """The sweep's estimated tokens and device-hours (grid/random: every planned trial)."""
        est = [t.estimate for t in self.trials if t.estimate is not None]
        hours = [e.device_hours for e in est if e.device_hours is not None]
        return {"tokens": sum(e.tokens for e in est), "device_hours": sum(hours) if hours else None,
                "peak_memory_mb": max((e.peak_memory_mb for e in est), default=None),
                "trials_that_do_not_fit": sum(e.fits is False for e in est)}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "strategy": self.spec.search.strategy,
            "base_params": self.base_params,
            "trials": [
                {
                    "trial_id": t.trial.trial_id,
                    "variant": FAMILIES[t.trial.adapter.type].variant(t.trial.adapter),
                    "trainable_params": t.trainable,
                    "percent_trainable": round(t.percent, 6),
                    "warnings": list(t.warnings),
                    "estimate": t.estimate.to_json() if t.estimate is not None else None,
                    "config": t.trial.model_dump(mode="json"),
                }
                for t in self.trials
            ],
            "invalid": [{"where": r.where, "trial_id": r.trial_id, "errors": r.lines} for r in self.rejected],
            "data": [r.to_json() for r in self.data],
            "totals": self.totals(),
            "candidates": [
                {"adapter": a, "trainable_params": c.trainable, "errors": list(c.errors), "warnings": list(c.warnings)}
                for a, c in self.candidates
            ],
        }


class ModelShapes:
    """Builds meta-device copies of one base model and checks adapters against it."""

    def __init__(self, base_model: str, trust_remote_code: bool = False):
        self.config = load_model_config(base_model, trust_remote_code)
        self.trust_remote_code = trust_remote_code
        self.base_params = sum(p.numel() for p in self._meta_model().parameters())

    def _meta_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(self.config, trust_remote_code=self.trust_remote_code)

    def check(self, adapter: Any, ctx: PlanContext) -> AdapterCheck:
        family = FAMILIES[adapter.type]
        issues: list[Issue] = list(family.check(adapter, ctx))
        trainable, targets = 0, []
        try:
            config = family.peft_config(adapter, for_count=True)
        except (ValueError, TypeError) as err:
            issues.append(Issue("type", f"PEFT rejects this config: {err}"))
            config = None
        if config is not None:
            model = self._meta_model()
            targets = matched_targets(model, config)
            if not targets:
                issues.append(
                    Issue("target_modules", f"{config.target_modules} match no module of the base model",
                          "name modules that exist in the base model, e.g. q_proj, v_proj")
                )
            else:
                issues.extend(family.check_shapes(adapter, targets))
            # Our own shape errors are clearer than what PEFT raises for the same mistake.
            if targets and not any(i.severity == "error" for i in issues):
                try:
                    trainable = self._count(model, config, family, adapter, targets)
                except (ValueError, RuntimeError, TypeError, KeyError) as err:
                    issues.append(_wrap_issue(err))
        return AdapterCheck(
            trainable=trainable,
            errors=tuple(i.line() for i in issues if i.severity == "error"),
            warnings=tuple(i.line() for i in issues if i.severity == "warning"),
            targets=len(targets),
            calibration_bytes=tuple((b, family.calibration_bytes(adapter, targets, b)) for b in (2, 4)),
        )

    def _count(self, model: Any, config: Any, family: Any, adapter: Any, targets: list[TargetShape]) -> int:
        from peft import get_peft_model

        counted = family.count_trainable(adapter, targets)
        if counted is not None:
            return counted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)
        return peft_model.get_nb_trainable_parameters()[0]


def matched_targets(model: Any, config: Any) -> list[TargetShape]:
    """The modules PEFT would wrap, found with PEFT's own matching, without wrapping."""
    import copy

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import check_target_module_exists

    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    resolved = tuner._prepare_adapter_config(tuner, copy.deepcopy(config), model.config.to_dict())
    targets = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not check_target_module_exists(resolved, name):
            continue
        shape = tuple(weight.shape)
        out_f, in_f = (shape[0], shape[1]) if len(shape) >= 2 else (shape[0], shape[0])
        targets.append(TargetShape(name, int(in_f), int(out_f)))
    return targets


def _wrap_issue(err: Exception) -> Issue:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Target modules" in text or "target_modules" in text:
        return Issue("target_modules", text, "name modules that exist in the base model, e.g. q_proj, v_proj")
    return Issue("type", f"PEFT cannot build this adapter: {text}")


def load_model_config(base_model: str, trust_remote_code: bool = False):
    """The model's config from a local folder or the local HF cache; never blocks on the network."""
    from transformers import AutoConfig

    local = Path(base_model)
    try:
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise SpecError([f"model.base_model: {base_model} has no config.json; point it at a saved model folder"])
            return AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        return AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code, local_files_only=True)
    except SpecError:
        raise
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise SpecError(
            [
                f"model.base_model: cannot load the config of {base_model!r} from a local folder or the local HF cache "
                f"({first[:160]}); give a local model folder (the folder with config.json), or download it first "
                "with `huggingface-cli download`"
            ]
        ) from None


def _check_data(spec: SweepSpec, spec_dir: Path) -> list[str]:
    lines = []
    for name in DATA_FILES:
        value = getattr(spec.data, name)
        if value is not None and not is_hub_dataset(value, spec_dir) and not (spec_dir / Path(value).expanduser()).exists():
            lines.append(f"data.{name}: file not found: {value} (relative paths resolve against {spec_dir})")
    return lines


def _largest_batch(spec: SweepSpec, expansion: Expansion) -> int:
    if expansion.trials:
        return max(t.trainer.batch_size for t in expansion.trials)
    values = spec.search.trainer.batch_size
    return max(values) if isinstance(values, list) else 1


def make_plan(spec: SweepSpec, spec_dir: Path, *, expansion: Expansion | None = None,
              config_only: bool = False) -> Plan:
    """Expand the spec and check every trial; raises SpecError for problems of the whole spec
    (data, weights). `config_only` checks shapes from config.json alone: no weights needed,
    and tokens are counted only when the folder has a tokenizer."""
    problems = _check_data(spec, spec_dir)
    if problems:
        raise SpecError(problems)
    expansion = expansion or expand(spec, spec_dir)
    model_path = resolve_model(spec.model.base_model, spec_dir)
    try:
        shapes = ModelShapes(model_path, spec.model.trust_remote_code)
    except SpecError as e:
        if not Path(model_path).is_absolute():
            e.lines[0] += f" (no folder {spec_dir / spec.model.base_model} either)"
        raise
    model = expansion.inputs.resolved["model"]
    problems = [] if config_only else weight_problems(model_path)
    tokenizer, no_tokenizer = load_plan_tokenizer(model)
    if tokenizer is None and not config_only:
        problems.append(no_tokenizer)
    started = time.perf_counter()
    reports, data_problems = check_data(expansion.inputs.resolved["data"], tokenizer,
                                        workers=spec.resources.workers_per_trial,
                                        batch_size=_largest_batch(spec, expansion))
    if problems + data_problems:
        raise SpecError(problems + data_problems)
    ctx = PlanContext(gpus=spec.resources.gpus_per_worker > 0)

    checks: dict[str, AdapterCheck] = {}
    plan = Plan(spec=spec, spec_dir=spec_dir, base_params=shapes.base_params, expansion=expansion,
                rejected=list(expansion.rejected), data=reports, data_check_s=time.perf_counter() - started)

    def check(adapter: Any) -> AdapterCheck:
        key = json.dumps(adapter.model_dump(mode="json") if hasattr(adapter, "model_dump") else adapter, sort_keys=True)
        if key not in checks:
            checks[key] = shapes.check(adapter, ctx)
        return checks[key]

    for cand in expansion.candidates:
        fields = FAMILIES[cand.adapter["type"]].fields.model_validate(cand.adapter)
        result = check(fields)
        plan.candidates.append((cand.adapter, result))
        if result.errors and spec.search.strategy != "grid":
            plan.rejected.append(Rejected(cand.label(), list(result.errors)))
    for trial in expansion.trials:
        result = check(trial.adapter)
        if result.errors:
            plan.rejected.append(Rejected(f"trial {trial.trial_id}", list(result.errors), trial.trial_id))
        else:
            plan.trials.append(TrialPlan(trial, result.trainable, shapes.base_params, result.warnings,
                                         _estimate(spec, trial, shapes, result, reports)))
    return plan


def _estimate(spec: SweepSpec, trial: TrialConfig, shapes: ModelShapes, check: AdapterCheck,
              reports: list[DataReport]) -> Estimate:
    train = next((r for r in reports if r.role == "train"), None)
    per_example = (train.tokens / train.examples) if train is not None and train.tokens else trial.data.max_length
    r = spec.resources
    return estimate_trial(trial, shapes.config, shapes.base_params, check.trainable, workers=r.workers_per_trial,
                          gpus=r.gpus_per_worker > 0, tokens_per_example=per_example, gpu_memory_gb=r.gpu_memory_gb,
                          gpu_peak_tflops=r.gpu_peak_tflops, mfu=r.assumed_mfu,
                          calibration_bytes=dict(check.calibration_bytes))
