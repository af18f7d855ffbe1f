"""Run a planned sweep on Ray Tune; each trial runs `trials.train.run_trial` on its workers.

Ray 2.60 runs Train V2, where a Tuner cannot wrap a Trainer. A Tune function trial
(`sweep_trial`) runs the trial on its workers and forwards their evaluation reports to
Tune, where schedulers (ASHA) and search algorithms (Optuna) see them. The workers are
either a gang kept from the trial before (sweep.gang, the default) or a fresh Ray Train
`TorchTrainer` run whose `TuneReportCallback` forwards the reports (Ray's "Hyperparameter
Tuning with Ray Tune" pattern, `reuse_workers: false`).

    driver (sweep run)        Tune trial actor (sweep_trial)        workers (run_worker)
    plan, parent run  --->    gang.run() or TorchTrainer.fit() ---> run_trial(cfg, tmp, reporter)
    progress, reconcile <---  tune.report                     <---  a report every evaluation
                                                                    rank 0: MLflow metrics + artifacts
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep import state as sweep_state
from sweep import tracking
from sweep.reconcile import PLACEMENT_GROUP_KEY, Reconciler, close_orphans

log = logging.getLogger(__name__)

# The trial function only waits on the Train controller. It reserves a token amount of memory
# and no CPU: with 0.01 CPU, 2 workers x 1 CPU deadlock on a 2-core node (measured), since
# Tune holds the trial's 0.01 while the controller waits for 2.0 of the 2 CPUs.
TRIAL_FN_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
# A cluster that advertises this custom resource (on its head or CPU nodes, see clusters/)
# gets every trial function there, off the GPU nodes, as Ray's Tune+Train guide advises.
DRIVER_RESOURCE = "trial_driver"
_PASS_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "PEFT_SWEEP_", "MLFLOW_", "DS_", "NCCL_", "TORCH_", "CUDA_VISIBLE")


class LaunchError(Exception):
    """The sweep cannot start (a user-fixable problem); nothing was launched."""


class TrialFailed(Exception):
    """A trial's failure, as one user-facing line (the traceback is in MLflow's error.txt)."""


# --- what every trial needs to know ------------------------------------------------------


@dataclass
class LaunchContext:
    """Shipped (pickled) to every trial function; plain data only."""

    sweep: str
    spec: dict[str, Any]
    spec_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    strategy: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    train_storage: str
    worker_env: dict[str, str] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # optuna: adapter + item index
    trainer_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # optuna: item -> field -> space key
    finished: dict[str, dict[str, float]] = field(default_factory=dict)  # trial_id -> metrics, on resume
    decision_board: str | None = None  # early stopping: where the scheduler's decisions are posted
    trial_fn_resources: dict[str, float] = field(default_factory=lambda: dict(TRIAL_FN_RESOURCES))
    reuse_workers: bool = True  # sweep.gang: keep each trial's workers for the next trial

    def describe(self, config: dict[str, Any]) -> tuple[str, str, int]:
        """(trial id, adapter variant, max_steps) of a Tune trial's config."""
        from trials.adapters import FAMILIES

        cfg = trial_config(config, self)
        return cfg.trial_id, FAMILIES[cfg.adapter.type].variant(cfg.adapter), cfg.trainer.max_steps


@functools.lru_cache(maxsize=4)
def _spec(spec_json: str):
    import json

    from sweep.spec import SweepSpec

    return SweepSpec.model_validate(json.loads(spec_json))


def trial_config(config: dict[str, Any], ctx: LaunchContext):
    """The TrialConfig of a Tune trial: the planned trial itself (grid, random), or one
    built from Optuna's choices with the same `build_trial` the plan uses."""
    import json

    from trials.config import TrialConfig

    if "trial" in config:
        return TrialConfig.model_validate(config["trial"])
    from sweep.expand import build_trial

    cand = ctx.candidates[int(config["candidate"])]
    keys = ctx.trainer_keys[str(cand["item"])]
    trainer = {name: config[key] for name, key in keys.items()}
    spec = _spec(json.dumps(ctx.spec, sort_keys=True))
    return build_trial(spec, Path(ctx.spec_dir), cand["adapter"], trainer, int(config["seed"]))


