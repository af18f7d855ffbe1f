"""The driver: `sweep run` and `sweep resume` start (or restore) the Tune experiment of a
planned sweep, watch it, and close its parent run with the outcome."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sweep.errors import LaunchError, SpecError, StateError
from sweep.launch import state as sweep_state
from sweep.launch.admission import SKIPPED_PREFIX, Spent, start_ledger, stop_ledger
from sweep.launch.context import DRIVER_RESOURCE, LaunchContext
from sweep.launch.early_stop import board_name, start_board, stop_board
from sweep.launch.forwarding import start_box, stop_box, values_of
from sweep.launch.progress import Progress, attach, detach
from sweep.launch.reconcile import Reconciler, close_orphans
from sweep.launch.runtime import (
    cluster_gpu_memory_gb,
    init_ray,
    local_resource_problems,
    memory_warnings,
    quiet_ray_logs,
    worker_env,
)
from sweep.launch.search import optuna_space, tune_configs, tune_run_config
from sweep.launch.trial_fn import make_trainable
from sweep.launch.waiting import ResourceWatch
from sweep.launch.waiting import expired as waiting_expired
from sweep.spec import Plan, load_spec, make_plan
from sweep.tracking import layout, runs
from sweep.tracking.reader import best_of_sweep
from sweep.tracking.views import trials_url, view_key
from sweep.util.secrets import redact_uri
from sweep.util.storage import is_uri, join, read_bytes
from trials.adapters import FAMILIES


@dataclass
class Outcome:
    counts: dict[str, int]  # TERMINATED, ERROR, SKIPPED (by a budget)
    best: dict[str, Any] | None
    interrupted: bool = False
    stopped: str | None = None  # why the sweep ended before its trials did (a budget, waiting)
    gave_up_waiting: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.gave_up_waiting:
            return 2  # the cluster cannot hold a trial: a resources setting to fix
        return 1 if self.counts.get("ERROR", 0) else 0


def build_context(spec, plan, *, tracking_uri: str, experiment_id: str, parent_run_id: str,
                  storage: str) -> LaunchContext:
    ctx = LaunchContext(
        sweep=spec.name,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        strategy=spec.search.strategy,
        workers=spec.resources.workers_per_trial,
        cpus_per_worker=spec.resources.cpus_per_worker,
        gpus_per_worker=spec.resources.gpus_per_worker,
        train_storage=join(storage, "_train"),
        inputs=plan.expansion.inputs,
        trials={t.trial.trial_id: t.trial for t in plan.trials},
        worker_env=worker_env(spec),
        reuse_workers=spec.resources.reuse_workers,
        keep_base_model=spec.resources.keep_base_model,
        collective_timeout_s=spec.resources.collective_timeout_s,
        metric=spec.metric.name,
    )
    if ray.is_initialized() and ray.cluster_resources().get(DRIVER_RESOURCE):
        ctx.trial_fn_resources[DRIVER_RESOURCE] = 0.001
    if spec.scheduler.type == "asha":
        ctx.decision_board = board_name(spec.name)
    ctx.ledger = spec.name
    ctx.estimates = {t.trial.trial_id: _hours(t.estimate, spec) for t in plan.trials}
    ctx.default_estimate = max(ctx.estimates.values(), default=(0.0, 0.0))
    if spec.search.strategy == "optuna":
        _, ctx.candidates, ctx.trainer_keys = optuna_space(spec, plan)
    return ctx


def _hours(estimate, spec) -> tuple[float, float]:
    """(device-hours, wall hours) the plan expects of a trial; 0 where it cannot say (CPU)."""
    device = (estimate.device_hours or 0.0) if estimate is not None else 0.0
    return device, device / spec.resources.workers_per_trial


def _fit(tuner, ctx: LaunchContext, spec, describe_total: int | None, *, quiet: bool, console,
         on_wait) -> Outcome:
    progress = Progress(spec.name, spec.metric.name, spec.metric.goal, ctx.describe, quiet=quiet, console=console,
                        expected=describe_total)
    reconciler = Reconciler(ctx)
    attach(reconciler)
    interrupted = False
    results = None
    try:
        with progress, ResourceWatch(spec.resources.pending_timeout_s, on_change=on_wait):
            try:
                results = tuner.fit()
            except KeyboardInterrupt:
                interrupted = True
            gave_up = waiting_expired()
    finally:
        detach(reconciler)
    counts: dict[str, int] = {}
    if results is not None:
        for r in results:
            status = "TERMINATED"
            if r.error is not None:
                status = "SKIPPED" if SKIPPED_PREFIX in str(r.error) else "ERROR"
            elif (r.metrics or {}).get("step") is None:
                status = "STOPPED"  # ended by the sweep's stop (waiting, Ctrl-C) before its first report
            counts[status] = counts.get(status, 0) + 1
    if not interrupted:
        close_orphans(ctx)
    return Outcome(counts, _best(ctx, spec), interrupted, stopped=gave_up, gave_up_waiting=gave_up is not None)


def _best(ctx: LaunchContext, spec) -> dict[str, Any] | None:
    """The best finished trial, read back from the MLflow runs by the rule the table and
    export use (sweep.tracking.reader.best_trial), so all three name the same trial."""
    top = best_of_sweep(layout.client(ctx.tracking_uri), ctx.experiment_id, ctx.parent_run_id, spec.metric.name,
                        spec.metric.goal)
    if top is None:
        return None
    return {"trial_id": top.trial_id, "value": top.metrics[spec.metric.name], "metric": spec.metric.name}


def spec_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_sweep(spec, spec_path: Path, spec_dir: Path, plan: Plan, *, address: str | None, storage_root: str | None,
              cli_uri: str | None, quiet: bool, verbose: bool, console, forward_env: list[str] = ()) -> Outcome:
    root = storage_root or str(spec_dir / "runs")
    if not is_uri(root):
        root = str(Path(root).expanduser().resolve())
    storage = join(root, spec.name)
    if read_bytes(join(storage, sweep_state.STATE_FILE)) is not None:
        raise StateError(
            f"{storage} already holds sweep {spec.name!r}: continue it with `sweep resume {storage}`, "
            "or pass another --storage (or rename the sweep)"
        )
    uri, creds = layout.use_credentials(layout.tracking_uri(cli_uri, spec.tracking.uri, spec_dir))
    forwarded = values_of(list(forward_env), creds)  # every name set, or exit 2 before anything starts
    if address is None and (problems := local_resource_problems(spec)):
        raise LaunchError(problems)
    layout.check_server(uri)
    dashboard = init_ray(address, worker_env(spec), verbose=verbose)
    _check_gpu_memory(spec, plan, console)
    client = layout.client(uri)
    experiment_id = runs.ensure_experiment(client, spec.tracking.experiment or spec.name, uri)
    parent_run_id = runs.start_sweep_run(client, experiment_id, spec, spec_path, plan.to_json(), storage)
    st = sweep_state.SweepState(
        name=spec.name, spec_path=str(spec_path.resolve()), spec_sha256=spec_sha256(spec_path), storage=storage,
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id, strategy=spec.search.strategy,
        address=address, forward_env=sorted(forward_env), tracking_credentials=sorted(creds),
    )
    sweep_state.save(st)
    ctx = build_context(spec, plan, tracking_uri=uri, experiment_id=experiment_id,
                        parent_run_id=parent_run_id, storage=storage)
    ctx.forwarded = sorted(forwarded)
    _announce(console, quiet, spec, st, dashboard, uri, plan=plan)
    quiet_ray_logs(verbose)
    tune_config, param_space = tune_configs(spec, plan, ctx)
    tuner = tune.Tuner(make_trainable(ctx), param_space=param_space, tune_config=tune_config,
                       run_config=tune_run_config(spec, storage))
    total = spec.search.num_samples if spec.search.strategy == "optuna" else len(plan.trials)
    return _finish(tuner, ctx, spec, st, client, total, forwarded, quiet=quiet, console=console)


def _check_gpu_memory(spec, plan: Plan, console) -> None:
    """Without resources.gpu_memory_gb, the plan's memory estimate is checked against what
    the connected cluster's GPUs report."""
    if not spec.resources.gpus_per_worker or spec.resources.gpu_memory_gb is not None:
        return
    gb = cluster_gpu_memory_gb()
    if gb is None:
        return
    console.print(f"gpu memory: {gb:.1f} GiB per GPU (read from the cluster)", highlight=False, soft_wrap=True)
    for line in memory_warnings(plan, gb):
        console.print(f"warning {line}", highlight=False, soft_wrap=True)


