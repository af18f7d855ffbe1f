from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trials.adapters.base import AdapterFamily, FamilyFields, Issue, TargetShape, common_dim, divisors_hint


class VbloraFields(FamilyFields):
    type: Literal["vblora"] = "vblora"
    r: int = Field(4, ge=1, description="Rank of each layer's update.")
    num_vectors: int = Field(256, ge=1, description="Vectors in the bank shared by all layers.")
    vector_length: int = Field(256, ge=1, description="Length of each bank vector; must divide every target's in and out features.")
    topk: int = Field(2, ge=1, description="Bank vectors mixed per sub-vector.")

    @model_validator(mode="after")
    def _topk_within_bank(self) -> "VbloraFields":
        if self.topk > self.num_vectors:
            raise ValueError(f"topk={self.topk} exceeds num_vectors={self.num_vectors}; use topk <= num_vectors")
        return self


class Vblora(AdapterFamily):
    name = "vblora"
    fields = VbloraFields
    key_strength = "Every layer's low-rank factors are top-k mixtures drawn from one shared vector bank"
    best_for = "The smallest stored adapters when many layers can share update directions"
    approx_extra_params = "~0.05-0.5%"
    effective_attrs = ("r", "topk")
    key_fields = ("r", "num_vectors", "vector_length", "topk")

    def peft_config(self, f: VbloraFields, *, for_count: bool = False):
        from peft import VBLoRAConfig

        return VBLoRAConfig(
            r=f.r,
            num_vectors=f.num_vectors,
            vector_length=f.vector_length,
            topk=f.topk,
            target_modules=f.target_modules,
            task_type="CAUSAL_LM",
        )

    def check_shapes(self, f: VbloraFields, targets: list[TargetShape]) -> list[Issue]:
        for t in targets:
            for side, dim in (("in_features", t.in_features), ("out_features", t.out_features)):
                if dim % f.vector_length:
                    return [
                        Issue("vector_length", f"{f.vector_length} does not divide {side}={dim} of {t.name}",
                              f"use a divisor of {common_dim(targets)} (it must divide every target dim), "
                              f"e.g. {divisors_hint(common_dim(targets), f.vector_length)}")
                    ]
        return []
