"""Expand a sweep spec into concrete, deterministic TrialConfigs."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sweep.spec.messages import field_path
from sweep.spec.schema import Distribution, SweepSpec, is_scalar
from trials.adapters import FAMILIES
from trials.config import DataConfig, ModelConfig, TrainerConfig, TrialConfig
from trials.sources import is_hub_dataset


@dataclass(frozen=True)
class Candidate:
    """One concrete adapter configuration from a spec item, with its trainer space."""

    item: int
    adapter: dict[str, Any]
    trainer: dict[str, Any]  # field -> list of grid values or a Distribution

    def label(self) -> str:
        keys = [k for k, v in self.adapter.items() if k != "type" and v not in (None, [], {})]
        return f"search.adapters[{self.item}] ({self.adapter['type']} " + " ".join(f"{k}={self.adapter[k]}" for k in keys) + ")"


@dataclass(frozen=True)
class Rejected:
    """A combination that cannot become a trial, with one line per reason."""

    where: str
    lines: list[str]
    trial_id: str | None = None


@dataclass
class Expansion:
    trials: list[TrialConfig] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    inputs: TrialInputs | None = None


def _product(values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


def _item_trainer(spec: SweepSpec, item: Any) -> dict[str, Any]:
    merged = {name: getattr(spec.search.trainer, name) for name in type(spec.search.trainer).model_fields}
    if item.trainer is not None:
        merged.update({name: getattr(item.trainer, name) for name in item.trainer.model_fields_set})
    return merged


def candidates(spec: SweepSpec) -> tuple[list[Candidate], list[Rejected]]:
    """Every concrete adapter configuration, validated against its family's model."""
    out: list[Candidate] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(spec.search.adapters):
        family = FAMILIES[item.type]
        grid = {name: getattr(item, name) for name in family.fields.model_fields if name != "type"}
        grid_fields = {n: v for n, v in grid.items() if n in _grid_names(item)}
        fixed = {n: v for n, v in grid.items() if n not in grid_fields}
        trainer = _item_trainer(spec, item)
        for combo in _product(grid_fields):
            values = {"type": item.type, **fixed, **combo}
            try:
                adapter = family.fields.model_validate(values).model_dump(mode="json")
            except ValidationError as err:
                where = Candidate(i, values, trainer).label()
                lines = [f"{field_path(('search', 'adapters', i, *e['loc']))}: {_clean(e['msg'])}" for e in err.errors()]
                rejected.append(Rejected(where, lines))
                continue
            out.append(Candidate(i, adapter, trainer))
    return out, rejected


def _grid_names(item: Any) -> set[str]:
    """Fields of a spec item that hold grid lists (scalars in the concrete model)."""
    fields = FAMILIES[item.type].fields.model_fields
    return {name for name, info in fields.items() if name != "type" and is_scalar(info.annotation)}


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def resolve_model(base_model: str, spec_dir: Path) -> str:
    local = spec_dir / base_model
    if base_model.startswith((".", "/", "~")) or local.exists():
        return str(local.expanduser().resolve()) if not base_model.startswith("/") else base_model
    return base_model


def _resolve_data(data: DataConfig, spec_dir: Path) -> DataConfig:
    def resolve(p: str | None) -> str | None:
        if p is None or is_hub_dataset(p, spec_dir):
            return p  # a dataset id stays one: every worker reads its own HF cache
        return str((spec_dir / Path(p).expanduser()).resolve())

    return data.model_copy(update={name: resolve(getattr(data, name)) for name in DATA_FILES})


# The data fields that name files (resolved against the spec's folder).
DATA_FILES = ("train", "eval", "test", "forgetting")


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of a spec shares: model, data and DeepSpeed settings as written in the
    spec (they enter the trial id, so ids do not depend on where the spec lives) and the model
    and data with their paths resolved (what the trial runs on). Plain pydantic models, so a
    launch can ship them to the processes that build trials from sampled values."""

    model: ModelConfig
    data: DataConfig
    deepspeed: Any
    resolved: dict[str, Any]
    evaluation: Any = None


def trial_inputs(spec: SweepSpec, spec_dir: Path) -> TrialInputs:
    model = spec.model.model_copy(update={"base_model": resolve_model(spec.model.base_model, spec_dir)})
    return TrialInputs(spec.model, spec.data, spec.deepspeed, {"model": model, "data": _resolve_data(spec.data, spec_dir)},
                       spec.evaluation)


def build_trial(inputs: TrialInputs, adapter: dict[str, Any], trainer: dict[str, Any], seed: int) -> TrialConfig:
    """A TrialConfig whose id comes from the spec as written, so it is the same on any machine."""
    as_written = TrialConfig(
        model=inputs.model,
        data=inputs.data,
        adapter=adapter,
        trainer=TrainerConfig(**trainer),
        seed=seed,
        deepspeed=inputs.deepspeed,
        **({"evaluation": inputs.evaluation} if inputs.evaluation is not None else {}),
    ).with_id()
    return as_written.model_copy(update=inputs.resolved)


def _sample(value: Any, rng: random.Random) -> Any:
    if isinstance(value, Distribution):
        if value.distribution == "choice":
            return rng.choice(value.values)
        if value.distribution == "uniform":
            return rng.uniform(value.low, value.high)
        return math.exp(rng.uniform(math.log(value.low), math.log(value.high)))
    return rng.choice(value)


def expand(spec: SweepSpec, spec_dir: Path) -> Expansion:
    """All trials of the spec: the grid, or `num_samples` seeded random draws.

    For optuna the trials are chosen while the sweep runs; the expansion then holds the
    candidates (every adapter configuration, each checked by the plan) and no trials.
    """
    cands, rejected = candidates(spec)
    inputs = trial_inputs(spec, spec_dir)
    result = Expansion(rejected=rejected, candidates=cands, inputs=inputs)
    seen: set[str] = set()

    def add(adapter: dict, trainer: dict, seed: int) -> None:
        try:
            trial = build_trial(inputs, adapter, trainer, seed)
        except ValidationError as err:
            # The field and the value, not the whole combination (schema checks grid values
            # already; this catches values sampled from a distribution).
            lines = [f"search.trainer.{field_path(tuple(e['loc']))}: {_clean(e['msg'])} (got {e.get('input')!r})"
                     for e in err.errors()]
            result.rejected.append(Rejected("sampled trainer values", lines))
            return
        if trial.trial_id not in seen:
            seen.add(trial.trial_id)
            result.trials.append(trial)

    if spec.search.strategy == "grid":
        for cand in cands:
            for trainer in _product(cand.trainer):
                for seed in spec.search.seeds:
                    add(cand.adapter, trainer, seed)
    elif spec.search.strategy == "random" and cands:
        # A local RNG keyed by the sweep name: the same spec samples the same trials anywhere.
        rng = random.Random(f"peft-sweep:{spec.name}")
        for _ in range(spec.search.num_samples or 0):
            cand = rng.choice(cands)
            trainer = {name: _sample(value, rng) for name, value in cand.trainer.items()}
            for seed in spec.search.seeds:
                add(cand.adapter, trainer, seed)
    return result