def resume_sweep(name_or_path: str, *, address: str | None, quiet: bool, verbose: bool, retry_failed: bool,
                 console, budget: dict[str, float] | None = None) -> Outcome:
    storage = sweep_state.locate(name_or_path)
    st = sweep_state.load(storage)
    spec_path = Path(st.spec_path)
    spec, spec_dir = load_spec(spec_path)
    if spec_sha256(spec_path) != st.spec_sha256:
        raise SpecError([f"spec: {spec_path} changed since the sweep started; its trials would not match the "
                         "recorded ones. Restore the file, or start a new sweep (another name or --storage)"])
    plan = make_plan(spec, spec_dir)
    if not tune.Tuner.can_restore(storage):
        raise LaunchError(f"{storage}: Ray Tune has no experiment state there (the sweep died before its first "
                          f"trial was scheduled); remove the folder and start it again with `sweep run`")
    # The same names again, with this shell's values: nothing secret was kept with the sweep.
    absent = [n for n in st.tracking_credentials if n not in os.environ]
    if absent:
        raise LaunchError(f"the tracking server of sweep {st.name} took credentials from its URI; set "
                          f"{' and '.join(absent)} in this shell to resume it")
    forwarded = values_of(st.forward_env, {n: os.environ[n] for n in st.tracking_credentials})
    target = address if address is not None else st.address
    if target is None and (problems := local_resource_problems(spec)):
        raise LaunchError(problems)
    layout.check_server(st.tracking_uri)
    dashboard = init_ray(target, worker_env(spec), verbose=verbose)
    client = layout.client(st.tracking_uri)
    runs.reopen(client, st.parent_run_id)
    ctx = build_context(spec, plan, tracking_uri=st.tracking_uri, experiment_id=st.experiment_id,
                        parent_run_id=st.parent_run_id, storage=storage)
    ctx.finished = runs.finished_trials(client, st.experiment_id, st.parent_run_id)
    if not retry_failed:
        ctx.failed = {k: v for k, v in runs.failed_trials(client, st.experiment_id, st.parent_run_id).items()
                      if k not in ctx.finished}
    if budget:
        st.budget = {**(st.budget or spec.budget.limits()), **budget}
    ctx.forwarded = sorted(forwarded)
    _announce(console, quiet, spec, st, dashboard, st.tracking_uri, resumed=True, plan=plan)
    quiet_ray_logs(verbose)
    # Finished trials are kept; interrupted ones re-run from scratch (trials keep no checkpoints).
    # Errored trials restart, since a budget's skipped trials end as errors too; the ones that
    # really failed stop at once unless --retry-failed (ctx.failed), since a deterministic
    # failure would fail again.
    tuner = tune.Tuner.restore(storage, trainable=make_trainable(ctx), resume_unfinished=True,
                               resume_errored=False, restart_errored=True)
    st.status = "running"
    sweep_state.save(st)
    total = spec.search.num_samples if spec.search.strategy == "optuna" else len(plan.trials)
    return _finish(tuner, ctx, spec, st, client, total, forwarded, quiet=quiet, console=console)