class TrialNamer:
    """Tune trial names are the trials' content ids (picklable: Tune stores it)."""

    def __init__(self, ctx: LaunchContext):
        self.ctx = ctx

    def __call__(self, trial: Any) -> str:
        try:
            return self.ctx.describe(trial.config)[0]
        except Exception:
            return str(trial.trial_id)


class TrialDirNamer(TrialNamer):
    def __call__(self, trial: Any) -> str:
        return f"{super().__call__(trial)}_{trial.trial_id}"


# --- inside the cluster --------------------------------------------------------------------


class _RayReporter:
    """Forwards evaluations to Ray Train (and so to Tune). Each report is a barrier across the
    trial's workers, so only evaluations are reported, never steps; the pre-training
    evaluation (step 0) is logged to MLflow but not reported.

    The final evaluation is reported from on_end, after the MLflow reporter has uploaded the
    adapter and closed the run: a scheduler may stop a trial at any report (ASHA's top rung can
    coincide with the last one), and nothing the trial produced may be lost to that."""

    def __init__(self, report, max_steps: int, decision_board: str | None = None, tune_trial_id: str = ""):
        self._report = report
        self.max_steps = max_steps
        self.decision_board = decision_board
        self.tune_trial_id = tune_trial_id

    def on_setup(self, info):
        pass

    def on_step(self, step, metrics):
        pass

    def on_eval(self, step, metrics):
        if not 0 < step < self.max_steps:
            return False
        self._report({**metrics, "step": step})
        from sweep.early_stop import should_stop

        return should_stop(self.decision_board, self.tune_trial_id, step)

    def on_end(self, result, out_dir):
        if result.get("early_stopped"):
            return  # its last evaluation is reported already; another would land in the next rung
        self._report({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _train_report(metrics: dict[str, Any]) -> None:
    """A report to Ray Train (and through TuneReportCallback to Tune). The workers' placement
    group rides along, so the driver can release it if the trial is stopped early (see
    Reconciler)."""
    import ray
    import ray.train

    pg = ray.get_runtime_context().get_placement_group_id()
    ray.train.report({**metrics, PLACEMENT_GROUP_KEY: pg or ""})


class _Fanout:
    def __init__(self, *reporters):
        self.reporters = reporters

    def on_setup(self, info):
        for r in self.reporters:
            r.on_setup(info)

    def on_step(self, step, metrics):
        for r in self.reporters:
            r.on_step(step, metrics)

    def on_eval(self, step, metrics):
        return any([bool(r.on_eval(step, metrics)) for r in self.reporters])

    def on_end(self, result, out_dir):
        for r in self.reporters:
            r.on_end(result, out_dir)


def _worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one rank of one trial."""
    import ray.train

    run_worker(config, ray.train.get_context().get_world_rank(), _train_report)


def run_worker(config: dict[str, Any], rank: int, report) -> None:
    """One rank of one trial, on a Ray Train worker or a gang worker (sweep.gang)."""
    entered = time.time()
    import shutil
    import tempfile

    from trials.config import TrialConfig
    from trials.train import run_trial

    # Orchestration cost, logged with the trial so `benchmarks/overhead.py` (or anyone) can
    # split a trial's wall time: trial function start -> this worker's code, and imports.
    overhead = {"ray.start_to_worker_s": entered - config["run"]["fn_started"],
                "ray.worker_imports_s": time.time() - entered}
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = TrialConfig.model_validate(config["trial"])
    run = {**config["run"], "cfg": cfg} if rank == 0 else None
    mlflow_reporter = tracking.MlflowReporter(run, config["adapter_block"], _placement(config["run"]), overhead)
    # Worker-local output: rank 0 uploads it to MLflow itself, so no shared filesystem is needed.
    out = Path(tempfile.mkdtemp(prefix=f"peft-sweep-{cfg.trial_id}-rank{rank}-"))
    try:
        run_trial(cfg, out, _Fanout(mlflow_reporter, _RayReporter(report, cfg.trainer.max_steps,
                                                                  config["run"].get("decision_board"),
                                                                  config["run"]["tune_trial_id"])))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        _release_memory()


def _release_memory() -> None:
    """What a trial allocated goes before the next trial on the same worker (sweep.gang)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _placement(run: dict[str, Any]) -> dict[str, str]:
    """Where this trial ran, as MLflow tags: the node and process of every worker rank
    (gathered over the trial's process group) and the node of the Tune trial function."""
    import ray
    import torch.distributed as dist

    mine = (ray.get_runtime_context().get_node_id(), os.getpid())
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {"ray.node_id": ranks[0][0], "ray.worker_node_ids": ",".join(node for node, _ in ranks),
            "ray.worker_pids": ",".join(str(pid) for _, pid in ranks),
            "ray.trial_node_id": run.get("trial_node_id") or "",
            "peft_sweep.workers": "kept" if run.get("reuse_workers") else "train-run"}


def sweep_trial(config: dict[str, Any], ctx: LaunchContext) -> None:
    """One Tune trial: run it on the trial's workers (a kept gang, or a Ray Train run),
    whose rank 0 logs the trial's MLflow child run.

    Only a failure makes this function talk to MLflow (to record the error on the child)."""
    fn_started = time.time()
    import uuid

    import ray
    from ray import tune

    from trials.adapters import FAMILIES

    try:
        cfg = trial_config(config, ctx)
    except Exception as err:  # an Optuna sample the trainer fields reject
        raise TrialFailed(f"cannot build the trial from {config}: {err}") from None
    if cfg.trial_id in ctx.finished:
        # Finished under this sweep already (the driver died before Tune recorded it):
        # report the recorded result, train nothing.
        tune.report({**ctx.finished[cfg.trial_id], "step": cfg.trainer.max_steps, "reused": 1})
        return
    family = FAMILIES[cfg.adapter.type]
    tune_trial_id = tune.get_context().get_trial_id() or "local"
    attempt = uuid.uuid4().hex
    loop_config = {
        "trial": cfg.model_dump(mode="json"),
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
        },
        "adapter_block": family.ludwig(cfg.adapter),
    }
    try:
        if ctx.reuse_workers:
            _run_on_gang(loop_config, ctx)
        else:
            _run_on_train(loop_config, ctx, f"{cfg.trial_id}_{tune_trial_id}_{attempt[:8]}")
    except Exception as err:
        message = tracking.error_message(err)
        detail = "".join(traceback.format_exception(err))
        for rank, failure in sorted((getattr(err, "worker_failures", None) or {}).items()):
            detail += f"\n--- worker rank {rank} ---\n{failure}\n"
        try:
            _record_failure(ctx, cfg, family.variant(cfg.adapter), tune_trial_id, attempt, message, detail)
        except Exception as log_err:  # MLflow unreachable: the Tune error still says why
            log.warning("could not record the failure of %s in MLflow: %s", cfg.trial_id, log_err)
        raise TrialFailed(message) from None


def _per_worker(ctx: LaunchContext) -> dict[str, float]:
    return {"CPU": ctx.cpus_per_worker, **({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker > 0 else {})}


def _run_on_gang(loop_config: dict[str, Any], ctx: LaunchContext) -> None:
    from ray import tune

    from sweep import gang

    workers = gang.acquire(ctx.workers, _per_worker(ctx), ctx.worker_env)
    try:
        workers.run(loop_config, tune.report)
    except BaseException:
        gang.discard()  # a failed trial may leave a rank mid-collective: the next trial gets new workers
        raise


def _run_on_train(loop_config: dict[str, Any], ctx: LaunchContext, name: str) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpu = ctx.gpus_per_worker > 0
    TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=ctx.workers, use_gpu=gpu,
                                               resources_per_worker=_per_worker(ctx)),
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
    client = tracking.client(ctx.tracking_uri)
    run = tracking.attempt_run(client, ctx.experiment_id, ctx.parent_run_id, attempt)
    if run is not None and run.info.status == "FINISHED":
        return  # rank 0 completed and closed it; the failure came after (e.g. the controller)
    run_id = run.info.run_id if run is not None else tracking.open_child(
        client, ctx.experiment_id, ctx.parent_run_id, ctx.sweep, cfg, variant, tune_trial_id, attempt)
    tracking.fail_child(client, run_id, message, detail)


def make_trainable(ctx: LaunchContext):
    from ray import tune

    return tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx), ctx.trial_fn_resources)


