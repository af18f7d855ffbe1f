"""The adapter catalogue: one entry per PEFT family, the only place that knows a family."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from trials.adapters.base import AdapterFamily, Calibration, FamilyFields, Issue, PlanContext, TargetShape, effective_values
from trials.adapters.c3a import C3a
from trials.adapters.hra import Hra
from trials.adapters.ln_tuning import LnTuning
from trials.adapters.lora import Lora
from trials.adapters.oft import Oft
from trials.adapters.tinylora import Tinylora
from trials.adapters.vblora import Vblora
from trials.adapters.waveft import Waveft

FAMILIES: dict[str, AdapterFamily] = {
    fam.name: fam for fam in (Lora(), LnTuning(), Oft(), Hra(), Waveft(), Vblora(), C3a(), Tinylora())
}

AdapterFields = Annotated[Union[tuple(fam.fields for fam in FAMILIES.values())], Field(discriminator="type")]


def family_of(fields: FamilyFields) -> AdapterFamily:
    return FAMILIES[fields.type]  # type: ignore[attr-defined]


__all__ = [
    "FAMILIES",
    "AdapterFamily",
    "AdapterFields",
    "Calibration",
    "FamilyFields",
    "Issue",
    "PlanContext",
    "TargetShape",
    "effective_values",
    "family_of",
]
