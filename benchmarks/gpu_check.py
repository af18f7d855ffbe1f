"""GPU check: one short run on one GPU for what no CPU test can show.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--steps 8] [--batch 4] [--length 2048]
    python benchmarks/gpu_check.py --smoke      # the same steps on CPU with tiny shapes

1. **An 8B trial.** A model shaped like Llama-3.1-8B (`examples/models/llama-3.1-8b/config.json`)
   with random bf16 weights, written to local disk (nothing is downloaded), fine-tuned by the
   project's own trial runner (`python -m trials run`, DeepSpeed, one worker) with LoRA r=16
   on every linear layer, gradient checkpointing and batch x 2,048-token examples. The trial
   is the one `sweep plan --write-trials` writes, so the plan's memory estimate is for exactly
   it. Printed: tokens/s; model FLOPs utilisation, 6 x params x tokens/s over the GPU's
   datasheet bf16 peak and over a bf16 matmul peak measured here; peak memory beside the
   estimate; the dtypes DeepSpeed computes and accumulates in and the adapter's.
2. **A 2-trial `sweep run`** on the tiny model with `gpus_per_worker: 1` (NCCL, bf16, one
   worker kept across both trials): the second trial, at a smaller batch, must report a
   smaller peak than the first (peaks are per trial, not per process), and must have taken
   the base model the first trial kept loaded (`resources.keep_base_model`).
3. **LoftQ**, when bitsandbytes is installed: one `lora+loftq` trial, exported; the adapter
   must be saved with its quantized backbone and a config that does not run LoftQ again, and
   reloaded on that backbone (`trials.artifacts.load_trained`) give the trial's probe logits.

Every fact checked is under `checks` in the JSON (true/false); the exit code is 1 when one
fails. `--smoke` runs the same code path on CPU (fp32, tiny shapes, CPU workers) to keep the
script working where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG_8B = ROOT / "examples" / "models" / "llama-3.1-8b"
H200_BF16_TFLOPS = 989.0  # dense, the datasheet's figure without sparsity (H100 SXM: the same)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sh(*cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result


def matmul_tflops(device: str, n: int, reps: int) -> float:
    """What this GPU reaches on a large bf16 matmul: the practical ceiling for MFU."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def build_model(folder: Path, *, smoke: bool, device: str) -> int:
    """Random weights in the 8B shape (or a tiny one), saved with the tiny character tokenizer
    (ids < 100 fit any vocabulary); returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trials.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = AutoConfig.from_pretrained(CONFIG_8B)
    config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id})  # the tokenizer's specials, not Llama's 128000s
    if smoke:
        config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def write_rows(path: Path, n: int, length: int, seed: int) -> None:
    """Rows that fill `length` characters (= tokens for the character tokenizer), half prompt."""
    rng = random.Random(seed)
    half = max(2, (length - 4) // 2)
    with path.open("w") as fh:
        for _ in range(n):
            text = "".join(rng.choices(string.ascii_lowercase, k=2 * half))
            fh.write(json.dumps({"prompt": text[:half], "response": " " + text[half:]}) + "\n")


def spec_file(folder: Path, name: str, model: Path, data: Path, *, gpu: bool, adapters: list[dict],
              trainer: dict, length: int, workers: int = 1) -> Path:
    body = {
        "name": name,
        "model": {"base_model": str(model)},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": length},
        "search": {"seeds": [0], "adapters": adapters, "trainer": trainer},
        "resources": {"workers_per_trial": workers, "cpus_per_worker": 1, "gpus_per_worker": 1 if gpu else 0,
                      "max_concurrent_trials": 1, "reuse_workers": True},
        "deepspeed": {"zero_stage": 0, "precision": "bf16" if gpu else "fp32"},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def big_trial(root: Path, args, gpu: bool) -> tuple[dict[str, Any], dict[str, bool]]:
    device = "cuda" if gpu else "cpu"
    model, data = root / "model-8b", root / "data-8b"
    data.mkdir()
    t = time.perf_counter()
    params = build_model(model, smoke=args.smoke, device=device)
    build_s = time.perf_counter() - t
    rows = args.batch * (args.steps + 2)
    write_rows(data / "train.jsonl", rows, args.length, 0)
    write_rows(data / "eval.jsonl", args.batch, args.length, 1)
    trainer = {"learning_rate": 1e-4, "max_steps": args.steps, "batch_size": args.batch, "eval_every": args.steps,
               "eval_batches": 1, "gradient_checkpointing": True}
    spec = spec_file(root, "gpu-check-8b", model, data, gpu=gpu, length=args.length, trainer=trainer,
                     adapters=[{"type": "lora", "r": 16, "alpha": 32, "target_modules": ALL_LINEAR}])
    trials_dir = root / "planned"
    plan = json.loads(sh(sys.executable, "-m", "sweep", "plan", str(spec), "--json", "--write-trials",
                         str(trials_dir)).stdout)
    (planned,) = plan["trials"]
    out = root / "trial-8b"
    t = time.perf_counter()
    sh(sys.executable, "-m", "trials", "run", str(trials_dir / f"{planned['trial_id']}.json"), "--out", str(out),
       timeout=1200)
    trial_s = time.perf_counter() - t
    record = json.loads((out / "metrics.json").read_text())
    m, setup = record["metrics"], record["setup"]
    flops_per_s = 6 * params * m["tokens_per_s"]
    peak = matmul_tflops(device, 8192 if gpu else 512, 20 if gpu else 3)
    estimate = planned["estimate"]["peak_memory_mb"]
    result = {
        "params": params, "build_and_save_s": round(build_s, 1), "trial_s": round(trial_s, 1),
        "tokens_per_s": m["tokens_per_s"], "s_per_step": m["s_per_step"],
        "mfu_vs_datasheet": flops_per_s / (H200_BF16_TFLOPS * 1e12) if gpu else None,
        "mfu_vs_measured_matmul": flops_per_s / (peak * 1e12),
        "matmul_tflops": peak, "peak_memory_mb": m["peak_memory_mb"], "estimate_peak_memory_mb": estimate,
        "estimate_ratio": estimate / m["peak_memory_mb"], "engine": setup.get("engine"),
        "gradient_checkpointing": setup.get("gradient_checkpointing"), "trainable_params": m["trainable_params"],
        "skipped_steps": m.get("skipped_steps"),
    }
    dtype = "bfloat16" if gpu else "float32"
    engine = setup.get("engine") or {}
    checks = {
        "8b: the loss is finite and the run finished": m["step"] == args.steps,
        "8b: gradient checkpointing on": bool(setup.get("gradient_checkpointing")),
        f"8b: DeepSpeed computes in {dtype}": engine.get("model_dtype") == dtype,
        "8b: gradients accumulate in fp32": engine.get("grad_accum_dtype") == "float32",
        f"8b: adapter weights in {dtype}": engine.get("adapter_dtypes") == [dtype],
        "8b: estimate within 0.7-1.5x of the measured peak": 0.7 <= result["estimate_ratio"] <= 1.5,
    }
    return result, checks


def two_trial_sweep(root: Path, gpu: bool) -> tuple[dict[str, Any], dict[str, bool]]:
    from trials.tiny import ensure_tiny

    tiny = ensure_tiny(quick=True)
    trainer = {"learning_rate": 1e-3, "max_steps": 6, "batch_size": [32, 2], "eval_every": 6, "eval_batches": 1}
    spec = spec_file(root, "gpu-check-sweep", tiny, tiny / "task", gpu=gpu, length=48, trainer=trainer,
                     adapters=[{"type": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}])
    t = time.perf_counter()
    run = sh(sys.executable, "-m", "sweep", "run", str(spec), "--quiet", timeout=900)
    wall = time.perf_counter() - t
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gpu-check-sweep")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("peft_sweep.role") != "sweep"]
    ordered = sorted(runs, key=lambda r: r.info.start_time)
    batches = [int(float(r.data.params.get("trainer.batch_size", 0))) for r in ordered]
    peaks = [r.data.metrics.get("peak_memory_mb") for r in ordered]
    reused = [r.data.metrics.get("base_model_reused") for r in ordered]
    result = {"wall_s": round(wall, 1), "batches_in_run_order": batches, "peaks_in_run_order": peaks,
              "base_model_reused_in_run_order": reused,
              "base_model_load_s_in_run_order": [r.data.metrics.get("base_model_load_s") for r in ordered],
              "statuses": [r.info.status for r in ordered],
              "workers": sorted({r.data.tags.get("peft_sweep.workers", "") for r in runs}),
              "tail": run.stdout.splitlines()[-3:]}
    # The large batch runs first on the kept worker: a process-lifetime peak would carry over.
    checks = {
        "sweep: both trials finished": len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs),
        "sweep: peak memory is per trial (batch 2 after batch 32 reports less)": (
            batches == [32, 2] and None not in peaks and peaks[1] < peaks[0]),
        "sweep: the second trial took the base model the first kept loaded": reused == [0.0, 1.0],
    }
    return result, checks


def loftq_trial(root: Path, gpu: bool) -> tuple[dict[str, Any], dict[str, bool]]:
    from trials.tiny import ensure_tiny

    tiny = ensure_tiny(quick=True)
    trainer = {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 1}
    spec = spec_file(root, "gpu-check-loftq", tiny, tiny / "task", gpu=gpu, length=48, trainer=trainer,
                     adapters=[{"type": "lora", "r": 8, "init_lora_weights": "loftq", "loftq_bits": 4,
                                "target_modules": ["q_proj", "v_proj"]}])
    run = subprocess.run([sys.executable, "-m", "sweep", "run", str(spec), "--quiet"], capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    result = {"exit": run.returncode, "tail": (run.stdout + run.stderr).splitlines()[-4:]}
    checks = {"loftq: the trial finished": run.returncode == 0}
    if run.returncode != 0:
        return result, checks
    export = root / "loftq-export"
    sh(sys.executable, "-m", "sweep", "export", str(spec), "--out", str(export), timeout=300)
    result.update(reload_with_trained_base(root, tiny, export / "adapter", "gpu-check-loftq"))
    checks.update({
        "loftq: the saved config does not run LoftQ again": result["saved_init_lora_weights"] is True,
        "loftq: the adapter is saved with its quantized backbone": result["trained_base_tensors"] > 0,
        "loftq: reloaded on its backbone, it gives the trained model's logits": result["max_diff_on_backbone"] < 0.05,
        "loftq: on the original weights it does not": result["max_diff_on_original"] > result["max_diff_on_backbone"],
        "loftq: best.yaml says which base it needs": "LoftQ backbone" in (export / "best.yaml").read_text(),
    })
    return result, checks


def reload_with_trained_base(root: Path, tiny: Path, adapter: Path, experiment: str) -> dict[str, Any]:
    """The exported LoftQ adapter reloaded with and without its trained base, against the
    trial's own probe logits (bf16 on both sides)."""
    import torch
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trials import artifacts

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    [child] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("peft_sweep.role") != "sweep"]
    probe = torch.load(client.download_artifacts(child.info.run_id, artifacts.PROBE_FILE, str(root)))
    inputs = {k: probe[k].to("cuda") for k in ("input_ids", "attention_mask")}

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**inputs).logits.float().cpu()

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).to("cuda")

    on_backbone = logits(artifacts.load_trained(fresh(), adapter))
    on_original = logits(PeftModel.from_pretrained(fresh(), str(adapter)))
    saved = json.loads((adapter / "adapter_config.json").read_text())
    return {"saved_init_lora_weights": saved.get("init_lora_weights"),
            "trained_base_tensors": len(load_file(str(adapter / artifacts.TRAINED_BASE_FILE))),
            "max_diff_on_backbone": float((on_backbone - probe["logits"]).abs().max()),
            "max_diff_on_original": float((on_original - probe["logits"]).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the script itself")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.length = min(args.steps, 2), min(args.batch, 2), min(args.length, 64)
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        raise SystemExit("no CUDA GPU here; run with --smoke to check the script on CPU")
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "smoke": args.smoke,
                              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    checks: dict[str, bool] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        for name, step in (("trial_8b", big_trial), ("sweep", two_trial_sweep)):
            print(f"[{time.perf_counter() - started:6.0f}s] {name} ...", flush=True)
            part, ok = step(root, args, gpu) if step is big_trial else step(root, gpu)
            report[name] = part
            checks.update(ok)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            report["loftq"] = "skipped: bitsandbytes is not installed"
        else:
            if gpu:
                print(f"[{time.perf_counter() - started:6.0f}s] loftq ...", flush=True)
                report["loftq"], ok = loftq_trial(root, gpu)
                checks.update(ok)
    report["checks"] = checks
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    t8 = report["trial_8b"]
    print(f"tokens/s {t8['tokens_per_s']:.0f}; MFU {t8['mfu_vs_datasheet'] or 0:.1%} of the datasheet, "
          f"{t8['mfu_vs_measured_matmul']:.1%} of a measured matmul ({t8['matmul_tflops']:.0f} TFLOPS)")
    print(f"peak memory {t8['peak_memory_mb']:.0f} MiB; the plan's estimate {t8['estimate_peak_memory_mb']:.0f} MiB "
          f"(estimate / measured = {t8['estimate_ratio']:.2f})")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"wrote {args.out} in {report['total_s']:.0f}s")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
