"""What greedy generation at the end adds to a quickstart trial: the same trials run bare
under `torchrun` (2 workers) with `evaluation.generate` as the quickstart sets it and with
generation off, alternated, and their `wall_s` compared.

    python benchmarks/generation_cost.py [--repeat 3] [--variants lora,ln_tuning] [--out generation_cost.json]

The trials are the quickstart's own (`sweep plan examples/quickstart.yaml --write-trials`),
seed 0 of each requested variant. The target is a wall-time ratio <= 1.30.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "quickstart.yaml"
TARGET = 1.30


def quickstart_trials(folder: Path, variants: list[str]) -> dict[str, dict]:
    subprocess.run([sys.executable, "-m", "sweep", "plan", str(SPEC), "--write-trials", str(folder)], check=True,
                   capture_output=True)
    chosen: dict[str, dict] = {}
    for path in sorted(folder.glob("*.json")):
        cfg = json.loads(path.read_text())
        variant = path.stem.rsplit("-", 1)[0].replace("-", "+")
        if variant in variants and cfg["seed"] == 0 and variant not in chosen:
            chosen[variant] = cfg
    missing = set(variants) - set(chosen)
    if missing:
        raise SystemExit(f"the quickstart has no trial of {', '.join(sorted(missing))}")
    return chosen


def run(cfg: dict, folder: Path, generate: bool) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["evaluation"]["generate"] = generate
    path = folder / f"trial-{generate}.json"
    path.write_text(json.dumps(cfg))
    out = folder / f"out-{generate}"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trials", "run",
                    str(path), "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="lora,ln_tuning")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        trials = quickstart_trials(Path(tmp) / "trials", args.variants.split(","))
        for variant, cfg in trials.items():
            if not cfg["evaluation"]["generate"]:
                raise SystemExit("examples/quickstart.yaml does not generate; nothing to measure")
            walls: dict[bool, list[float]] = {False: [], True: []}
            generate_s = []
            for i in range(args.repeat):
                for generate in (False, True) if i % 2 == 0 else (True, False):  # alternate against drift
                    m = run(cfg, Path(tmp), generate)
                    walls[generate].append(m["wall_s"])
                    if generate:
                        generate_s.append(m["generate_s"])
            off, on = statistics.median(walls[False]), statistics.median(walls[True])
            results[variant] = {"wall_s_without": off, "wall_s_with": on, "ratio": on / off,
                                "generate_s": statistics.median(generate_s), "runs": walls[True] + walls[False],
                                "max_new_tokens": cfg["evaluation"]["max_new_tokens"],
                                "eval_examples": "eval_batches x batch_size x 2 workers"}
            print(f"{variant}: wall {off:.2f} s without generation, {on:.2f} s with "
                  f"(generation {results[variant]['generate_s']:.2f} s): ratio {on / off:.2f} "
                  f"(target <= {TARGET})", flush=True)
    worst = max(r["ratio"] for r in results.values())
    print(f"worst ratio {worst:.2f}: {'meets' if worst <= TARGET else 'misses'} the target <= {TARGET}")
    if args.out:
        args.out.write_text(json.dumps({"target": TARGET, "variants": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
