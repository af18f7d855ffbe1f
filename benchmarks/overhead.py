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


def spec(root: Path, trials: int, steps: int, reuse: bool = True) -> Path:
    name = "overhead-bench" if reuse else "overhead-bench-train"
    body = {
        "name": name,
        "model": {"base_model": str(MODEL)},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl"), "max_length": 32},
        "search": {
            "seeds": [0],
            "adapters": [{"type": "lora", "r": list(RANKS[:trials]), "alpha": 16}],
            "trainer": {"learning_rate": 1e-3, "max_steps": steps, "batch_size": 16, "eval_every": steps,
                        "eval_batches": 4},
        },
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 1,
                      "reuse_workers": reuse},
        "deepspeed": {"zero_stage": 2},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    path = root / f"{name}.yaml"
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
    exp = client.get_experiment_by_name(yaml.safe_load(spec_path.read_text())["name"])
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


def ray_floor(trials: int) -> tuple[float, float, float]:
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
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={{"CPU": 1}}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=ray.train.RunConfig(callbacks=[TuneReportCallback()])).fit()

from sweep.launch.runtime import init_ray  # the embedded runtime exactly as `sweep run` starts it
t0 = time.time()
init_ray(None, {{}}, verbose=False)
init_s = time.time() - t0
t0 = time.time()
res = tune.Tuner(tune.with_resources(trial, {{"CPU": 0, "memory": 64 * 2**20}}),
                 param_space={{"i": tune.grid_search(list(range({trials})))}},
                 tune_config=tune.TuneConfig(max_concurrent_trials=1),
                 run_config=tune.RunConfig(verbose=0)).fit()
fit_s = time.time() - t0
assert not [r for r in res if r.error], [r.error for r in res]
print(json.dumps({{"init_s": init_s, "fit_s": fit_s}}))
ray.shutdown()
"""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, result["init_s"], result["fit_s"]


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
        sweeps = {"kept workers": through_sweep(spec_path, root),
                  "Ray Train run per trial": through_sweep(spec(root, n, args.steps, reuse=False), root)}
        floor_wall, floor_init, floor_fit = ray_floor(n)

    bare_per = statistics.median(r["wall_s"] for r in bare_runs)
    floor_per = floor_wall / n
    med = lambda key, runs: statistics.median(r[key] for r in runs if r.get(key) is not None)  # noqa: E731
    print(f"{n} trials, {args.steps} steps each, 2 workers, ZeRO-2 on CPU\n")
    print(f"bare `torchrun -m trials run`, one after another: {bare_per:.1f} s per trial "
          f"(training {med('train_s', bare_runs):.2f} s, set-up {med('setup_s', bare_runs):.2f} s inside it)")
    report = {"trials": n, "steps": args.steps, "bare": bare_runs, "bare_per_trial_s": bare_per, "target": TARGET}
    for label, (wall, runs) in sweeps.items():
        per = wall / n
        rest = per - med("start_to_worker_s", runs) - med("worker_imports_s", runs) - med("in_process_s", runs)
        print(f"\n`sweep run`, {label}: {per:.1f} s per trial ({wall:.1f} s for {n}, Ray start included); "
              f"ratio to bare {per / bare_per:.2f} (target <= {TARGET}: {'met' if per / bare_per <= TARGET else 'missed'}); "
              f"overhead {per - bare_per:+.1f} s per trial")
        print(f"  training inside a trial                                  {med('train_s', runs):6.2f}")
        print(f"  trial function start -> worker code                      {med('start_to_worker_s', runs):6.2f}")
        print(f"  worker imports                                           {med('worker_imports_s', runs):6.2f}")
        print(f"  the trial itself (set-up, training, evals, save)         {med('in_process_s', runs):6.2f}")
        print(f"  the rest (Ray start / n, scheduling, reports, upload)    {rest:6.2f}")
        report[label] = {"wall_s": wall, "per_trial_s": per, "ratio": per / bare_per, "runs": runs}
    print(f"\nRay's floor, an empty 2-worker Ray Train run per Tune trial: {floor_per:.1f} s per trial "
          f"(Ray start {floor_init:.1f} s once, then {floor_fit / n:.1f} s per trial in Tune), "
          f"{floor_per / bare_per:.2f} of a bare trial before any of the trial's own work")
    report.update(floor_wall_s=floor_wall, floor_init_s=floor_init, floor_fit_s=floor_fit, floor_per_trial_s=floor_per)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
