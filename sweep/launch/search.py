"""How Tune searches a sweep: its param space (a grid over planned trials, or Optuna's space
over the planned adapter configurations and the trainer distributions), the ASHA scheduler,
and Tune's run settings."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from sweep.launch.context import LaunchContext, TrialDirNamer, TrialNamer
from sweep.launch.early_stop import DecidingASHA, board_name
from sweep.launch.progress import SweepCallback
from sweep.launch.waiting import WaitStopper
from sweep.spec import Distribution


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def reports_per_trial(plan) -> int:
    """The most Tune reports a trial makes: one per eval_every steps, and one at the end."""
    best = 1
    for cand in plan.expansion.candidates:
        steps, every = cand.trainer["max_steps"], cand.trainer["eval_every"]
        if isinstance(steps, Distribution) or isinstance(every, Distribution):
            continue
        best = max([best] + [_ceil_div(s, e) for s in steps for e in every])
    return best


def scheduler(spec, plan) -> DecidingASHA | None:
    if spec.scheduler.type != "asha":
        return None
    # One past the last report by default: a trial that reaches its final evaluation is never
    # stopped by the scheduler while it saves and uploads its adapter.
    max_t = spec.scheduler.max_t or reports_per_trial(plan) + 1
    return DecidingASHA(board_name(spec.name), time_attr="training_iteration", max_t=max_t,
                        grace_period=min(spec.scheduler.grace_period, max_t),
                        reduction_factor=spec.scheduler.reduction_factor)


def optuna_space(spec, plan) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, str]]]:
    """Optuna's search space over {candidate, trainer fields, seed}, and how to read it back.

    A trainer field shares one key across adapter items when they search it the same way;
    an item with its own space for a field gets its own key (Optuna samples it regardless,
    the trial reads the one of its item)."""
    cands = [{"item": c.item, "adapter": c.adapter} for c in plan.valid_candidates()]
    if not cands:
        return {}, [], {}
    space: dict[str, Any] = {"candidate": tune.choice(list(range(len(cands)))), "seed": tune.choice(list(spec.search.seeds))}
    keys: dict[str, dict[str, str]] = {}
    by_item = {c.item: c.trainer for c in plan.expansion.candidates}
    shared: dict[str, str] = {}
    for item, trainer in sorted(by_item.items()):
        keys[str(item)] = {}
        for name, value in trainer.items():
            desc = json.dumps(value.model_dump() if isinstance(value, Distribution) else value, sort_keys=True, default=str)
            key = f"trainer.{name}"
            if shared.setdefault(key, desc) != desc:
                key = f"item{item}.trainer.{name}"
            keys[str(item)][name] = key
            if key not in space:
                space[key] = _domain(value)
    return space, cands, keys


def _domain(value: Any):
    if isinstance(value, Distribution):
        if value.distribution == "choice":
            return tune.choice(list(value.values))
        if value.distribution == "uniform":
            return tune.uniform(value.low, value.high)
        return tune.loguniform(value.low, value.high)
    return tune.choice(list(value))


def _optuna_seed(name: str) -> int:
    return int(hashlib.sha256(f"peft-sweep:{name}".encode()).hexdigest()[:8], 16)


def tune_configs(spec, plan, ctx: LaunchContext) -> tuple[tune.TuneConfig, dict[str, Any]]:
    """Tune's settings and param space: a grid over the planned trial ids, or Optuna's space."""
    tune_config: dict[str, Any] = dict(
        metric=spec.metric.name,
        mode="min" if spec.metric.goal == "minimize" else "max",
        max_concurrent_trials=spec.resources.max_concurrent_trials,
        scheduler=scheduler(spec, plan),
        trial_name_creator=TrialNamer(ctx),
        trial_dirname_creator=TrialDirNamer(ctx),
        # Tune keeps a trial function's process for the next trial, and with it the gang of
        # workers that process holds (sweep.gang).
        reuse_actors=ctx.reuse_workers,
    )
    if spec.search.strategy == "optuna":
        space, _, _ = optuna_space(spec, plan)
        tune_config["search_alg"] = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=_optuna_seed(spec.name)))
        tune_config["num_samples"] = spec.search.num_samples
        param_space = space
    else:
        param_space = {"trial_id": tune.grid_search([t.trial.trial_id for t in plan.trials])}
    return tune.TuneConfig(**tune_config), param_space


def tune_run_config(spec, storage: str) -> tune.RunConfig:
    parent, name = storage.rstrip("/").rsplit("/", 1)
    return tune.RunConfig(
        name=name,
        storage_path=parent,
        failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
        callbacks=[SweepCallback()],
        stop=WaitStopper(),  # a trial the cluster cannot place ends the sweep (sweep.launch.waiting)
        verbose=0,
    )
