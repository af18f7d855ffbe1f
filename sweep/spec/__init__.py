"""The sweep spec: YAML -> a strict model -> expanded, checked trials. No Ray, no MLflow.

- `schema`: the Pydantic model of the YAML (`SweepSpec`, `load_spec`).
- `messages`: validation failures as one line per field, with the fix.
- `expand`: the spec's grid or samples as TrialConfigs with content ids.
- `plan`: every trial checked against the base model's real module shapes.
"""

from sweep.spec.expand import Expansion, build_trial, expand
from sweep.spec.plan import Plan, make_plan
from sweep.spec.schema import Distribution, SweepSpec, load_spec

__all__ = ["Distribution", "Expansion", "Plan", "SweepSpec", "build_trial", "expand", "load_spec", "make_plan"]
