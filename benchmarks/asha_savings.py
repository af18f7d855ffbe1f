"""ASHA savings: the quickstart space as a full grid and again under ASHA.

Runs `examples/quickstart.yaml`'s adapters, learning rates and seeds twice with `sweep run`:
once FIFO (every trial to max_steps) and once with `scheduler: asha`. Prints each sweep's
total trial-steps (the optimizer steps its trials actually ran, read from MLflow), the
ratio against the 40 % target, and whether both pick the same best adapter variant (by the
mean final eval loss of the variant's trials that reached max_steps).
    python benchmarks/asha_savings.py [--grace 1] [--reduction 3] [--out asha_savings.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
TARGET = 0.40


def write(root: Path, name: str, scheduler: dict) -> Path:
    body = yaml.safe_load(QUICKSTART.read_text())
    body["name"] = name
    body["model"]["base_model"] = str(QUICKSTART.parent / body["model"]["base_model"])
    for split in ("train", "eval"):
        body["data"][split] = str(QUICKSTART.parent / body["data"][split])
    body["search"]["trainer"]["eval_every"] = 10  # six rungs for ASHA to cut at
    body["scheduler"] = scheduler
    body["tracking"] = {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": name}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run(root: Path, name: str, scheduler: dict) -> dict:
    path = write(root, name, scheduler)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweep", "run", str(path), "--storage", str(root / "runs"), "--quiet"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - started
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    max_steps = yaml.safe_load(path.read_text())["search"]["trainer"]["max_steps"]
    trials, by_variant = [], {}
    for r in client.search_runs([exp.experiment_id], "tags.`peft_sweep.role` = 'trial' and attributes.status = 'FINISHED'"):
        history = client.get_metric_history(r.info.run_id, "train_loss")
        steps = max((m.step for m in history), default=0)
        variant = r.data.tags["adapter.variant"]
        trials.append({"trial": r.data.tags["trial_id"], "variant": variant, "steps": steps,
                       "eval_loss": r.data.metrics.get("eval_loss")})
        if steps == max_steps:
            by_variant.setdefault(variant, []).append(r.data.metrics["eval_loss"])
    means = {v: statistics.mean(losses) for v, losses in by_variant.items()}
    return {"wall_s": wall, "trials": trials, "trial_steps": sum(t["steps"] for t in trials),
            "full_trials": sum(t["steps"] == max_steps for t in trials), "variant_means": means,
            "best": min(means, key=means.get) if means else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period, in reports (eval_every=10 steps)")
    parser.add_argument("--reduction", type=int, default=3, help="ASHA reduction factor")
    parser.add_argument("--out", type=Path, default=Path("asha_savings.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        grid = run(root, "asha-bench-grid", {"type": "fifo"})
        asha = run(root, "asha-bench-asha", {"type": "asha", "grace_period": args.grace,
                                             "reduction_factor": args.reduction})
    ratio = asha["trial_steps"] / grid["trial_steps"]
    same = grid["best"] == asha["best"]
    print(f"{len(grid['trials'])} trials; ASHA grace {args.grace} report(s), reduction factor {args.reduction}\n")
    print(f"{'':<22}{'trial-steps':>12}{'full trials':>13}{'wall (s)':>10}  best variant")
    for label, r in (("grid (fifo)", grid), ("asha", asha)):
        print(f"{label:<22}{r['trial_steps']:>12}{r['full_trials']:>13}{r['wall_s']:>10.0f}  {r['best']}")
    print(f"\nASHA ran {ratio:.0%} of the grid's trial-steps (target <= {TARGET:.0%}); same best: {same} "
          f"({'met' if same and ratio <= TARGET else 'missed'})")
    args.out.write_text(json.dumps({"grid": grid, "asha": asha, "ratio": ratio, "same_best": same, "target": TARGET,
                                    "grace_period": args.grace, "reduction_factor": args.reduction},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
