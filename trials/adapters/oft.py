from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trials.adapters.base import AdapterFamily, FamilyFields, Issue, TargetShape, divisors_hint


class OftFields(FamilyFields):
    type: Literal["oft"] = "oft"
    r: int | None = Field(None, ge=1, description="Number of orthogonal blocks per layer (give r or oft_block_size).")
    oft_block_size: int | None = Field(None, ge=1, description="Size of each orthogonal block (give r or oft_block_size).")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of dropping a whole block's rotation in training.")
    coft: bool = Field(False, description="Constrained OFT: keep each rotation within eps of the identity.")
    eps: float = Field(6e-5, gt=0, description="COFT's constraint radius (coft only).")

    @model_validator(mode="after")
    def _exactly_one_size(self) -> "OftFields":
        if (self.r is None) == (self.oft_block_size is None):
            raise ValueError("oft needs exactly one of r (blocks per layer) or oft_block_size (size of each block)")
        return self


class Oft(AdapterFamily):
    name = "oft"
    fields = OftFields
    key_strength = "Rotates each frozen weight with a learned block-diagonal orthogonal matrix, keeping angles between neurons"
    best_for = "Tasks where the pretrained representation geometry must survive, such as similarity and faithful generation"
    approx_extra_params = "~0.5-2%"
    effective_attrs = ("r", "oft_block_size")
    key_fields = ("r", "oft_block_size")

    def peft_config(self, f: OftFields, *, for_count: bool = False):
        from peft import OFTConfig

        return OFTConfig(
            r=f.r or 0,
            oft_block_size=f.oft_block_size or 0,
            module_dropout=f.module_dropout,
            coft=f.coft,
            eps=f.eps,
            target_modules=f.target_modules,
            task_type="CAUSAL_LM",
        )

    def check_shapes(self, f: OftFields, targets: list[TargetShape]) -> list[Issue]:
        # PEFT replaces a non-dividing value with the nearest divisor and only warns, so the
        # trial would silently train a different adapter than the one asked for.
        field_name, value = ("r", f.r) if f.r is not None else ("oft_block_size", f.oft_block_size)
        for t in targets:
            if t.in_features % value:
                return [
                    Issue(
                        field_name,
                        f"{value} does not divide in_features={t.in_features} of {t.name} (PEFT would silently change it)",
                        f"use a divisor of {t.in_features}, e.g. {divisors_hint(t.in_features, value)}",
                    )
                ]
        return []
