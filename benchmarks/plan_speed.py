"""Plan speed: expansion + shape preflight of a 10,000-trial spec on Llama-3.1-8B's config.

Prints the time of each phase, the ratio against the 2 s target, and writes JSON.
    python benchmarks/plan_speed.py [--out plan_speed.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TARGET_S = 2.0


def spec_10k(folder: Path) -> Path:
    spec = {
        "name": "plan-bench",
        "model": {"base_model": str(EXAMPLES / "models" / "llama-3.1-8b")},
        "data": {"train": str(EXAMPLES / "data" / "quickstart" / "train.jsonl")},
        "search": {
            "seeds": list(range(10)),
            "adapters": [
                {"type": "lora", "r": [8, 16], "init_lora_weights": ["default", "pissa"], "target_modules": ["q_proj", "v_proj"]},
                {"type": "oft", "r": [8]},
                {"type": "c3a", "block_size": [256, 512]},
                {"type": "waveft", "n_frequency": [2592]},
                {"type": "ln_tuning"},
                {"type": "tinylora", "r": [2]},
            ],
            "trainer": {"learning_rate": [round(1e-5 * (i + 1), 8) for i in range(100)]},
        },
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("plan_speed.json"))
    args = parser.parse_args()

    # Library imports are a fixed per-process cost, reported apart from planning itself.
    t_import = time.perf_counter()
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from sweep.spec import expand, load_spec, make_plan

    imports_s = time.perf_counter() - t_import

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec, spec_dir = load_spec(spec_10k(Path(tmp)))
        t1 = time.perf_counter()
        expansion = expand(spec, spec_dir)
        t2 = time.perf_counter()
        # Llama-3.1-8B's config alone (no weights here); the data checks read each file once.
        plan = make_plan(spec, spec_dir, expansion=expansion, config_only=True)
        t3 = time.perf_counter()
    result = {
        "trials": len(plan.trials),
        "distinct_adapter_configs": len(plan.candidates),
        "imports_s": round(imports_s, 3),
        "load_s": round(t1 - t0, 3),
        "expand_s": round(t2 - t1, 3),
        "preflight_s": round(t3 - t2 - plan.data_check_s, 3),
        "data_check_s": round(plan.data_check_s, 3),
        "data_examples": sum(r.examples for r in plan.data),
        "total_s": round(t3 - t0, 3),
        "target_s": TARGET_S,
    }
    result["ratio_to_target"] = round(result["total_s"] / TARGET_S, 2)
    print(f"{'trials':>26}: {result['trials']}")
    print(f"{'distinct adapter configs':>26}: {result['distinct_adapter_configs']}")
    for key in ("imports_s", "load_s", "expand_s", "preflight_s", "data_check_s", "total_s"):
        print(f"{key:>26}: {result[key]:.3f}")
    print(f"{'total (no imports) / target (2 s)':>26}: {result['ratio_to_target']:.2f}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