# --- the driver ---------------------------------------------------------------------------


def worker_env(spec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_PASS_ENV_PREFIXES)}
    env.pop("MLFLOW_RUN_ID", None)  # runs are addressed explicitly
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if spec.resources.gpus_per_worker <= 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _is_local_address(address: str | None) -> bool:
    if address is None or address == "auto" or address == "local":
        return True
    host = address.removeprefix("ray://").split(":")[0]
    return host in ("127.0.0.1", "localhost", "0.0.0.0", os.uname().nodename)


def init_ray(address: str | None, env: dict[str, str], *, verbose: bool) -> str | None:
    """Start an embedded Ray runtime, or connect to `address`; returns the dashboard URL."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import ray

    runtime_env: dict[str, Any] = {"env_vars": dict(env)}
    if not _is_local_address(address):
        # A remote cluster may not have this project installed: ship both packages.
        import sweep
        import trials

        runtime_env["py_modules"] = [str(Path(sweep.__file__).parent), str(Path(trials.__file__).parent)]
    kwargs: dict[str, Any] = dict(
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        ignore_reinit_error=True,
    )
    # Ray's state API, which Train's placement-group cleaner polls from inside the cluster,
    # finds "the" cluster through RAY_ADDRESS or /tmp/ray/ray_current_cluster, the last one
    # `ray start` made on the machine, not the one the caller belongs to. Where that file is
    # stale every trial's teardown waited 12 s for the cleaner, and a stopped trial's
    # placement group leaked (measured), so every process of this job gets RAY_ADDRESS.
    if address is None:
        port = free_port()
        runtime_env["env_vars"]["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            # address="local": always a new runtime, even where `ray start` left a cluster
            # that a bare ray.init() would join. Loopback keeps it reachable on hosts whose
            # primary address is not routable to itself (containers, VMs with NAT).
            info = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                            _node_ip_address="127.0.0.1", runtime_env=runtime_env, **kwargs)
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous
    else:
        if not address.startswith("ray://"):
            from ray._private.services import canonicalize_bootstrap_address

            try:
                runtime_env["env_vars"]["RAY_ADDRESS"] = canonicalize_bootstrap_address(address)
            except Exception as err:
                raise LaunchError(f"--address {address}: {str(err).splitlines()[0][:200]}") from None
        # Inside a submitted job, the job's runtime env (its working dir, the shipped packages)
        # already applies to every process of the job; nothing is merged into it. Train
        # workers get their env vars from the Train run config either way.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        try:
            info = ray.init(address=address, runtime_env=None if in_job else runtime_env, **kwargs)
        except (ConnectionError, RuntimeError) as err:
            text = str(err)
            hint = ""
            if "auth" in text.lower() or "auth" in str(err.__cause__ or "").lower():
                hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token (the token comes from "
                        "RAY_AUTH_TOKEN or ~/.ray/auth_token)")
            raise LaunchError(f"--address {address}: cannot connect to the Ray cluster "
                              f"({text.splitlines()[0][:200]}){hint}") from None
    if runtime_env["env_vars"].get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = runtime_env["env_vars"]["RAY_ADDRESS"]
    url = getattr(info, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = "http://" + url
    return url


def _quiet_ray_logs(verbose: bool) -> None:
    if verbose:
        return
    for name in ("ray", "ray.train", "ray.air", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Tune logs every trial failure with its traceback; the progress view already says which
    # trial failed and why, and the traceback is the child run's error.txt.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _reports_per_trial(spec) -> int:
    """The most Tune reports a trial makes: one per eval_every steps, and one at the end."""
    from sweep.expand import candidates
    from sweep.spec import Distribution

    best = 1
    cands, _ = candidates(spec)
    for cand in cands:
        steps, every = cand.trainer["max_steps"], cand.trainer["eval_every"]
        if isinstance(steps, Distribution) or isinstance(every, Distribution):
            continue
        best = max([best] + [_ceil_div(s, e) for s in steps for e in every])
    return best


def _scheduler(spec):
    if spec.scheduler.type != "asha":
        return None
    from sweep.early_stop import DecidingASHA, board_name

    # One past the last report by default: a trial that reaches its final evaluation is never
    # stopped by the scheduler while it saves and uploads its adapter.
    max_t = spec.scheduler.max_t or _reports_per_trial(spec) + 1
    return DecidingASHA(board_name(spec.name), time_attr="training_iteration", max_t=max_t, grace_period=min(spec.scheduler.grace_period, max_t),
                         reduction_factor=spec.scheduler.reduction_factor)


def optuna_space(spec, plan) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, str]]]:
    """Optuna's search space over {candidate, trainer fields, seed}, and how to read it back.

    A trainer field shares one key across adapter items when they search it the same way;
    an item with its own space for a field gets its own key (Optuna samples it regardless,
    the trial reads the one of its item)."""
    import json

    from ray import tune

    from sweep.spec import Distribution

    cands = [{"item": a_item, "adapter": adapter} for a_item, adapter in _valid_candidates(plan)]
    if not cands:
        return {}, [], {}
    space: dict[str, Any] = {"candidate": tune.choice(list(range(len(cands)))), "seed": tune.choice(list(spec.search.seeds))}
    keys: dict[str, dict[str, str]] = {}
    by_item = {c.item: c.trainer for c in plan_expansion_candidates(plan)}
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
    from ray import tune

    from sweep.spec import Distribution

    if isinstance(value, Distribution):
        if value.distribution == "choice":
            return tune.choice(list(value.values))
        if value.distribution == "uniform":
            return tune.uniform(value.low, value.high)
        return tune.loguniform(value.low, value.high)
    return tune.choice(list(value))


def _valid_candidates(plan) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for cand in plan_expansion_candidates(plan):
        check = next((c for a, c in plan.candidates if a == cand.adapter), None)
        if check is not None and not check.errors:
            out.append((cand.item, cand.adapter))
    return out


def plan_expansion_candidates(plan):
    """The expansion's candidates (with their item and trainer space), cached on the plan."""
    cached = getattr(plan, "_expansion_candidates", None)
    if cached is None:
        from sweep.expand import candidates

        cached, _ = candidates(plan.spec)
        plan._expansion_candidates = cached
    return cached


