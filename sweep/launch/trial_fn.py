"""One Tune trial (the function Tune runs in a trial actor): run the trial on its workers (a
kept gang, or a fresh Ray Train run), forward their reports to Tune, and record a failure
the workers could not record themselves.

    driver (sweep run)        Tune trial actor (sweep_trial)        workers (worker.run_worker)
    plan, parent run  --->    gang.run() or TorchTrainer.fit() ---> run_trial(cfg, tmp, reporter)
    progress, reconcile <---  tune.report                     <---  a report every evaluation
                                                                    rank 0: MLflow metrics + artifacts

Ray 2.60 runs Train V2, where a Tuner cannot wrap a Trainer: the trial function builds the
`TorchTrainer` itself and its `TuneReportCallback` forwards the reports (Ray's
"Hyperparameter Tuning with Ray Tune" pattern).
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from typing import Any

import ray
from pydantic import ValidationError
from ray import tune

from sweep.errors import TrialFailed
from sweep.launch import admission, gang
from sweep.launch.context import LaunchContext
from sweep.launch.worker import train_loop
from sweep.tracking import layout
from trials.adapters import FAMILIES
from trials.config import TrialConfig

log = logging.getLogger(__name__)


def sweep_trial(config: dict[str, Any], ctx: LaunchContext) -> None:
    """One Tune trial: run it on the trial's workers (a kept gang, or a Ray Train run),
    whose rank 0 logs the trial's MLflow child run.

    Only a failure makes this function talk to MLflow (to record the error on the child)."""
    fn_started = time.time()
    try:
        cfg = ctx.trial(config)
    except ValidationError as err:  # an Optuna sample the trainer fields reject
        raise TrialFailed(f"cannot build the trial from {config}: {err}") from None
    if cfg.trial_id in ctx.finished:
        # Finished under this sweep already (the driver died before Tune recorded it):
        # report the recorded result, train nothing.
        tune.report({**ctx.finished[cfg.trial_id], "step": cfg.trainer.max_steps, "reused": 1})
        return
    if cfg.trial_id in ctx.failed:
        # Failed under this sweep already; it is only restarted when `--retry-failed` asks
        # (budget-skipped trials restart on resume, and Tune cannot tell the two apart).
        raise TrialFailed(f"failed before the resume: {ctx.failed[cfg.trial_id]} (--retry-failed runs it again)")
    tune_trial_id = tune.get_context().get_trial_id() or "local"
    attempt = uuid.uuid4().hex
    loop_config = worker_config(ctx, cfg, tune_trial_id=tune_trial_id, attempt=attempt, fn_started=fn_started)
    estimate = ctx.estimates.get(cfg.trial_id, ctx.default_estimate)
    try:
        with admission.Admission(ctx.ledger, tune_trial_id, *estimate, ctx.workers, release=gang.discard) as slot:
            if ctx.reuse_workers:
                _run_on_gang(loop_config, ctx, slot)
            else:
                _run_on_train(loop_config, ctx, f"{cfg.trial_id}_{tune_trial_id}_{attempt[:8]}")
    except admission.BudgetReached as skipped:
        raise TrialFailed(str(skipped)) from None  # nothing started, nothing to record
    except Exception as err:
        message = error_message(err)
        detail = "".join(traceback.format_exception(err))
        for rank, failure in sorted((getattr(err, "worker_failures", None) or {}).items()):
            detail += f"\n--- worker rank {rank} ---\n{failure}\n"
        try:
            _record_failure(ctx, cfg, loop_config["run"]["variant"], tune_trial_id, attempt, message, detail)
        except Exception as log_err:  # MLflow unreachable: the Tune error still says why
            log.warning("could not record the failure of %s in MLflow: %s", cfg.trial_id, log_err)
        raise TrialFailed(message) from None


def worker_config(ctx: LaunchContext, cfg: TrialConfig, *, tune_trial_id: str, attempt: str,
                  fn_started: float) -> dict[str, Any]:
    """What every worker of one trial attempt is handed (`sweep.launch.worker.run_worker`)."""
    family = FAMILIES[cfg.adapter.type]
    return {
        "trial": cfg,
        "run": {
            "tracking_uri": ctx.tracking_uri,
            "experiment_id": ctx.experiment_id,
            "parent_run_id": ctx.parent_run_id,
            "sweep": ctx.sweep,
            "variant": family.variant(cfg.adapter),
            "tune_trial_id": tune_trial_id,
            "attempt": attempt,
            "decision_board": ctx.decision_board,
            "trial_node_id": ray.get_runtime_context().get_node_id(),
            "fn_started": fn_started,
            "reuse_workers": ctx.reuse_workers,
            # A Ray Train worker lives for one trial: nothing to keep a model for.
            "keep_base_model": ctx.reuse_workers and ctx.keep_base_model,
            "forwarded": list(ctx.forwarded),
            "metric": ctx.metric,
        },
        "adapter_block": family.ludwig(cfg.adapter),
    }


def per_worker(ctx: LaunchContext) -> dict[str, float]:
    return {"CPU": ctx.cpus_per_worker, **({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker > 0 else {})}


def _run_on_gang(loop_config: dict[str, Any], ctx: LaunchContext, slot: admission.Admission) -> None:
    workers = gang.acquire(ctx.workers, per_worker(ctx), ctx.worker_env, ctx.collective_timeout_s)

    def report(metrics: dict[str, Any]) -> None:
        if "device_hours" in metrics:
            slot.device_hours = float(metrics["device_hours"])
        tune.report(metrics)

    try:
        workers.run(loop_config, report)
    except BaseException:
        gang.discard()  # a failed trial may leave a rank mid-collective: the next trial gets new workers
        raise


def _run_on_train(loop_config: dict[str, Any], ctx: LaunchContext, name: str) -> None:
    # Train loads only on this path (reuse_workers: false); kept gangs never need it.
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpu = ctx.gpus_per_worker > 0
    TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=ctx.workers, use_gpu=gpu,
                                               resources_per_worker=per_worker(ctx)),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ctx.train_storage,
            callbacks=[TuneReportCallback()],
            # Retries are Tune's (failure.max_failures): a retried trial gets a fresh child run.
            failure_config=ray.train.FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": ctx.worker_env} if ctx.worker_env else None,
        ),
    ).fit()


def _record_failure(ctx: LaunchContext, cfg, variant: str, tune_trial_id: str, attempt: str, message: str,
                    detail: str) -> None:
    # MLflow loads here, on a failure only: a trial actor that launches workers never needs it.
    from sweep.tracking import runs

    client = layout.client(ctx.tracking_uri)
    run = runs.attempt_run(client, ctx.experiment_id, ctx.parent_run_id, attempt)
    if run is not None and run.info.status == "FINISHED":
        return  # rank 0 completed and closed it; the failure came after (e.g. the controller)
    run_id = run.info.run_id if run is not None else runs.open_child(
        client, ctx.experiment_id, ctx.parent_run_id, ctx.sweep, cfg, variant, tune_trial_id, attempt)
    runs.fail_child(client, run_id, message, detail)


def make_trainable(ctx: LaunchContext):
    return tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx), ctx.trial_fn_resources)


def error_message(error: BaseException) -> str:
    """The user-facing line of a trial failure: the worker's own exception when Ray wrapped it."""
    inner = error
    failures = getattr(error, "worker_failures", None)
    if failures:
        inner = failures[min(failures)]
    cause = getattr(inner, "cause", None)  # RayTaskError keeps the user exception here
    if isinstance(cause, BaseException):
        inner = cause
    text = str(inner).strip()
    if isinstance(inner, BaseException) and type(inner).__name__ not in ("TrialError",):
        last = text.splitlines()[-1] if text else ""
        return f"{type(inner).__name__}: {last}" if last and not last.startswith(type(inner).__name__) else (last or type(inner).__name__)
    return text.splitlines()[-1] if text else type(inner).__name__
