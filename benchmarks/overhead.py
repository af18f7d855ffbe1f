"""Orchestration overhead: the same trials bare under `torchrun`, through `sweep run`, and
Ray's own floor (a Ray Tune trial whose Ray Train run has an empty train loop).

Every trial is the quickstart model and data, 2 workers (ZeRO-2, CPU), a fixed number of
steps. Prints per-trial wall times, the training time inside each, the ratio of `sweep run`
to bare against the 1.3x target, and where a `sweep run` trial's time goes:
    python benchmarks/overhead.py [--trials 3] [--steps 20] [--out overhead.json]

Per-trial numbers for `sweep run` come from what each trial logged to MLflow: the time from
the Tune trial function's start to the worker's code (Ray Train's controller, worker
actors, process group), the worker's imports, model + adapter + DeepSpeed set-up, training
and evaluation, and the rest of the trial's share of the sweep's wall time (Ray start,
scheduling, report barriers, upload, Train shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "models" / "tiny-llama"
DATA = ROOT / "examples" / "data" / "quickstart"
TARGET = 1.3
RANKS = (4, 8, 16, 32, 12, 24)


def spec(root: Path, trials: int, steps: int) -> Path:
    body = {
        "name": "overhead-bench",
        "model": {"base_model": str(MODEL)},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl"), "max_length": 32},
        "search": {
            "seeds": [0],
            "adapters": [{"type": "lora", "r": list(RANKS[:trials]), "alpha": 16}],
            "trainer": {"learning_rate": 1e-3, "max_steps": steps, "batch_size": 16, "eval_every": steps,
                        "eval_batches": 4},
        },
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "deepspeed": {"zero_stage": 2},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def bare(spec_path: Path, root: Path) -> list[dict]:
    """Each planned trial as its own `torchrun --nproc_per_node 2 -m trials run`, one after another."""
    trial_dir = root / "trials"
    subprocess.run([sys.executable, "-m", "sweep", "plan", str(spec_path), "--write-trials", str(trial_dir)],
                   check=True, capture_output=True)
    out = []
    for path in sorted(trial_dir.glob("*.json")):
        started = time.perf_counter()
        subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "trials", "run", str(path),
                        "--out", str(root / "bare" / path.stem)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - started
        metrics = json.loads((root / "bare" / path.stem / "metrics.json").read_text())["metrics"]
        out.append({"trial": path.stem, "wall_s": wall, "train_s": metrics["train_s"], "setup_s": metrics["setup_s"],
                    "in_process_s": metrics["wall_s"]})
    return out


def through_sweep(spec_path: Path, root: Path) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweep", "run", str(spec_path), "--storage", str(root / "runs"), "--quiet"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - started
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("overhead-bench")
    out = []
    for run in client.search_runs([exp.experiment_id], "tags.`peft_sweep.role` = 'trial'"):
        m = run.data.metrics
        out.append({
            "trial": run.data.tags["trial_id"],
            "start_to_worker_s": m.get("ray.start_to_worker_s"),
            "worker_imports_s": m.get("ray.worker_imports_s"),
            "setup_s": m["setup_s"], "train_s": m["train_s"], "in_process_s": m["wall_s"],
            "run_open_s": (run.info.end_time - run.info.start_time) / 1000,
        })
    return wall, out


def ray_floor(trials: int) -> tuple[float, list[float]]:
    """N Tune trials, each a 2-worker TorchTrainer (gloo) whose loop does nothing, run the way
    `sweep run` runs them (same resources, one at a time)."""
    code = f"""
import json, os, time
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
import ray, ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

def loop(config):
    ray.train.report({{"done": 1}})

def trial(config):
    t0 = time.time()
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={{"CPU": 1}}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=ray.train.RunConfig(callbacks=[TuneReportCallback()])).fit()
    tune.report({{"trial_s": time.time() - t0}})

t0 = time.time()
ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
         logging_level="ERROR", log_to_driver=False)
init_s = time.time() - t0
res = tune.Tuner(tune.with_resources(trial, {{"CPU": 0, "memory": 64 * 2**20}}),
                 param_space={{"i": tune.grid_search(list(range({trials})))}},
                 tune_config=tune.TuneConfig(max_concurrent_trials=1),
                 run_config=tune.RunConfig(verbose=0)).fit()
print(json.dumps({{"init_s": init_s, "trial_s": [r.metrics["trial_s"] for r in res]}}))
ray.shutdown()
"""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, result["trial_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3, choices=range(1, len(RANKS) + 1))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("overhead.json"))
    args = parser.parse_args()
    n = args.trials

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec_path = spec(root, n, args.steps)
        bare_runs = bare(spec_path, root)
        sweep_wall, sweep_runs = through_sweep(spec_path, root)
        floor_wall, floor_trials = ray_floor(n)

    bare_per = statistics.median(r["wall_s"] for r in bare_runs)
    sweep_per = sweep_wall / n
    floor_per = floor_wall / n
    med = lambda key, runs: statistics.median(r[key] for r in runs if r.get(key) is not None)  # noqa: E731
    rest = sweep_per - med("start_to_worker_s", sweep_runs) - med("worker_imports_s", sweep_runs) - med(
        "in_process_s", sweep_runs)
    print(f"{n} trials, {args.steps} steps each, 2 workers, ZeRO-2 on CPU\n")
    print(f"{'':<44}{'bare torchrun':>14}{'sweep run':>12}")
    print(f"{'wall per trial (s)':<44}{bare_per:>14.1f}{sweep_per:>12.1f}")
    print(f"{'  training inside it (s)':<44}{med('train_s', bare_runs):>14.2f}{med('train_s', sweep_runs):>12.2f}")
    print(f"{'  set-up inside it: model, adapter, DeepSpeed (s)':<44}{med('setup_s', bare_runs):>14.2f}"
          f"{med('setup_s', sweep_runs):>12.2f}")
    print(f"\nratio sweep/bare per trial: {sweep_per / bare_per:.2f} (target <= {TARGET}); "
          f"overhead {sweep_per - bare_per:+.1f} s per trial")
    print("\nwhere a `sweep run` trial's wall time goes (medians, s):")
    print(f"  trial function start -> worker code (Train controller, workers)  {med('start_to_worker_s', sweep_runs):6.1f}")
    print(f"  worker imports                                                  {med('worker_imports_s', sweep_runs):6.1f}")
    print(f"  the trial itself (set-up, training, evals, save)                {med('in_process_s', sweep_runs):6.1f}")
    print(f"  the rest (Ray start / n, scheduling, reports, upload, shutdown) {rest:6.1f}")
    print(f"\nRay's floor, an empty 2-worker Train run per Tune trial: {floor_per:.1f} s per trial "
          f"(inside the trial function {statistics.median(floor_trials):.1f} s); that alone is "
          f"{floor_per / bare_per:.2f} of a bare trial")
    args.out.write_text(json.dumps({
        "trials": n, "steps": args.steps, "bare": bare_runs, "sweep_wall_s": sweep_wall, "sweep": sweep_runs,
        "floor_wall_s": floor_wall, "floor_trial_s": floor_trials, "bare_per_trial_s": bare_per,
        "sweep_per_trial_s": sweep_per, "floor_per_trial_s": floor_per, "ratio": sweep_per / bare_per, "target": TARGET,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
