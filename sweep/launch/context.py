"""What every Tune trial is given (`LaunchContext`), and how a Tune trial's config becomes
its TrialConfig. Imported by the driver and by every Tune trial process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sweep.spec.expand import TrialInputs, build_trial
from trials.adapters import FAMILIES
from trials.config import TrialConfig

# The trial function only waits on its workers. It reserves a token amount of memory and no
# CPU: with 0.01 CPU, 2 workers x 1 CPU deadlock on a 2-core node (measured), since Tune
# holds the trial's 0.01 while the workers wait for 2.0 of the 2 CPUs.
TRIAL_FN_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
# A cluster that advertises this custom resource (on its head or CPU nodes, see clusters/)
# gets every trial function there, off the GPU nodes, as Ray's Tune+Train guide advises.
DRIVER_RESOURCE = "trial_driver"
# Rides along a Ray Train report, so the driver can release a stopped trial's placement group.
PLACEMENT_GROUP_KEY = "ray_placement_group"


@dataclass
class LaunchContext:
    """Shipped (pickled) to every trial function; plain data only.

    Grid and random sweeps hand Tune only trial ids; the planned TrialConfigs travel here,
    so Tune's state stays small and nothing is re-validated from JSON. Optuna sweeps build
    each trial from the sampled values with the plan's own `build_trial` and `inputs`."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    strategy: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    train_storage: str
    inputs: TrialInputs
    trials: dict[str, TrialConfig] = field(default_factory=dict)  # grid/random: trial id -> planned trial
    worker_env: dict[str, str] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # optuna: adapter + item index
    trainer_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # optuna: item -> field -> space key
    finished: dict[str, dict[str, float]] = field(default_factory=dict)  # trial_id -> metrics, on resume
    decision_board: str | None = None  # early stopping: where the scheduler's decisions are posted
    trial_fn_resources: dict[str, float] = field(default_factory=lambda: dict(TRIAL_FN_RESOURCES))
    reuse_workers: bool = True  # sweep.launch.gang: keep each trial's workers for the next trial
    keep_base_model: bool = True  # trials.resident: kept workers keep the base model loaded too
    forwarded: list[str] = field(default_factory=list)  # names the workers read from sweep.launch.forwarding
    collective_timeout_s: float = 1800.0  # torch.distributed's timeout in a kept gang
    metric: str = "eval_loss"  # what Tune ranks by: a report without it is not sent (Tune refuses it)
    ledger: str | None = None  # sweep.launch.admission: the sweep whose ledger admits trials
    estimates: dict[str, tuple[float, float]] = field(default_factory=dict)  # trial id -> (device-h, wall-h)
    default_estimate: tuple[float, float] = (0.0, 0.0)  # an Optuna sample: the plan's largest
    failed: dict[str, str] = field(default_factory=dict)  # trial_id -> error, on resume
    _sampled: dict[str, TrialConfig] = field(default_factory=dict, repr=False, compare=False)

    def trial(self, config: dict[str, Any]) -> TrialConfig:
        """The TrialConfig of a Tune trial's config: the planned trial itself (grid, random), or
        one built from Optuna's choices (once per process and config: namers, the progress
        view and the trial function all ask)."""
        if "trial_id" in config:
            return self.trials[config["trial_id"]]
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._sampled:
            cand = self.candidates[int(config["candidate"])]
            keys = self.trainer_keys[str(cand["item"])]
            trainer = {name: config[key_] for name, key_ in keys.items()}
            self._sampled[key] = build_trial(self.inputs, cand["adapter"], trainer, int(config["seed"]))
        return self._sampled[key]

    def describe(self, config: dict[str, Any]) -> tuple[str, str, int]:
        """(trial id, adapter variant, max_steps) of a Tune trial's config."""
        cfg = self.trial(config)
        return cfg.trial_id, FAMILIES[cfg.adapter.type].variant(cfg.adapter), cfg.trainer.max_steps


class TrialNamer:
    """Tune trial names are the trials' content ids (picklable: Tune stores it)."""

    def __init__(self, ctx: LaunchContext):
        self.ctx = ctx

    def __call__(self, trial: Any) -> str:
        try:
            return self.ctx.describe(trial.config)[0]
        except Exception:  # a config this sweep cannot read (Tune asks before validating)
            return str(trial.trial_id)


class TrialDirNamer(TrialNamer):
    def __call__(self, trial: Any) -> str:
        return f"{super().__call__(trial)}_{trial.trial_id}"
