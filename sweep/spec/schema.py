"""The sweep spec: a strict Pydantic model of the YAML a user writes.

Adapter items and the trainer block are derived from the concrete models in `trials`
(the catalogue is the only place that knows an adapter family): every scalar field may
also be given as a list of grid values, and trainer fields may take a distribution.
"""

from __future__ import annotations

import functools
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BeforeValidator, Discriminator, Field, Tag, ValidationError, create_model, field_validator,
                      model_validator)

from sweep.errors import SpecError
from sweep.spec.messages import validation_lines
from trials.adapters import FAMILIES
from trials.config import DataConfig, DeepSpeedConfig, EvaluationConfig, ModelConfig, TrainerConfig
from trials.metrics import EVERY_EVALUATION, GENERATED, METRICS, RANKABLE
from trials.strict import Strict


class Distribution(Strict):
    distribution: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("a choice distribution needs a non-empty `values` list")
        else:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError(f"a {self.distribution} distribution needs low < high")
            if self.distribution == "loguniform" and self.low <= 0:
                raise ValueError("a loguniform distribution needs low > 0")
        return self


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _grid_or_dist(value: Any) -> str:
    return "distribution" if isinstance(value, dict) else "grid"


_SCALARS = (int, float, bool, str)


def is_scalar(annotation: Any) -> bool:
    if annotation in _SCALARS:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and is_scalar(args[0])
    return False


def _grid_type(annotation: Any, with_distribution: bool) -> Any:
    grid = Annotated[list[annotation], BeforeValidator(_as_list), Field(min_length=1)]
    if not with_distribution:
        return grid
    return Annotated[
        Union[Annotated[grid, Tag("grid")], Annotated[Distribution, Tag("distribution")]],
        Discriminator(_grid_or_dist),
    ]


def _grid_fields(concrete: type[Strict], with_distribution: bool) -> dict[str, Any]:
    """Fields of `concrete` where each scalar also accepts a list (and a distribution)."""
    fields: dict[str, Any] = {}
    for name, info in concrete.model_fields.items():
        if name == "type":
            continue
        default: Any = info.default_factory() if info.default_factory else info.default
        if is_scalar(info.annotation):
            # Each grid value keeps the concrete field's constraints (batch_size >= 1, ...), so a
            # bad value is refused in the first validation pass, named by its field.
            item = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            fields[name] = (_grid_type(item, with_distribution), Field([default], description=info.description))
        else:
            fields[name] = (info.annotation, Field(default, description=info.description))
    return fields


TrainerSpec = create_model(
    "TrainerSpec",
    __base__=Strict,
    __doc__="Trainer settings; each value may be a scalar, a list of grid values or a distribution.",
    **_grid_fields(TrainerConfig, with_distribution=True),
)


@functools.cache
def adapter_spec_model(family_name: str) -> type[Strict]:
    family = FAMILIES[family_name]
    model = create_model(
        f"{family.fields.__name__.removesuffix('Fields')}Spec",
        __base__=Strict,
        __doc__=family.key_strength,
        type=(Literal[family_name], ...),
        trainer=(TrainerSpec | None, Field(None, description="Overrides the shared search.trainer for this adapter.")),
        **_grid_fields(family.fields, with_distribution=False),
    )
    model.unknown_key_hints = family.fields.unknown_key_hints
    return model


AdapterSpec = Annotated[Union[tuple(adapter_spec_model(n) for n in FAMILIES)], Field(discriminator="type")]


