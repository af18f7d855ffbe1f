"""A trial's workers, kept for the next trial (`resources.reuse_workers: true`, the default).

A Ray Train run starts a controller and fresh worker processes for every trial; measured on
2 CPU cores that costs ~11 s before the workers run any code, and the workers' imports
(torch, transformers, PEFT, DeepSpeed, MLflow) another ~6 s, per trial. A gang is the same
workers started once: N actors placed together in one placement group (all of a trial's
GPUs are reserved at once, or the trial waits), with one torch.distributed process group
(gloo on CPU, NCCL on GPU) and the imports done. Each Tune trial function keeps its gang
in its process (Tune reuses the trial actor between trials), so the next trial only pays
for its own model, adapter and DeepSpeed set-up.

What is given up is process isolation between trials: a trial that fails takes its gang
down with it (the next trial starts a new one), but a trial that leaks memory or global
state leaves it for the next. `reuse_workers: false` runs every trial as its own Ray Train
run instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sweep.launch.worker import run_worker
from sweep.util.net import free_port

log = logging.getLogger(__name__)

FAILURE_GRACE_S = 30.0  # how long the other ranks get to end after one rank failed


def assign_devices(placements: list[tuple[str, list[str]]]) -> list[tuple[str | None, int]]:
    """(CUDA_VISIBLE_DEVICES, LOCAL_RANK) for each rank, from (node id, Ray's GPU ids) per rank.

    Ray gives each GPU actor only its own GPU, which hides the peer GPUs NCCL uses for
    peer-to-peer and NVLink transfers; Ray Train shows co-located workers the union of their
    GPUs and each selects its own by index. So do the ranks of a gang. Ranks without GPUs
    get (None, 0)."""
    union: dict[str, set[str]] = {}
    for node, gpus in placements:
        union.setdefault(node, set()).update(gpus)
    visible = {node: sorted(ids, key=lambda g: (len(g), g)) for node, ids in union.items()}  # numeric order
    return [(",".join(visible[node]), visible[node].index(gpus[0])) if gpus else (None, 0)
            for node, gpus in placements]


class GangWorker:
    """One rank. A threaded actor: `run` trains while `take_reports` hands rank 0's
    evaluations to the trial function."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.reports: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port("")

    def placement(self) -> tuple[str, list[str]]:
        """This rank's node and the GPUs Ray assigned it."""
        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    def connect(self, master: tuple[str, int], backend: str, visible: str | None, local_rank: int,
                timeout_s: float) -> str:
        """Join the gang's process group and import what every trial needs; returns the node id."""
        # Before CUDA initializes in this process: the rank then sees its node's gang GPUs.
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world), "LOCAL_RANK": str(local_rank),
                           "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])})
        # Worker-side imports: the trial actor that builds the gang never loads torch.
        import torch.distributed as dist

        from trials.dist import import_deepspeed

        if backend == "nccl":
            import torch

            torch.cuda.set_device(local_rank)
        # An explicit timeout (torch's NCCL default is 10 minutes): model loading skewed across
        # nodes or a slow tracking server must not trip the watchdog of a healthy trial.
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=timeout_s))
        for module in ("trials.train", "sweep.tracking.reporter"):  # torch, transformers, PEFT, MLflow
            importlib.import_module(module)
        import_deepspeed()
        return ray.get_runtime_context().get_node_id()

    def run(self, config: dict[str, Any]) -> None:
        run_worker(config, self.rank, self._report)

    def _report(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            with self.lock:
                self.reports.append(metrics)

    def take_reports(self) -> list[dict[str, Any]]:
        with self.lock:
            out, self.reports = self.reports, []
        return out


class Gang:
    def __init__(self, workers: int, per_worker: dict[str, float], env: dict[str, str], timeout_s: float = 1800.0):
        self.size = workers
        self.pg = placement_group([dict(per_worker)] * workers, strategy="PACK")
        ray.get(self.pg.ready())  # waits, never fails, while the cluster is busy
        gpu = per_worker.get("GPU", 0) > 0
        actor = ray.remote(GangWorker)
        self.workers = [
            actor.options(
                num_cpus=per_worker.get("CPU", 0), num_gpus=per_worker.get("GPU", 0), max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env} if env else None,
            ).remote(i, workers)
            for i in range(workers)
        ]
        devices = assign_devices(ray.get([w.placement.remote() for w in self.workers]))
        master = ray.get(self.workers[0].address.remote())
        self.nodes = ray.get([w.connect.remote(master, "nccl" if gpu else "gloo", visible, local, timeout_s)
                              for w, (visible, local) in zip(self.workers, devices)])

    def run(self, config: dict[str, Any], report) -> None:
        """Run one trial on every rank; forwards rank 0's reports as they come. Raises the
        first rank's failure (after which the gang must not be reused)."""
        pending = [w.run.remote(config) for w in self.workers]
        failure: BaseException | None = None
        failed_at = 0.0
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            for ref in done:
                try:
                    ray.get(ref)
                except BaseException as err:  # noqa: BLE001 (re-raised below)
                    if failure is None:
                        failure, failed_at = err, time.monotonic()
            for metrics in ray.get(self.workers[0].take_reports.remote()):
                report(metrics)
            if failure is not None and pending and time.monotonic() - failed_at > FAILURE_GRACE_S:
                break  # the other ranks are stuck in a collective the failed one left
        if failure is not None:
            raise failure

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


_gang: Gang | None = None
_gang_key: tuple | None = None


def acquire(workers: int, per_worker: dict[str, float], env: dict[str, str], timeout_s: float = 1800.0) -> Gang:
    """This trial process's gang, started on first use."""
    global _gang, _gang_key
    key = (workers, tuple(sorted(per_worker.items())), tuple(sorted(env.items())), timeout_s)
    if _gang is not None and _gang_key != key:
        discard()
    if _gang is None:
        _gang, _gang_key = Gang(workers, per_worker, env, timeout_s), key
    return _gang


def discard() -> None:
    global _gang, _gang_key
    if _gang is not None:
        try:
            _gang.shutdown()
        except Exception as err:  # already gone with a dead node
            log.warning("could not shut the trial workers down: %s", err)
    _gang, _gang_key = None, None
