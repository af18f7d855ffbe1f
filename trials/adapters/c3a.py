from __future__ import annotations

from typing import Literal

from pydantic import Field

from trials.adapters.base import AdapterFamily, FamilyFields, Issue, TargetShape, common_dim, divisors_hint


class C3aFields(FamilyFields):
    type: Literal["c3a"] = "c3a"
    block_size: int = Field(256, ge=1, description="Circulant block size; must divide every target's in and out features.")


class C3a(AdapterFamily):
    name = "c3a"
    fields = C3aFields
    key_strength = "Block-circulant update computed by FFT convolution: full-rank at a low parameter cost"
    best_for = "Cases where low-rank updates underfit but the budget stays small; it wants a much larger learning rate"
    approx_extra_params = "~0.2-1%"
    effective_attrs = ("block_size",)
    key_fields = ("block_size",)

    def peft_config(self, f: C3aFields, *, for_count: bool = False):
        from peft import C3AConfig

        return C3AConfig(block_size=f.block_size, target_modules=f.target_modules, task_type="CAUSAL_LM")

    def check_shapes(self, f: C3aFields, targets: list[TargetShape]) -> list[Issue]:
        issues = []
        for t in targets:
            if t.in_features % f.block_size or t.out_features % f.block_size:
                g = common_dim(targets)
                issues.append(
                    Issue("block_size", f"{f.block_size} does not divide both in={t.in_features} and out={t.out_features} of {t.name}",
                          f"use a divisor of {g} (it must divide every target), e.g. {divisors_hint(g, f.block_size)}")
                )
                break
        issues.append(
            Issue("block_size", "c3a starts from a random (xavier) kernel, so step 0 already differs from the base model",
                  "expect a higher initial loss than identity-initialized adapters", severity="warning")
        )
        return issues