def _optuna_seed(name: str) -> int:
    return int(hashlib.sha256(f"peft-sweep:{name}".encode()).hexdigest()[:8], 16)


@dataclass
class Outcome:
    counts: dict[str, int]
    best: dict[str, Any] | None
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.counts.get("ERROR", 0) else 0


def build_context(spec, spec_dir: Path, plan, *, tracking_uri: str, experiment_id: str, parent_run_id: str,
                  storage: str) -> LaunchContext:
    ctx = LaunchContext(
        sweep=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_dir=str(spec_dir),
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        strategy=spec.search.strategy,
        workers=spec.resources.workers_per_trial,
        cpus_per_worker=spec.resources.cpus_per_worker,
        gpus_per_worker=spec.resources.gpus_per_worker,
        train_storage=sweep_state.join(storage, "_train"),
        worker_env=worker_env(spec),
        reuse_workers=spec.resources.reuse_workers,
    )
    import ray

    if ray.is_initialized() and ray.cluster_resources().get(DRIVER_RESOURCE):
        ctx.trial_fn_resources[DRIVER_RESOURCE] = 0.001
    if spec.scheduler.type == "asha":
        from sweep.early_stop import board_name

        ctx.decision_board = board_name(spec.name)
    if spec.search.strategy == "optuna":
        _, ctx.candidates, ctx.trainer_keys = optuna_space(spec, plan)
    return ctx


