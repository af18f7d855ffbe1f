from __future__ import annotations

from typing import Literal

from pydantic import Field

from trials.adapters.base import AdapterFamily, FamilyFields, Issue, TargetShape


class HraFields(FamilyFields):
    type: Literal["hra"] = "hra"
    r: int = Field(8, ge=1, description="Number of Householder reflections per layer.")
    apply_GS: bool = Field(False, description="Gram-Schmidt orthogonalize the reflection vectors.")


class Hra(AdapterFamily):
    name = "hra"
    fields = HraFields
    key_strength = "A chain of r Householder reflections per layer: orthogonal like OFT with far fewer parameters"
    best_for = "OFT-style geometry preservation when the parameter budget is tight"
    approx_extra_params = "~0.3-1%"
    effective_attrs = ("hra_r",)
    key_fields = ("r",)

    def peft_config(self, f: HraFields, *, for_count: bool = False):
        from peft import HRAConfig

        return HRAConfig(r=f.r, apply_GS=f.apply_GS, target_modules=f.target_modules, task_type="CAUSAL_LM")

    def check_shapes(self, f: HraFields, targets: list[TargetShape]) -> list[Issue]:
        issues = []
        smallest = min(targets, key=lambda t: t.in_features)
        if f.r > smallest.in_features:
            issues.append(
                Issue("r", f"{f.r} reflections exceed in_features={smallest.in_features} of {smallest.name}",
                      f"use r <= {smallest.in_features}")
            )
        if f.r % 2 and not f.apply_GS:
            # HRA pairs identical reflections so they cancel at init; an odd count leaves one over.
            issues.append(
                Issue("r", f"odd r={f.r} makes HRA start away from the base model (not identity at init)",
                      "use an even r or apply_GS: true", severity="warning")
            )
        return issues
