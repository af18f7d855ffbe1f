"""What every adapter family in the catalogue provides.

A family is the single place that knows one PEFT method: its fields, how they become a
PEFT config, the shape rules PEFT does not enforce (or enforces silently), its Ludwig
export, and a short description for the comparison table.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from trials.strict import Strict

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel


class FamilyFields(Strict):
    """Concrete fields of one adapter in one trial (no grid lists)."""

    # Fields added after trials were first identified: hashed into a trial's id only when set
    # to something other than their default, so existing trials keep their ids (and a resumed
    # sweep its finished trials).
    ID_WHEN_SET: ClassVar[frozenset[str]] = frozenset()

    target_modules: list[str] | None = Field(
        None, description="Module names or a regex; unset uses PEFT's default for the model architecture."
    )


@dataclass(frozen=True)
class TargetShape:
    """A module an adapter wraps, with the dimensions of its weight."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class PlanContext:
    """What the plan knows about where trials will run."""

    gpus: bool


@dataclass(frozen=True)
class Issue:
    field: str
    message: str
    fix: str = ""
    severity: Literal["error", "warning"] = "error"

    def line(self) -> str:
        text = f"adapter.{self.field}: {self.message}"
        return f"{text}; {self.fix}" if self.fix else text


@dataclass(frozen=True)
class Calibration:
    """Batch-size-1 calibration batches, for families whose initialization reads data."""

    batches: list[dict[str, torch.Tensor]]
    # Entered around everything that reads the base model whole (the forwards and what is
    # computed from the weights after them): under ZeRO-3, a gather of the partitioned weights.
    whole_model: Callable[[], AbstractContextManager] = nullcontext


def common_dim(targets: list[TargetShape]) -> int:
    """The largest size dividing every in and out dimension of the targets."""
    import math

    g = 0
    for t in targets:
        g = math.gcd(g, math.gcd(t.in_features, t.out_features))
    return g


def divisors_hint(n: int, near: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    best = sorted(divs, key=lambda d: (abs(d - near), d))[:3]
    return ", ".join(str(d) for d in sorted(best))


class AdapterFamily:
    name: ClassVar[str]
    fields: ClassVar[type[FamilyFields]]
    key_strength: ClassVar[str]
    best_for: ClassVar[str]
    approx_extra_params: ClassVar[str]
    # Per-module attributes PEFT stores on a wrapped layer, read back after wrapping so a
    # trial records the values PEFT actually used (it adjusts some silently).
    effective_attrs: ClassVar[tuple[str, ...]] = ()
    # The fields that set the adapter's size, always shown when describing a trial.
    key_fields: ClassVar[tuple[str, ...]] = ()

    def variant(self, f: FamilyFields) -> str:
        return self.name

    def describe(self, f: FamilyFields) -> str:
        """Key fields, then any other field set away from its default, as `k=v` pairs."""
        defaults = {name: info.get_default(call_default_factory=True) for name, info in type(f).model_fields.items()}
        parts = []
        for name, value in f.model_dump().items():
            if name in ("type", "target_modules") or value is None:
                continue
            if name in self.key_fields or value != defaults.get(name):
                parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
        return " ".join(parts)

    def peft_config(self, f: FamilyFields, *, for_count: bool = False) -> PeftConfig:
        """The PEFT config; `for_count` gives one that builds the same parameters without
        data- or weight-dependent initialization (used on meta-device models)."""
        raise NotImplementedError

    def count_trainable(self, f: FamilyFields, targets: list[TargetShape]) -> int | None:
        """The trainable count without wrapping, for families whose wrap is too slow to run
        at plan time on large models; None means "wrap and count"."""
        return None

    def check(self, f: FamilyFields, ctx: PlanContext) -> list[Issue]:
        """Rules that need no module shapes."""
        return []

    def check_shapes(self, f: FamilyFields, targets: list[TargetShape]) -> list[Issue]:
        """Rules against the modules the adapter wraps."""
        return []

    def runtime_requirements(self, f: FamilyFields) -> list[str]:
        """Reasons this trial cannot run on the current process's hardware (empty if it can)."""
        return []

    def changes_base_weights(self, f: FamilyFields) -> bool:
        """True when initialization rewrites base weights, so a portable save needs conversion."""
        return False

    def needs_trained_base(self, f: FamilyFields) -> bool:
        """True when the trained adapter only holds together with the base weights its
        initialization rewrote, and no conversion expresses it against the original base
        (LoftQ: the adapter corrects the quantized weights). Those weights are saved with it."""
        return False

    def trained_base(self, model: torch.nn.Module, f: FamilyFields,
                     rewritten: list[str]) -> dict[str, torch.nn.Parameter]:
        """The base weights such an adapter is saved with, by their names in the unwrapped model:
        the parameters themselves, taken before wrapping (the initializer rewrites their data in
        place). `rewritten` is `rewritten_modules(model, f)`, which the caller already has."""
        if not self.needs_trained_base(f):
            return {}
        return {f"{name}.weight": model.get_submodule(name).weight for name in rewritten}

    def calibration_bytes(self, f: FamilyFields, targets: list[TargetShape], dtype_bytes: int) -> int:
        """Memory the initializer holds while calibrating, beyond the model (CorDA's covariances)."""
        return 0

    def rewritten_modules(self, model: torch.nn.Module, f: FamilyFields) -> list[str]:
        """Modules whose base weights wrapping rewrites (a kept base model restores them)."""
        return []

    def wrap(self, model: torch.nn.Module, f: FamilyFields, calibration: Calibration | None) -> PeftModel:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(f))

    def needs_calibration(self, f: FamilyFields) -> bool:
        return False

    def calibration_size(self, f: FamilyFields) -> int:
        """How many batch-size-1 calibration examples `wrap` wants (when it needs calibration)."""
        return 0

    def wraps_partitioned(self, f: FamilyFields) -> bool:
        """Whether wrapping works on a base loaded partitioned under ZeRO-3 (model.PartitionedLoading);
        False loads it whole and lets deepspeed.initialize partition it."""
        return True

    def supports_zero_stage(self, f: FamilyFields, stage: int) -> bool:
        """Whether the trial can train under this DeepSpeed ZeRO stage."""
        return True

    def ludwig(self, f: FamilyFields) -> dict[str, Any]:
        """The adapter block of a Ludwig LLM config."""
        out: dict[str, Any] = {"type": self.name}
        out.update({k: v for k, v in f.model_dump(exclude={"type"}).items() if v is not None})
        return out


def wrapped_module_names(model: torch.nn.Module, config: PeftConfig) -> list[str]:
    """The modules PEFT wraps for `config`, by PEFT's own matching (architecture defaults,
    regexes, layer patterns): wrap with empty (meta-device) adapter weights, read, unwrap. No
    memory, no random numbers drawn, the model as it was (apart from `requires_grad`)."""
    from peft import get_peft_model

    probe = get_peft_model(model, config, low_cpu_mem_usage=True)
    names = [n.removeprefix("base_model.model.") for n, m in probe.named_modules() if hasattr(m, "base_layer")]
    probe.unload()
    return names


def effective_values(peft_model: torch.nn.Module, attrs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per wrapped module, the values PEFT stored for the active adapter."""
    out: dict[str, dict[str, Any]] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not hasattr(module, "base_layer"):
            continue
        values = {}
        for attr in attrs:
            stored = getattr(module, attr, None)
            if isinstance(stored, dict) and "default" in stored:
                values[attr] = stored["default"]
        if values:
            out[name.removeprefix(prefix)] = values
    return out