def _tune_configs(spec, plan, ctx: LaunchContext):
    from ray import tune

    tune_config: dict[str, Any] = dict(
        metric=spec.metric.name,
        mode="min" if spec.metric.goal == "minimize" else "max",
        max_concurrent_trials=spec.resources.max_concurrent_trials,
        scheduler=_scheduler(spec),
        trial_name_creator=TrialNamer(ctx),
        trial_dirname_creator=TrialDirNamer(ctx),
        # Tune keeps a trial function's process for the next trial, and with it the gang of
        # workers that process holds (sweep.gang).
        reuse_actors=ctx.reuse_workers,
    )
    if spec.search.strategy == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        space, _, _ = optuna_space(spec, plan)
        tune_config["search_alg"] = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=_optuna_seed(spec.name)))
        tune_config["num_samples"] = spec.search.num_samples
        param_space = space
    else:
        param_space = {"trial": tune.grid_search([t.trial.model_dump(mode="json") for t in plan.trials])}
    return tune.TuneConfig(**tune_config), param_space


def _tune_run_config(spec, storage: str):
    from ray import tune

    from sweep.progress import SweepCallback

    parent, name = storage.rstrip("/").rsplit("/", 1)
    return tune.RunConfig(
        name=name,
        storage_path=parent,
        failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
        callbacks=[SweepCallback()],
        verbose=0,
    )


