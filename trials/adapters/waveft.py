from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from trials.adapters.base import AdapterFamily, FamilyFields, Issue, TargetShape


def _wavelet_families() -> list[str]:
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

    return list(WAVELET_REDUCTIONS)


class WaveftFields(FamilyFields):
    type: Literal["waveft"] = "waveft"
    n_frequency: int = Field(2592, ge=1, description="Trainable wavelet coefficients per layer.")
    scaling: float = Field(25.0, gt=0, description="Scale applied to the reconstructed update (WaveFT's alpha).")
    unknown_key_hints = {
        "r": "waveft has no rank; its size is n_frequency (trainable coefficients per layer)",
        "alpha": "waveft has no alpha; its update scale is `scaling`",
    }

    wavelet_family: str = Field("db1", description="Wavelet used for the inverse transform, e.g. db1, sym2, coif1.")

    @field_validator("wavelet_family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        known = _wavelet_families()
        if v not in known:
            raise ValueError(f"unknown wavelet family {v!r}; use one of {', '.join(known[:12])}, ...")
        return v


class Waveft(AdapterFamily):
    name = "waveft"
    fields = WaveftFields
    key_strength = "Learns a sparse set of wavelet coefficients per layer, mapped to a dense update by an inverse transform"
    best_for = "Very small, locality-aware updates, e.g. models over audio or image tokens"
    approx_extra_params = "~0.5-2%"
    effective_attrs = ("waveft_n_frequency", "waveft_scaling")
    key_fields = ("n_frequency", "scaling")

    def peft_config(self, f: WaveftFields, *, for_count: bool = False):
        from peft import WaveFTConfig

        return WaveFTConfig(
            n_frequency=f.n_frequency,
            scaling=f.scaling,
            wavelet_family=f.wavelet_family,
            target_modules=f.target_modules,
            task_type="CAUSAL_LM",
        )

    def count_trainable(self, f: WaveftFields, targets: list[TargetShape]) -> int | None:
        # Wrapping draws a random permutation of in*out indices per layer (seconds per layer
        # on 8B models); the trainable count is simply n_frequency per wrapped layer.
        return f.n_frequency * len(targets)

    def check_shapes(self, f: WaveftFields, targets: list[TargetShape]) -> list[Issue]:
        smallest = min(targets, key=lambda t: t.in_features * t.out_features)
        size = smallest.in_features * smallest.out_features
        if f.n_frequency > size:
            return [
                Issue("n_frequency", f"{f.n_frequency} exceeds the {smallest.in_features}x{smallest.out_features}={size} "
                      f"weights of {smallest.name}", f"use n_frequency <= {size}")
            ]
        return []
