"""Model loading: the base model kept between trials, and ZeRO-3's partitioned loading.

    python benchmarks/model_loading.py [--repeat 2] [--out model_loading.json]

1. **Kept base model, the quickstart.** The quickstart's six adapter configurations (seed 0,
   as `sweep plan examples/quickstart.yaml --write-trials` writes them, cut to 2 steps without
   generation: set-up is what is measured) run one after another in the same 2 worker
   processes (`torchrun -m trials run`, as on a kept gang), with `--keep-base-model` and
   without, alternated `--repeat` times. Per trial after the first (the first always reads
   the model): `setup_s` and `base_model_load_s`, and the ratio kept / read each time.
2. **Kept base model, a 207M-parameter Llama** with random fp32 weights built here from a
   config (hidden 1024, 12 layers; 0.79 GiB on disk): three LoRA trials, the same comparison,
   (on CPU a warm page cache makes reading a lazy memory map: see the README).
3. **ZeRO-2 vs ZeRO-3 memory per rank** on that model: one LoRA trial at each stage on 2
   workers. Per rank: the base-weight bytes it holds after loading (under ZeRO-3 its
   partition: half the model here), its resident set after loading and its peak while
   loading and over the trial (trials.memory). On CPU a whole load of a same-dtype
   safetensors checkpoint is a lazy memory map of the page cache, shared by the ranks and
   only counted once touched, so the resident set does not show what a GPU run saves (there
   DeepSpeed's ZeRO-3 engine first moves an unpartitioned model whole onto the device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_cost import quickstart_trials  # noqa: E402  (the quickstart's seed-0 trials)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "models" / "tiny-llama"
QUICKSTART = ["lora", "lora+pissa", "ln_tuning", "oft", "vblora", "c3a"]


def run_all(trials: list[dict], folder: Path, keep: bool, tag: str) -> list[dict]:
    """The trials one after another in one 2-process launch; each trial's metrics.json."""
    paths = []
    for i, cfg in enumerate(trials):
        path = folder / f"{tag}-{i}.json"
        path.write_text(json.dumps({**cfg, "trial_id": ""}))  # out/<file stem> for each trial
        paths.append(str(path))
    out = folder / f"out-{tag}-{'kept' if keep else 'read'}"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trials", "run",
                    *paths, "--out", str(out), *(["--keep-base-model"] if keep else [])],
                   check=True, capture_output=True, cwd=ROOT, timeout=1800)
    dirs = [out] if len(paths) == 1 else [out / Path(p).stem for p in paths]
    return [json.loads((d / "metrics.json").read_text()) for d in dirs]


def short(cfg: dict, steps: int = 2) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["trainer"].update(max_steps=steps, eval_every=steps, eval_batches=1)
    cfg["evaluation"]["generate"] = False
    return cfg


def compare(trials: list[dict], folder: Path, repeat: int, tag: str) -> dict:
    """Kept vs read each time, alternated against drift; trials after the first of a launch."""
    setup: dict[bool, list[float]] = {True: [], False: []}
    load: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeat):
        for keep in (True, False) if i % 2 == 0 else (False, True):
            records = run_all(trials, folder, keep, tag)
            if keep and not all(r["metrics"]["base_model_reused"] for r in records[1:]):
                raise SystemExit(f"{tag}: a kept launch read the model again: "
                                 f"{[r['metrics']['base_model_reused'] for r in records]}")
            for r in records[1:]:
                setup[keep].append(r["metrics"]["setup_s"])
                load[keep].append(r["metrics"]["base_model_load_s"])
            losses[keep] = [r["metrics"]["eval_loss"] for r in records]
    kept, read = statistics.median(setup[True]), statistics.median(setup[False])
    same = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    result = {"setup_s_kept": kept, "setup_s_read": read, "ratio": kept / read,
              "base_model_load_s_kept": statistics.median(load[True]),
              "base_model_load_s_read": statistics.median(load[False]),
              "trials_measured": len(setup[True]), "max_eval_loss_difference": same}
    print(f"{tag}: set-up per trial {kept:.2f} s with the base model kept, {read:.2f} s reading it "
          f"(ratio {kept / read:.2f}); base_model_load_s {result['base_model_load_s_kept']:.3f} vs "
          f"{result['base_model_load_s_read']:.3f} s; eval losses differ by at most {same:.1e}", flush=True)
    return result


def build_model(folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trials.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return params


def medium_trial(model: Path, stage: int, r: int) -> dict:
    return {
        "trial_id": "",
        "model": {"base_model": str(model)},
        "data": {"train": str(TINY / "task" / "train.jsonl"), "eval": str(TINY / "task" / "eval.jsonl"),
                 "max_length": 32},
        "adapter": {"type": "lora", "r": r, "alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]},
        "trainer": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1},
        "evaluation": {"generate": False},
        "seed": 0,
        "deepspeed": {"zero_stage": stage},
    }


def zero_memory(model: Path, params: int, folder: Path) -> dict:
    weights_mb = params * 4 / 2**20
    out: dict = {"weights_mb": weights_mb}
    for stage in (2, 3):
        (record,) = run_all([medium_trial(model, stage, 8)], folder, False, f"zero{stage}")
        out[f"zero{stage}"] = {"peak_mb_per_rank": record["peak_memory_mb_per_rank"],
                               **{f"loading_{k}_mb_per_rank": v for k, v in record["loading_mb_per_rank"].items()},
                               "loaded_partitioned": record["setup"]["loaded_partitioned"]}
    z2, z3 = out["zero2"], out["zero3"]
    # The base-weight share each rank holds under ZeRO-3: 1 / world_size when partitioned.
    out["zero3_weight_share_per_rank"] = [w / weights_mb for w in z3["loading_weights_mb_per_rank"]]
    fmt = lambda xs: " / ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    print(f"ZeRO-2 vs ZeRO-3 per rank (rank 0 / rank 1), {params / 1e6:.0f}M params ({weights_mb:.0f} MiB fp32), "
          f"2 workers: base weights held {fmt(z2['loading_weights_mb_per_rank'])} vs "
          f"{fmt(z3['loading_weights_mb_per_rank'])} MiB (ZeRO-3 share "
          f"{fmt([100 * s for s in out['zero3_weight_share_per_rank']])} %, partitioned: {z3['loaded_partitioned']}); "
          f"RSS after loading {fmt(z2['loading_held_mb_per_rank'])} vs {fmt(z3['loading_held_mb_per_rank'])} MiB, "
          f"peak while loading {fmt(z2['loading_peak_mb_per_rank'])} vs {fmt(z3['loading_peak_mb_per_rank'])} MiB, "
          f"trial peak {fmt(z2['peak_mb_per_rank'])} vs {fmt(z3['peak_mb_per_rank'])} MiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        chosen = quickstart_trials(folder / "planned", QUICKSTART)
        results["quickstart"] = compare([short(chosen[v]) for v in QUICKSTART], folder, args.repeat, "quickstart")
        model = folder / "llama-207m"
        params = build_model(model)
        results["params"] = params
        results["medium"] = compare([medium_trial(model, 2, r) for r in (4, 8, 16)], folder, args.repeat, "medium")
        results["zero_memory"] = zero_memory(model, params, folder)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