def _fit(tuner, ctx: LaunchContext, spec, describe_total: int | None, *, quiet: bool, console) -> Outcome:
    from sweep.progress import Progress

    progress = Progress(spec.name, spec.metric.name, spec.metric.goal, ctx.describe, quiet=quiet, console=console,
                        expected=describe_total)
    reconciler = Reconciler(ctx)
    from sweep.progress import attach, detach

    attach(reconciler)
    interrupted = False
    results = None
    try:
        with progress:
            try:
                results = tuner.fit()
            except KeyboardInterrupt:
                interrupted = True
    finally:
        detach(reconciler)
    counts: dict[str, int] = {}
    best = None
    if results is not None:
        for r in results:
            status = "ERROR" if r.error is not None else "TERMINATED"
            counts[status] = counts.get(status, 0) + 1
        best = _best(results, spec, ctx)
    if not interrupted:
        close_orphans(ctx)
    return Outcome(counts, best, interrupted)


def _best(results, spec, ctx: LaunchContext) -> dict[str, Any] | None:
    pick = min if spec.metric.goal == "minimize" else max
    scored = []
    for r in results:
        value = (r.metrics or {}).get(spec.metric.name)
        if r.error is None and isinstance(value, (int, float)) and math.isfinite(value):
            try:
                trial_id = trial_config(r.config, ctx).trial_id
            except Exception:
                trial_id = r.path
            scored.append((value, trial_id))
    if not scored:
        return None
    value, trial_id = pick(scored, key=lambda s: s[0])
    return {"trial_id": trial_id, "value": value, "metric": spec.metric.name}


def spec_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_sweep(spec, spec_path: Path, spec_dir: Path, plan, *, address: str | None, storage_root: str | None,
              tracking_uri: str | None, quiet: bool, verbose: bool, console) -> Outcome:
    from ray import tune

    root = storage_root or str(spec_dir / "runs")
    if not sweep_state.is_uri(root):
        root = str(Path(root).expanduser().resolve())
    storage = sweep_state.join(root, spec.name)
    if sweep_state.read_bytes(sweep_state.join(storage, sweep_state.STATE_FILE)) is not None:
        raise sweep_state.StateError(
            f"{storage} already holds sweep {spec.name!r}: continue it with `sweep resume {storage}`, "
            "or pass another --storage (or rename the sweep)"
        )
    uri = tracking.resolve_tracking_uri(tracking_uri, spec, spec_dir)
    _check_tracking(uri)
    dashboard = init_ray(address, worker_env(spec), verbose=verbose)
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, spec.tracking.experiment or spec.name, uri)
    parent_run_id = tracking.start_sweep_run(client, experiment_id, spec, spec_path, plan.to_json(), storage)
    st = sweep_state.SweepState(
        name=spec.name, spec_path=str(spec_path.resolve()), spec_sha256=spec_sha256(spec_path), storage=storage,
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id, strategy=spec.search.strategy,
        address=address,
    )
    sweep_state.save(st)
    ctx = build_context(spec, spec_dir, plan, tracking_uri=uri, experiment_id=experiment_id,
                        parent_run_id=parent_run_id, storage=storage)
    _announce(console, quiet, spec, st, dashboard, uri)
    _quiet_ray_logs(verbose)
    tune_config, param_space = _tune_configs(spec, plan, ctx)
    tuner = tune.Tuner(make_trainable(ctx), param_space=param_space, tune_config=tune_config,
                       run_config=_tune_run_config(spec, storage))
    total = spec.search.num_samples if spec.search.strategy == "optuna" else len(plan.trials)
    return _finish(tuner, ctx, spec, st, client, total, quiet=quiet, console=console)