class SearchSpec(Strict):
    strategy: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int | None = Field(None, ge=1, description="Trials to sample (random and optuna strategies).")
    seeds: Annotated[list[int], BeforeValidator(_as_list), Field(min_length=1)] = [0]
    adapters: list[AdapterSpec] = Field(min_length=1)
    trainer: TrainerSpec = TrainerSpec()  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _samples_match_strategy(self) -> SearchSpec:
        if self.strategy == "grid" and self.num_samples is not None:
            raise ValueError("num_samples applies to random/optuna; a grid runs every combination (remove num_samples)")
        if self.strategy != "grid" and self.num_samples is None:
            raise ValueError(f"strategy {self.strategy} needs num_samples (how many trials to sample)")
        if self.strategy == "grid":
            for where, trainer in self._trainers():
                for name in type(trainer).model_fields:
                    if isinstance(getattr(trainer, name), Distribution):
                        raise ValueError(
                            f"{where}.{name} is a distribution, which a grid cannot enumerate; "
                            "use a list of values or strategy: random/optuna"
                        )
        return self

    def _trainers(self):
        yield "search.trainer", self.trainer
        for i, item in enumerate(self.adapters):
            if item.trainer is not None:
                yield f"search.adapters[{i}].trainer", item.trainer


class MetricSpec(Strict):
    name: str = Field("eval_loss", description="What ranks the trials: a metric of the eval split (trials.metrics).")
    goal: Literal["minimize", "maximize"] = Field("minimize", description="Defaults to the metric's own direction.")

    @model_validator(mode="before")
    @classmethod
    def _default_goal(cls, data: Any) -> Any:
        if isinstance(data, dict) and "goal" not in data:
            known = METRICS.get(data.get("name", "eval_loss"))
            if known is not None and known.goal != "none":
                data = {**data, "goal": known.goal}
        return data

    @field_validator("name")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        quality = ", ".join(RANKABLE[:4])
        if name not in METRICS:
            raise ValueError(f"no trial reports {name!r}; use {quality}, or a cost such as tokens_per_s or "
                             "peak_memory_mb")
        if name.startswith("test_"):
            raise ValueError(f"{name} is measured on data.test to report beside the ranking, never to rank (that "
                             f"would select on the test set); use {name.replace('test_', 'eval_', 1)}")
        if METRICS[name].goal == "none":
            raise ValueError(f"{name} has no better direction; use {quality}")
        return name

    @field_validator("goal")
    @classmethod
    def _goal_matches(cls, goal: str, info) -> str:
        name = info.data.get("name")
        direction = METRICS[name].goal if name in METRICS else goal
        if goal != direction:
            raise ValueError(f"{name} is better when {'lower' if direction == 'minimize' else 'higher'}; use goal: "
                             f"{direction} (or leave goal out)")
        return goal


class FifoScheduler(Strict):
    type: Literal["fifo"] = "fifo"


class AshaScheduler(Strict):
    type: Literal["asha"]
    grace_period: int = Field(1, ge=1, description="Reports (every eval_every steps) before a trial may be stopped.")
    reduction_factor: float = Field(3, gt=1)
    max_t: int | None = Field(None, ge=1, description="Reports after which every trial stops; default max_steps / eval_every.")


class ResourcesSpec(Strict):
    workers_per_trial: int = Field(2, ge=1, description="Ray Train workers (DeepSpeed processes) per trial.")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0, description="0 (CPU workers) or 1 (one GPU per DeepSpeed rank).")
    max_concurrent_trials: int = Field(1, ge=1)
    reuse_workers: bool = Field(
        True, description="Keep each trial's worker processes (and their process group and imports) for the next "
                          "trial; false starts a fresh Ray Train run per trial (full isolation, ~17 s more per trial).")
    keep_base_model: bool = Field(
        True, description="On kept workers, keep the base model loaded for the next trial that uses the same one "
                          "(same dtype and attention implementation, ZeRO 0-2): the adapter is removed and any base "
                          "weights its initializer rewrote are restored, instead of reading the model again.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory of one GPU, for the plan's fits/does-not-fit "
                                                             "verdict (unknown when unset).")
    gpu_peak_tflops: float = Field(989.0, gt=0, description="Dense bf16 peak of one GPU for the device-hour estimate "
                                                            "(989: H100 SXM; 1979 is its sparse figure).")
    assumed_mfu: float = Field(0.35, gt=0, le=1, description="Model FLOPs utilisation assumed by the device-hour estimate.")
    collective_timeout_s: float = Field(
        1800, gt=0, description="How long a worker waits in a collective (all-reduce, barrier) before the trial "
                                "fails: torch.distributed's timeout, 30 minutes as in Ray Train.")
    pending_timeout_s: float = Field(
        600, ge=0, description="On a cluster: how long a trial may wait for resources the cluster does not have "
                               "free before the sweep stops (exit 2); 0 waits forever (an autoscaling cluster).")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, value: float) -> float:
        # A fraction puts two ranks of one trial on one GPU (NCCL refuses duplicate devices);
        # more than one leaves GPUs idle, since a rank drives one device.
        if value not in (0, 1):
            raise ValueError("use 0 (CPU workers) or 1 (one GPU per DeepSpeed rank); for more GPUs per trial "
                             "raise workers_per_trial")
        return value


