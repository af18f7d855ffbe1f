from __future__ import annotations

from typing import Literal

from pydantic import Field

from trials.adapters.base import AdapterFamily, FamilyFields, Issue, TargetShape


class TinyloraFields(FamilyFields):
    type: Literal["tinylora"] = "tinylora"
    r: int = Field(2, ge=1, description="Rank of the frozen SVD basis of each weight.")
    u: int = Field(64, ge=1, description="Trainable coefficients per layer, projected onto the r x r core.")
    weight_tying: float = Field(0.0, ge=0, le=1, description="Fraction of layers sharing one coefficient vector (0: none, 1: all).")


class Tinylora(AdapterFamily):
    name = "tinylora"
    fields = TinyloraFields
    key_strength = "A few trainable coefficients per layer steer a frozen random projection inside the weight's top-r SVD basis"
    best_for = "Hard caps on trainable parameters, down to a handful per layer"
    approx_extra_params = "~0.05-0.5%"
    effective_attrs = ("r", "u")
    key_fields = ("r", "u")

    def wraps_partitioned(self, f: TinyloraFields) -> bool:
        # PEFT 0.21 takes each weight's SVD without gathering it, so a partition (empty) fails.
        return False

    def peft_config(self, f: TinyloraFields, *, for_count: bool = False):
        from peft import TinyLoraConfig

        return TinyLoraConfig(r=f.r, u=f.u, weight_tying=f.weight_tying, target_modules=f.target_modules,
                              task_type="CAUSAL_LM")

    def check_shapes(self, f: TinyloraFields, targets: list[TargetShape]) -> list[Issue]:
        smallest = min(targets, key=lambda t: min(t.in_features, t.out_features))
        limit = min(smallest.in_features, smallest.out_features)
        if f.r > limit:
            return [
                Issue("r", f"{f.r} exceeds min(in, out)={limit} of {smallest.name} (PEFT would silently clamp it)",
                      f"use r <= {limit}")
            ]
        return []