def resume_sweep(name_or_path: str, *, address: str | None, quiet: bool, verbose: bool, retry_failed: bool,
                 console) -> Outcome:
    from ray import tune

    from sweep.plan import make_plan
    from sweep.spec import SpecError, load_spec

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
    _check_tracking(st.tracking_uri)
    dashboard = init_ray(address if address is not None else st.address, worker_env(spec), verbose=verbose)
    client = tracking.client(st.tracking_uri)
    tracking.reopen(client, st.parent_run_id)
    ctx = build_context(spec, spec_dir, plan, tracking_uri=st.tracking_uri, experiment_id=st.experiment_id,
                        parent_run_id=st.parent_run_id, storage=storage)
    ctx.finished = tracking.finished_trials(client, st.experiment_id, st.parent_run_id)
    _announce(console, quiet, spec, st, dashboard, st.tracking_uri, resumed=True)
    _quiet_ray_logs(verbose)
    # Finished trials are kept; interrupted ones re-run from scratch (trials keep no checkpoints);
    # errored ones stay failed unless asked, since a deterministic failure would fail again.
    tuner = tune.Tuner.restore(storage, trainable=make_trainable(ctx), resume_unfinished=True,
                               resume_errored=False, restart_errored=retry_failed)
    st.status = "running"
    sweep_state.save(st)
    total = spec.search.num_samples if spec.search.strategy == "optuna" else len(plan.trials)
    return _finish(tuner, ctx, spec, st, client, total, quiet=quiet, console=console)


def _finish(tuner, ctx, spec, st, client, total, *, quiet, console) -> Outcome:
    started = time.time()
    from sweep.early_stop import start_board, stop_board

    board = start_board(spec.name) if ctx.decision_board else None
    try:
        outcome = _fit(tuner, ctx, spec, total, quiet=quiet, console=console)
    finally:
        stop_board(board)
    tracking.finish_sweep_run(client, st.parent_run_id, outcome.counts, outcome.best, interrupted=outcome.interrupted)
    st.status = "interrupted" if outcome.interrupted else ("failed" if outcome.counts.get("ERROR") else "finished")
    sweep_state.save(st)
    done = outcome.counts.get("TERMINATED", 0)
    failed = outcome.counts.get("ERROR", 0)
    line = f"sweep {spec.name}: {done} finished, {failed} failed in {time.time() - started:.1f}s"
    if outcome.best:
        line += f"; best {outcome.best['trial_id']} {outcome.best['metric']}={outcome.best['value']:.4g}"
    console.print(line, highlight=False, soft_wrap=True)
    if st.tracking_uri.startswith(("http://", "https://")):
        console.print(f"runs: {st.tracking_uri.rstrip('/')}/#/experiments/{st.experiment_id}/runs/{st.parent_run_id}",
                      highlight=False, soft_wrap=True)
    return outcome


def _check_tracking(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=15) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise LaunchError(f"cannot reach the MLflow tracking server at {uri}: {getattr(err, 'reason', err)}") from None


def _announce(console, quiet: bool, spec, st, dashboard: str | None, uri: str, resumed: bool = False) -> None:
    verb = "resuming" if resumed else "running"
    console.print(f"{verb} sweep {spec.name}: storage {st.storage}", highlight=False, soft_wrap=True)
    console.print(f"mlflow: {uri} (experiment {spec.tracking.experiment or spec.name}, parent run {st.parent_run_id})",
                  highlight=False, soft_wrap=True)
    if dashboard:
        console.print(f"ray dashboard: {dashboard}", highlight=False, soft_wrap=True)
