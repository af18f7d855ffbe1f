"""The Ray runtime a sweep runs on: an embedded local one, or a cluster it connects to, and
the environment its workers get."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
from ray._private.services import canonicalize_bootstrap_address

import sweep
import trials
from sweep.errors import LaunchError

log = logging.getLogger(__name__)
from sweep.util.net import free_port
from sweep.util.secrets import is_secret

_PASS_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "PEFT_SWEEP_", "MLFLOW_", "DS_", "NCCL_", "TORCH_", "CUDA_VISIBLE")


def worker_env(spec) -> dict[str, str]:
    """The environment the sweep's workers get through Ray's runtime env. Ray logs it and Tune
    stores it with every trial, so no credential is ever in it (sweep.util.secrets); a user
    who needs one on the workers forwards it (`--forward-env`, sweep.launch.forwarding)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_PASS_ENV_PREFIXES) and not is_secret(k)}
    # Runs are addressed explicitly, and a URI may carry a password.
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # DeepSpeed's accelerator follows the trial's resources, never the driver's shell: a
    # DS_ACCELERATOR=cpu left there would build CPU engines on GPU workers.
    env.pop("DS_ACCELERATOR", None)
    if spec.resources.gpus_per_worker <= 0:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def is_local_address(address: str | None) -> bool:
    if address is None or address == "auto" or address == "local":
        return True
    host = address.removeprefix("ray://").split(":")[0]
    return host in ("127.0.0.1", "localhost", "0.0.0.0", os.uname().nodename)


def local_resource_problems(spec) -> list[str]:
    """What one trial asks of the embedded runtime that this machine cannot give: its workers
    share one placement group, which Ray would wait for forever (a silent hang)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    r = spec.resources
    cpus, gpus = get_num_cpus(), get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    need_cpus, need_gpus = r.workers_per_trial * r.cpus_per_worker, r.workers_per_trial * r.gpus_per_worker
    problems = []
    if need_cpus > cpus:
        problems.append(f"resources: one trial needs {need_cpus:g} CPUs in one placement group (workers_per_trial "
                        f"{r.workers_per_trial} x cpus_per_worker {r.cpus_per_worker:g}) and this machine has {cpus}; "
                        "lower them, or pass --address of a cluster that has them (nothing was started)")
    if need_gpus > gpus:
        problems.append(f"resources: one trial needs {need_gpus:g} GPUs (workers_per_trial {r.workers_per_trial} x "
                        f"gpus_per_worker {r.gpus_per_worker:g}) and this machine has {gpus}; use gpus_per_worker: 0, "
                        "or pass --address of a cluster with GPUs (nothing was started)")
    return problems


def _device_memory_gb() -> float:
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def cluster_gpu_memory_gb(timeout_s: float = 120.0) -> float | None:
    """The memory of one of the connected cluster's GPUs, as CUDA reports it on a GPU node
    (a one-GPU task); None without GPUs, or when none is free within the timeout."""
    if not ray.cluster_resources().get("GPU"):
        return None
    ref = ray.remote(num_gpus=1, num_cpus=0)(_device_memory_gb).remote()
    try:
        return float(ray.get(ref, timeout=timeout_s))
    except Exception as err:  # GPUs all busy, or the probe failed: the estimate stays unverified
        ray.cancel(ref, force=True)
        log.warning("could not read the cluster's GPU memory (%s); the memory estimate is not checked", err)
        return None


def memory_warnings(plan, gpu_memory_gb: float) -> list[str]:
    """Trials whose estimated peak per worker exceeds the cluster's GPU memory."""
    over = [t for t in plan.trials if t.estimate is not None and t.estimate.peak_memory_mb > gpu_memory_gb * 1024]
    if not over:
        return []
    worst = max(over, key=lambda t: t.estimate.peak_memory_mb)
    return [f"{len(over)} of {len(plan.trials)} trials are estimated to need more than the cluster's "
            f"{gpu_memory_gb:.0f} GiB per GPU (largest: {worst.trial.trial_id}, "
            f"{worst.estimate.peak_memory_mb / 1024:.1f} GiB); consider trainer.gradient_checkpointing, "
            "a smaller batch_size or max_length, or deepspeed.zero_stage: 3"]


def init_ray(address: str | None, env: dict[str, str], *, verbose: bool) -> str | None:
    """Start an embedded Ray runtime, or connect to `address`; returns the dashboard URL."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not verbose:
        # A quiet start: the first lines a user sees are the plan and where the runs go. Ray
        # announces its (default) token authentication at every start, MLflow every new store.
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    runtime_env: dict[str, Any] = {"env_vars": dict(env)}
    if not is_local_address(address):
        # A remote cluster may not have this project installed: ship both packages.
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


def quiet_ray_logs(verbose: bool) -> None:
    if verbose:
        return
    for name in ("ray", "ray.train", "ray.air", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Tune logs every trial failure with its traceback; the progress view already says which
    # trial failed and why, and the traceback is the child run's error.txt.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