class BudgetSpec(Strict):
    max_trials: int | None = Field(None, ge=1, description="Start no more than this many trials.")
    max_device_hours: float | None = Field(
        None, gt=0, description="Start no trial that would take the sweep past this many device-hours (measured on "
                                "finished and running trials, plus the plan's estimate for the next).")
    max_wall_hours: float | None = Field(None, gt=0, description="Start no trial expected to end after this many "
                                                                 "hours of the sweep's wall time.")

    def limits(self) -> dict[str, float | None]:
        return self.model_dump()

    def limited(self) -> bool:
        return any(v is not None for v in self.limits().values())


class FailureSpec(Strict):
    max_failures: int = Field(0, ge=-1, description="Retries of a failed trial (-1: forever).")


class TrackingSpec(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; a relative sqlite path resolves against the spec's folder.")
    experiment: str | None = Field(None, description="MLflow experiment; defaults to the sweep name.")


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Sweep name (letters, digits, _ . -).")
    model: ModelConfig
    data: DataConfig
    search: SearchSpec
    metric: MetricSpec = MetricSpec()
    scheduler: Annotated[Union[FifoScheduler, AshaScheduler], Field(discriminator="type")] = FifoScheduler()
    resources: ResourcesSpec = ResourcesSpec()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    tracking: TrackingSpec = TrackingSpec()
    failure: FailureSpec = FailureSpec()
    evaluation: EvaluationConfig = EvaluationConfig()
    budget: BudgetSpec = BudgetSpec()

    @model_validator(mode="after")
    def _metric_is_measured(self) -> SweepSpec:
        name, ev = self.metric.name, self.evaluation
        if name in GENERATED and not ev.generate:
            raise ValueError(f"metric.name: {name} is measured by generation; set evaluation.generate: true")
        if name.endswith("_answer_accuracy") and ev.answer_pattern is None:
            raise ValueError(f"metric.name: {name} compares extracted answers; set evaluation.answer_pattern "
                             "(a regex whose group is the answer)")
        if name.startswith("forgetting") and self.data.forgetting is None:
            raise ValueError(f"metric.name: {name} needs data.forgetting (a text file)")
        if self.scheduler.type == "asha" and name in GENERATED and ev.generate_at != "every":
            raise ValueError(f"scheduler: ASHA compares {name} at every evaluation; set evaluation.generate_at: every "
                             "(or rank by eval_loss)")
        if self.scheduler.type == "asha" and name not in EVERY_EVALUATION | GENERATED:
            raise ValueError(f"scheduler: ASHA needs a metric reported at every evaluation, and {name} is measured "
                             f"once at the end; use one of {', '.join(sorted(EVERY_EVALUATION))}")
        return self


def load_spec(path: str | Path) -> tuple[SweepSpec, Path]:
    """Parse and validate a spec file; returns the spec and the folder relative paths resolve against."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"spec: file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"spec: malformed YAML{where}: {getattr(err, 'problem', err)}"]) from None
    if not isinstance(raw, dict):
        raise SpecError(["spec: the file must be a YAML mapping with name, model, data and search"])
    try:
        return SweepSpec.model_validate(raw), path.resolve().parent
    except ValidationError as err:
        raise SpecError(validation_lines(err)) from None
