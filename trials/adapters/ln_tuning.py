from __future__ import annotations

from typing import Literal

from trials.adapters.base import AdapterFamily, FamilyFields


class LnTuningFields(FamilyFields):
    type: Literal["ln_tuning"] = "ln_tuning"


class LnTuning(AdapterFamily):
    name = "ln_tuning"
    fields = LnTuningFields
    key_strength = "Trains only the scale (and bias) of the normalization layers: the smallest adapter here"
    best_for = "Nudging an already instruction-tuned model toward a new domain on a tiny parameter budget"
    approx_extra_params = "<0.1%"

    def wraps_partitioned(self, f: LnTuningFields) -> bool:
        # PEFT deep-copies each norm, and a copy of a partitioned weight keeps its DeepSpeed
        # identity: the engine then meets two parameters with one id and refuses.
        return False

    def peft_config(self, f: LnTuningFields, *, for_count: bool = False):
        from peft import LNTuningConfig

        return LNTuningConfig(target_modules=f.target_modules, task_type="CAUSAL_LM")
