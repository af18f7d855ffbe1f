"""A strict Pydantic base: unknown keys are errors that suggest the closest known key."""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys users reach for that this model does not have, with what to use instead.
    unknown_key_hints: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        unknown = [k for k in data if k not in known]
        if not unknown:
            return data
        problems = []
        for key in unknown:
            if str(key) in cls.unknown_key_hints:
                problems.append(f"unknown key {key!r}: {cls.unknown_key_hints[str(key)]}")
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
            problems.append(f"unknown key {key!r} ({hint})")
        raise PydanticCustomError("unknown_key", "; ".join(problems))
