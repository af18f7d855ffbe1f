"""The worker side: one DeepSpeed rank of one trial, on a kept gang worker or a Ray Train
worker. It runs `trials.train.run_trial` with two reporters: MLflow (rank 0 logs the child
run) and Ray (evaluations go to Tune, and the scheduler's decision comes back)."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from sweep.launch.context import PLACEMENT_GROUP_KEY
from sweep.launch.early_stop import should_stop
from sweep.launch.forwarding import receive

if TYPE_CHECKING:
    from trials.config import TrialConfig


class RayReporter:
    """Forwards evaluations to Ray Train (and so to Tune). Each report is a barrier across the
    trial's workers, so only evaluations are reported, never steps; the pre-training
    evaluation (step 0) is logged to MLflow but not reported.

    The final evaluation is reported from on_end, after the MLflow reporter has uploaded the
    adapter and closed the run: a scheduler may stop a trial at any report (ASHA's top rung can
    coincide with the last one), and nothing the trial produced may be lost to that."""

    def __init__(self, report, max_steps: int, decision_board: str | None = None, tune_trial_id: str = "",
                 metric: str = "eval_loss"):
        self._report = report
        self.max_steps = max_steps
        self.metric = metric
        self.decision_board = decision_board
        self.tune_trial_id = tune_trial_id

    def on_setup(self, info):
        pass

    def on_step(self, step, metrics):
        pass

    def on_eval(self, step, metrics):
        # Evaluations without the ranking metric (generation only at the end) are not sent:
        # Tune rejects a result that lacks it. The plan refuses ASHA in that case.
        if not 0 < step < self.max_steps or self.metric not in metrics:
            return False
        self._report({**metrics, "step": step})
        return should_stop(self.decision_board, self.tune_trial_id, step)

    def on_end(self, result, out_dir):
        if result.get("early_stopped"):
            return  # its last evaluation is reported already; another would land in the next rung
        self._report({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _train_report(metrics: dict[str, Any]) -> None:
    """A report to Ray Train (and through TuneReportCallback to Tune). The workers' placement
    group rides along, so the driver can release it if the trial is stopped early (see
    sweep.launch.reconcile)."""
    import ray.train  # only the Ray Train path (reuse_workers: false) loads Train

    pg = ray.get_runtime_context().get_placement_group_id()
    ray.train.report({**metrics, PLACEMENT_GROUP_KEY: pg or ""})


class Fanout:
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


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: one rank of one trial."""
    import ray.train

    run_worker(config, ray.train.get_context().get_world_rank(), _train_report)


def run_worker(config: dict[str, Any], rank: int, report) -> None:
    """One rank of one trial, on a Ray Train worker or a gang worker (sweep.launch.gang)."""
    entered = time.time()
    # torch, transformers, PEFT, DeepSpeed and MLflow load here, in the worker, not in the
    # trial actor that imports this module to start the workers (~6 s on 2 CPUs, measured).
    from sweep.tracking.reporter import MlflowReporter
    from trials.train import run_trial

    # Orchestration cost, logged with the trial so `benchmarks/overhead.py` (or anyone) can
    # split a trial's wall time: trial function start -> this worker's code, and imports.
    overhead = {"ray.start_to_worker_s": entered - config["run"]["fn_started"],
                "ray.worker_imports_s": time.time() - entered}
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if config["run"].get("forwarded"):
        receive(config["run"]["sweep"])  # before MLflow's client: it may need the forwarded credentials
    cfg: TrialConfig = config["trial"]  # pickled by Ray: already validated
    run = {**config["run"], "cfg": cfg} if rank == 0 else None
    mlflow_reporter = MlflowReporter(run, config["adapter_block"], placement(config["run"]), overhead)
    # Worker-local output: rank 0 uploads it to MLflow itself, so no shared filesystem is needed.
    out = Path(tempfile.mkdtemp(prefix=f"peft-sweep-{cfg.trial_id}-rank{rank}-"))
    try:
        run_trial(cfg, out, Fanout(mlflow_reporter, RayReporter(report, cfg.trainer.max_steps,
                                                                config["run"].get("decision_board"),
                                                                config["run"]["tune_trial_id"],
                                                                config["run"].get("metric", "eval_loss"))),
                  keep_base_model=bool(config["run"].get("keep_base_model")))
    finally:
        mlflow_reporter.close()
        shutil.rmtree(out, ignore_errors=True)
        _release_memory()


def _release_memory() -> None:
    """What a trial allocated goes before the next trial on the same worker (sweep.launch.gang)."""
    import torch  # loaded by the trial already

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def placement(run: dict[str, Any]) -> dict[str, str]:
    """Where this trial ran, as MLflow tags: the node and process of every worker rank
    (gathered over the trial's process group) and the node of the Tune trial function."""
    import torch.distributed as dist  # loaded by the trial already

    mine = (ray.get_runtime_context().get_node_id(), os.getpid())
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {"ray.node_id": ranks[0][0], "ray.worker_node_ids": ",".join(node for node, _ in ranks),
            "ray.worker_pids": ",".join(str(pid) for _, pid in ranks),
            "ray.trial_node_id": run.get("trial_node_id") or "",
            # Names only, of the forwarded variables this rank holds: that they arrived, never what they are.
            "peft_sweep.forwarded_env": ",".join(n for n in run.get("forwarded", []) if n in os.environ),
            "peft_sweep.workers": "kept" if run.get("reuse_workers") else "train-run"}
