from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from trials.adapters.base import (
    AdapterFamily,
    Calibration,
    FamilyFields,
    Issue,
    PlanContext,
    TargetShape,
    wrapped_module_names,
)

_INITS = ("default", "gaussian", "pissa", "corda", "loftq", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")


class LoraFields(FamilyFields):
    type: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="Rank of the update.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1)
    init_lora_weights: str = Field(
        "default",
        description="default | gaussian | pissa | pissa_niter_N | corda | loftq | olora",
    )
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Regex of module name -> rank override.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Regex of module name -> alpha override.")
    loftq_bits: int = Field(4, description="LoftQ quantization bits, 4 (NF4) or 8 (int8) (loftq only).")
    loftq_iter: int = Field(1, ge=1, description="LoftQ alternating steps (loftq only).")
    corda_method: Literal["ipm", "kpm"] = Field(
        "ipm", description="CorDA mode: ipm keeps knowledge (instruction-previewed), kpm keeps world knowledge (corda only)."
    )
    corda_samples: int = Field(16, ge=1, description="Calibration examples drawn from the trial's train data (corda only).")
    corda_half_covariance: bool = Field(
        False, description="Accumulate CorDA's in x in covariance per target in the trial's 16-bit dtype instead of "
                           "fp32: half their memory, less precise; no effect in fp32 trials (PEFT's "
                           "use_float16_for_covariance; corda only).")

    ID_WHEN_SET = frozenset({"corda_half_covariance"})

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, v: str) -> str:
        if v in _INITS or _PISSA_NITER.fullmatch(v):
            return v
        raise ValueError(f"unknown initializer {v!r}; use one of {', '.join(_INITS)} or pissa_niter_N (N >= 1)")

    @field_validator("loftq_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        # PEFT's LoftQ quantizes with bitsandbytes NF4 or int8 only ("Only nf4 and int8
        # quantization is supported"); 2 bits would pass here and fail in every trial.
        if v not in (4, 8):
            raise ValueError("use 4 (NF4) or 8 (int8): PEFT's LoftQ supports no other bit width")
        return v


def _init_kind(init: str) -> str:
    return "pissa" if init.startswith("pissa") else init


class Lora(AdapterFamily):
    name = "lora"
    fields = LoraFields
    key_strength = "Low-rank update B@A beside each frozen weight; the reference point every other method is measured against"
    best_for = "A first baseline on any task; its initializers (pissa, corda, loftq) are variants of it"
    approx_extra_params = "~0.1-1%"
    effective_attrs = ("r", "lora_alpha", "scaling")
    key_fields = ("r", "alpha")

    def variant(self, f: LoraFields) -> str:
        kind = _init_kind(f.init_lora_weights)
        return "lora" if kind == "default" else f"lora+{kind}"

    def peft_config(self, f: LoraFields, *, for_count: bool = False):
        from peft import LoftQConfig, LoraConfig
        from peft.tuners.lora.config import CordaConfig

        init: Any = True if f.init_lora_weights == "default" else f.init_lora_weights
        extra: dict[str, Any] = {}
        if for_count:
            init = True
        elif f.init_lora_weights == "loftq":
            extra["loftq_config"] = LoftQConfig(loftq_bits=f.loftq_bits, loftq_iter=f.loftq_iter)
        elif f.init_lora_weights == "corda":
            extra["corda_config"] = CordaConfig(corda_method=f.corda_method,
                                                use_float16_for_covariance=f.corda_half_covariance)
        return LoraConfig(
            r=f.r,
            lora_alpha=f.alpha,
            lora_dropout=f.dropout,
            target_modules=f.target_modules,
            init_lora_weights=init,
            use_rslora=f.use_rslora,
            use_dora=f.use_dora,
            rank_pattern=dict(f.rank_pattern),
            alpha_pattern=dict(f.alpha_pattern),
            task_type="CAUSAL_LM",
            **extra,
        )

    def check(self, f: LoraFields, ctx: PlanContext) -> list[Issue]:
        issues = []
        if f.init_lora_weights == "loftq" and not ctx.gpus:
            issues.append(
                Issue(
                    "init_lora_weights",
                    "loftq quantizes the base model with bitsandbytes, which needs CUDA GPUs, and this sweep declares none",
                    "set resources.gpus_per_worker >= 1 on a GPU cluster, or use pissa/default on CPU",
                )
            )
        if f.init_lora_weights == "corda" and not f.target_modules:
            issues.append(
                Issue(
                    "target_modules",
                    "corda collects activation statistics per module and needs explicit target_modules",
                    "list them, e.g. target_modules: [q_proj, v_proj]",
                )
            )
        if f.use_dora and _init_kind(f.init_lora_weights) in ("pissa", "corda", "olora", "loftq"):
            issues.append(
                Issue("use_dora", f"use_dora is not combined with init_lora_weights={f.init_lora_weights} here",
                      "use one or the other")
            )
        return issues

    def check_shapes(self, f: LoraFields, targets: list[TargetShape]) -> list[Issue]:
        issues = []
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(f, field_name):
                try:
                    pattern = re.compile(rf"(.*\.)?({key})$")
                except re.error as err:
                    issues.append(Issue(field_name, f"key {key!r} is not a valid regex ({err})", "escape it"))
                    continue
                if not any(pattern.match(t.name) for t in targets):
                    sample = ", ".join(t.name for t in targets[:2])
                    issues.append(
                        Issue(
                            field_name,
                            f"key {key!r} matches none of the {len(targets)} target modules (PEFT would only warn and ignore it)",
                            f"use a name or regex of a targeted module, e.g. {sample}",
                        )
                    )
        if _init_kind(f.init_lora_weights) in ("pissa", "corda", "olora"):
            too_big = [(t, self._rank_of(f, t.name)) for t in targets]
            too_big = [(t, r) for t, r in too_big if r > min(t.in_features, t.out_features)]
            if too_big:
                t, rank = min(too_big, key=lambda tr: min(tr[0].in_features, tr[0].out_features))
                limit = min(t.in_features, t.out_features)
                field_name = "r" if rank == f.r else "rank_pattern"
                issues.append(
                    Issue(field_name, f"rank {rank} exceeds min(in, out)={limit} of {t.name}, "
                          f"and {f.init_lora_weights} initializes from its singular vectors", f"use r <= {limit}")
                )
        return issues

    @staticmethod
    def _rank_of(f: LoraFields, module: str) -> int:
        for key, value in f.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return f.r

    def runtime_requirements(self, f: LoraFields) -> list[str]:
        if f.init_lora_weights != "loftq":
            return []
        import importlib.util

        import torch

        missing = []
        if not torch.cuda.is_available():
            missing.append("loftq needs a CUDA GPU and none is visible to this process")
        if importlib.util.find_spec("bitsandbytes") is None:
            missing.append("loftq needs bitsandbytes (pip install bitsandbytes)")
        return missing

    def changes_base_weights(self, f: LoraFields) -> bool:
        return _init_kind(f.init_lora_weights) in ("pissa", "corda", "olora")

    def needs_trained_base(self, f: LoraFields) -> bool:
        # PiSSA/CorDA/OLoRA move exactly B0 @ A0 out of W, so the trained adapter converts to
        # one on the original W. LoftQ replaces W by its quantization Q, and Q + B0 @ A0 is only
        # close to W: the adapter was trained to correct Q and is saved with it.
        return f.init_lora_weights == "loftq"

    def rewritten_modules(self, model, f: LoraFields) -> list[str]:
        # LoftQ too: it replaces W by its dequantized quantization (residual of the adapter).
        if _init_kind(f.init_lora_weights) not in ("pissa", "corda", "olora", "loftq"):
            return []
        return wrapped_module_names(model, self.peft_config(f, for_count=True))

    def calibration_bytes(self, f: LoraFields, targets: list[TargetShape], dtype_bytes: int) -> int:
        # PEFT's CorDA keeps an in x in covariance on every target until all are decomposed: fp32,
        # or the inputs' own dtype with use_float16_for_covariance.
        if f.init_lora_weights != "corda":
            return 0
        per_elem = dtype_bytes if f.corda_half_covariance else 4
        return sum(t.in_features ** 2 for t in targets) * per_elem

    def needs_calibration(self, f: LoraFields) -> bool:
        return f.init_lora_weights == "corda"

    def calibration_size(self, f: LoraFields) -> int:
        return f.corda_samples if self.needs_calibration(f) else 0

    def wrap(self, model, f: LoraFields, calibration: Calibration | None):
        from peft import get_peft_model

        config = self.peft_config(f)
        if f.init_lora_weights == "corda":
            from peft.tuners.lora.corda import preprocess_corda

            if calibration is None or not calibration.batches:
                raise ValueError("corda needs calibration batches from the train data")

            def run_model() -> None:
                import torch

                with torch.no_grad():
                    for batch in calibration.batches:
                        model(**batch)

            with calibration.whole_model():
                preprocess_corda(model, config, run_model=run_model)
        return get_peft_model(model, config)

    def ludwig(self, f: LoraFields) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "lora", "r": f.r, "alpha": f.alpha, "dropout": f.dropout}
        if f.target_modules:
            out["target_modules"] = list(f.target_modules)
        if f.init_lora_weights != "default":
            out["init_lora_weights"] = f.init_lora_weights
        for name in ("use_rslora", "use_dora"):
            if getattr(f, name):
                out[name] = True
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(f, name):
                out[name] = dict(getattr(f, name))
        if f.init_lora_weights == "loftq":
            out["loftq_config"] = {"loftq_bits": f.loftq_bits, "loftq_iter": f.loftq_iter}
        if f.init_lora_weights == "corda":
            out["corda_config"] = {"corda_method": f.corda_method}
            if f.corda_samples != LoraFields.model_fields["corda_samples"].default:
                out["corda_config"]["corda_samples"] = f.corda_samples  # ours, read back on import
            if f.corda_half_covariance:
                out["corda_config"]["use_float16_for_covariance"] = True
        return out
