"""The kept gang of trial workers on a real Ray head, with real DeepSpeed trials logging to a
real `mlflow server`: one set of processes serves trial after trial, and a failed trial's
gang is discarded so the next trial starts on new processes."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
import ray
from mlflow import MlflowClient
from sweeping import EVAL_EVERY, write_spec

from sweep.launch import gang
from sweep.launch.context import LaunchContext
from sweep.launch.runtime import worker_env
from sweep.launch.trial_fn import per_worker, worker_config
from sweep.spec import load_spec, make_plan
from sweep.tracking import layout, runs

pytestmark = pytest.mark.slow  # a Ray head, an mlflow server, DeepSpeed workers


def _plan(tmp_path, tiny_model, mlflow_server, adapters: list[dict]):
    spec_path = write_spec(tmp_path, f"gang-{uuid.uuid4().hex[:6]}", tiny_model, mlflow_server.uri, adapters)
    spec, spec_dir = load_spec(spec_path)
    plan = make_plan(spec, spec_dir)
    client = MlflowClient(mlflow_server.uri)
    exp = runs.ensure_experiment(client, spec.name, mlflow_server.uri)
    parent = runs.start_sweep_run(client, exp, spec, spec_path, plan.to_json(), str(tmp_path))
    ctx = LaunchContext(sweep=spec.name, tracking_uri=mlflow_server.uri, experiment_id=exp, parent_run_id=parent,
                        strategy="grid", workers=2, cpus_per_worker=1, gpus_per_worker=0,
                        train_storage=str(tmp_path), inputs=plan.expansion.inputs, worker_env=worker_env(spec))
    return ctx, [t.trial for t in plan.trials], client


@pytest.fixture()
def planned(tmp_path, tiny_model, mlflow_server):
    yield _plan(tmp_path, tiny_model, mlflow_server, [{"type": "lora", "r": [4, 8], "target_modules": ["q_proj", "v_proj"]}])
    gang.discard()  # never leave the head's CPUs held for the next test


def _run(ctx, cfg, reports: list) -> None:
    workers = gang.acquire(ctx.workers, per_worker(ctx), ctx.worker_env)
    config = worker_config(ctx, cfg, tune_trial_id=f"tune-{cfg.trial_id}", attempt=uuid.uuid4().hex,
                           fn_started=time.time())
    workers.run(config, reports.append)


def _pids(client, ctx) -> list[tuple[str, str, str]]:
    return [(r.data.tags[layout.TRIAL_ID_TAG], r.info.status, r.data.tags.get("ray.worker_pids", ""))
            for r in layout.children(client, ctx.experiment_id, ctx.parent_run_id)]


def test_one_gang_serves_trial_after_trial(ray_driver, planned):
    ctx, (first, second), client = planned
    reports: list[dict] = []
    _run(ctx, first, reports)
    kept = gang.acquire(ctx.workers, per_worker(ctx), ctx.worker_env)
    _run(ctx, second, reports)
    assert gang.acquire(ctx.workers, per_worker(ctx), ctx.worker_env) is kept
    (a, status_a, pids_a), (b, status_b, pids_b) = _pids(client, ctx)
    assert {a, b} == {first.trial_id, second.trial_id} and status_a == status_b == "FINISHED"
    assert len(set(pids_a.split(","))) == 2 and pids_a == pids_b  # the same two processes, both trials
    # Rank 0's evaluations reached the caller: one per eval_every, and the final result.
    assert [r["step"] for r in reports if "eval_loss" in r and "wall_s" not in r] == [EVAL_EVERY, EVAL_EVERY]
    assert sum("wall_s" in r for r in reports) == 2


def test_a_failed_trial_takes_its_gang_down_and_the_next_starts_fresh(ray_driver, planned, tmp_path):
    ctx, (first, _), client = planned
    broken = first.model_copy(update={"data": first.data.model_copy(update={"train": str(tmp_path / "gone.jsonl")})})
    failed = gang.acquire(ctx.workers, per_worker(ctx), ctx.worker_env)
    with pytest.raises(ray.exceptions.RayTaskError, match="gone.jsonl"):
        _run(ctx, broken, [])
    gang.discard()  # what the trial function does after any failure
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(failed.workers[0].take_reports.remote(), timeout=60)
    _run(ctx, first, [])
    fresh = gang.acquire(ctx.workers, per_worker(ctx), ctx.worker_env)
    assert fresh is not failed
    finished = [pids for _, status, pids in _pids(client, ctx) if status == "FINISHED"]
    assert len(finished) == 1
    dashboard = ray_driver.dashboard
    assert set(finished[0].split(",")) == _actor_pids(fresh, dashboard)
    assert not _actor_pids(failed, dashboard) & _actor_pids(fresh, dashboard)  # new processes


# The families whose undoing differs: LoRA (adapter only), PiSSA (SVD-rewritten base weights),
# CorDA (covariance-rewritten, from calibration forwards on the kept model), OFT, LN tuning
# (copies of the norms). Dropout 0, so every trial is deterministic.
KEPT_SEQUENCE = [
    {"type": "lora", "r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    {"type": "lora", "r": 8, "alpha": 8, "init_lora_weights": "pissa", "dropout": 0.0},
    {"type": "lora", "r": 8, "alpha": 8, "init_lora_weights": "corda", "target_modules": ["q_proj", "v_proj"],
     "corda_samples": 8, "dropout": 0.0},
    {"type": "oft", "oft_block_size": 16},
    {"type": "ln_tuning"},
]


def _final(ctx, cfg) -> dict:
    reports: list[dict] = []
    _run(ctx, cfg, reports)
    (final,) = [r for r in reports if "base_model_reused" in r]
    return final


def test_kept_workers_keep_the_base_model_and_train_the_same(ray_driver, tmp_path, tiny_model, mlflow_server):
    """One gang runs the five families in sequence twice: keeping the base model loaded (each
    trial after the first takes the previous trial's model, adapter removed and rewritten
    weights restored) and reading it for every trial. Every trial ends at the same eval loss
    both ways; another dtype or another base model is read fresh."""
    ctx, trials, _ = _plan(tmp_path, tiny_model, mlflow_server, KEPT_SEQUENCE)
    assert [t.adapter.type for t in trials] == ["lora", "lora", "lora", "oft", "ln_tuning"]
    try:
        kept = [_final(ctx, cfg) for cfg in trials]
        ctx.keep_base_model = False
        fresh = [_final(ctx, cfg) for cfg in trials]
        assert [r["base_model_reused"] for r in kept] == [0, 1, 1, 1, 1]
        assert [r["base_model_reused"] for r in fresh] == [0] * 5
        for cfg, k, f in zip(trials, kept, fresh):
            assert k["eval_loss"] == pytest.approx(f["eval_loss"], abs=1e-6), cfg.trial_id
            assert k["eval_loss"] < k["eval_loss_before"]

        ctx.keep_base_model = True
        lora = trials[0]
        bf16 = lora.model_copy(update={"deepspeed": lora.deepspeed.model_copy(update={"precision": "bf16"})})
        other = tmp_path / "same-weights-elsewhere"
        shutil.copytree(tiny_model, other)
        moved = lora.model_copy(update={"model": lora.model.model_copy(update={"base_model": str(other)})})
        reused = [_final(ctx, cfg)["base_model_reused"] for cfg in (lora, lora, bf16, bf16, moved, moved)]
        assert reused == [0, 1, 0, 1, 0, 1]
    finally:
        gang.discard()


def _actor_pids(g: gang.Gang, dashboard: str) -> set[str]:
    """The OS processes of a gang's actors, from Ray's state API."""
    from ray.util.state import get_actor

    return {str(get_actor(w._actor_id.hex(), address=dashboard).pid) for w in g.workers}