def _spent(client, st, ctx) -> Spent:
    """What the sweep used before this driver: trials started, their device-hours, wall time."""
    started = runs.started_trials(client, st.experiment_id, st.parent_run_id)
    return Spent(trials=len(started), device_hours=sum(m.get("device_hours", 0.0) for m in started.values()),
                 wall_s=st.wall_s)


def _finish(tuner, ctx, spec, st, client, total, forwarded: dict[str, str], *, quiet, console) -> Outcome:
    started = time.time()
    board = start_board(spec.name) if ctx.decision_board else None
    ledger = start_ledger(spec.name, st.budget or spec.budget.limits(), _spent(client, st, ctx),
                          spec.resources.max_concurrent_trials)
    box = start_box(spec.name, forwarded)

    def on_wait(line: str | None) -> None:
        st.waiting = line  # `sweep status` shows it; the live view reads the watch itself
        sweep_state.save(st)
        if quiet and line:
            print(f"{time.strftime('%H:%M:%S')} [{spec.name}] {line}", flush=True)

    budget_report = None
    try:
        outcome = _fit(tuner, ctx, spec, total, quiet=quiet, console=console, on_wait=on_wait)
    finally:
        stop_board(board)
        stop_box(box)
        budget_report = stop_ledger(ledger)
    if budget_report and budget_report["stopped"] and outcome.stopped is None:
        outcome.stopped = budget_report["stopped"]
    runs.finish_sweep_run(client, st.parent_run_id, outcome.counts, outcome.best, interrupted=outcome.interrupted,
                          stopped=outcome.stopped, failed=outcome.gave_up_waiting)
    st.status = ("interrupted" if outcome.interrupted else
                 "failed" if outcome.counts.get("ERROR") or outcome.gave_up_waiting else
                 "stopped by budget" if outcome.counts.get("SKIPPED") else "finished")
    st.wall_s += time.time() - started
    st.waiting = None
    sweep_state.save(st)
    done = outcome.counts.get("TERMINATED", 0)
    failed = outcome.counts.get("ERROR", 0)
    line = f"sweep {spec.name}: {done} finished, {failed} failed"
    if outcome.counts.get("SKIPPED"):
        line += f", {outcome.counts['SKIPPED']} not started (budget)"
    if outcome.counts.get("STOPPED"):
        line += f", {outcome.counts['STOPPED']} stopped before training"
    line += f" in {time.time() - started:.1f}s"
    if outcome.best:
        line += f"; best {outcome.best['trial_id']} {outcome.best['metric']}={outcome.best['value']:.4g}"
    console.print(line, highlight=False, soft_wrap=True)
    if outcome.stopped:
        console.print(f"stopped: {outcome.stopped}", highlight=False, soft_wrap=True)
        if not outcome.gave_up_waiting:
            console.print(f"continue with a larger budget: `sweep resume {spec.name} --budget-max-device-hours ...` "
                          "(or --budget-max-trials, --budget-max-wall-hours)", highlight=False, soft_wrap=True)
    if layout.is_server(st.tracking_uri):
        base = redact_uri(st.tracking_uri).rstrip("/")
        console.print(f"runs: {base}/#/experiments/{st.experiment_id}/runs/{st.parent_run_id}", highlight=False,
                      soft_wrap=True)
        console.print(f"trials by {spec.metric.name}: {trials_url(base, st.experiment_id, view_key(st.parent_run_id))}",
                      highlight=False, soft_wrap=True)
    return outcome


def _announce(console, quiet: bool, spec, st, dashboard: str | None, uri: str, resumed: bool = False,
              plan: Plan | None = None) -> None:
    verb = "resuming" if resumed else "running"
    if plan is not None:
        variants = sorted({FAMILIES[t.trial.adapter.type].variant(t.trial.adapter) for t in plan.trials})
        what = (f"{spec.search.num_samples} trials sampled by Optuna" if spec.search.strategy == "optuna"
                else f"{len(plan.trials)} trials ({', '.join(variants)})")
        where = f"Ray at {st.address}" if st.address else "a local Ray runtime"
        console.print(f"plan: {what}, {spec.resources.workers_per_trial} DeepSpeed workers each, on {where}",
                      highlight=False, soft_wrap=True)
    console.print(f"{verb} sweep {spec.name}: storage {st.storage}", highlight=False, soft_wrap=True)
    console.print(f"mlflow: {redact_uri(uri)} (experiment {spec.tracking.experiment or spec.name}, parent run {st.parent_run_id})",
                  highlight=False, soft_wrap=True)
    if dashboard:
        console.print(f"ray dashboard: {dashboard}", highlight=False, soft_wrap=True)
