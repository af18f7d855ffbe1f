"""In-trial throughput: tokens/s of a trial inside `sweep run` against a plain PEFT +
DeepSpeed loop written here, on the same model, data, adapter, batch and ZeRO stage.

    python benchmarks/throughput.py [--steps 200] [--repeat 5] [--out throughput.json]

The plain loop runs this file under `torchrun --nproc_per_node 2` (`--plain`): AutoModel,
`get_peft_model(LoraConfig(...))`, `deepspeed.initialize` with a torch AdamW, then per step: collate a batch of the same
tokenized examples, forward, backward, step. Both sides count
the non-padding tokens of every rank over the training steps only (no evaluation, no
set-up). The target is a ratio >= 0.97.
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
TARGET = 0.97
ADAPTER = {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def spec(root: Path, steps: int, batch: int, name: str) -> Path:
    body = {
        "name": name,
        "model": {"base_model": str(MODEL)},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl"), "max_length": 32},
        "search": {"seeds": [0], "adapters": [ADAPTER],
                   "trainer": {"learning_rate": 1e-3, "max_steps": steps, "batch_size": batch, "eval_every": steps,
                               "eval_batches": 1}},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "deepspeed": {"zero_stage": 2},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def sweep_tokens_per_s(root: Path, steps: int, batch: int, i: int) -> float:
    name = f"throughput-{i}"
    path = spec(root, steps, batch, name)
    subprocess.run([sys.executable, "-m", "sweep", "run", str(path), "--storage", str(root / "runs"), "--quiet"],
                   check=True, capture_output=True)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    (run,) = client.search_runs([exp.experiment_id], "tags.`peft_sweep.role` = 'trial'")
    return run.data.metrics["tokens_per_s"]


def plain_tokens_per_s(root: Path, steps: int, batch: int, i: int) -> float:
    out = root / f"plain-{i}.json"
    subprocess.run(["torchrun", "--nproc_per_node", "2", str(Path(__file__).resolve()), "--plain",
                    "--steps", str(steps), "--batch", str(batch), "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return json.loads(out.read_text())["tokens_per_s"]


def plain_loop(steps: int, batch: int, out: Path) -> None:
    """The baseline: what one would write by hand with PEFT and DeepSpeed."""
    import logging

    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trials.config import DataConfig
    from trials.data import collate, load_splits, train_batches
    from trials.dist import import_deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed = import_deepspeed()  # the CPU accelerator without its shared-memory op build
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    data = DataConfig(train=str(DATA / "train.jsonl"), eval=str(DATA / "eval.jsonl"), max_length=32)
    examples = load_splits(data, tokenizer).train
    batches = train_batches(examples, batch, rank, world, 0)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=ADAPTER["r"], lora_alpha=ADAPTER["alpha"], lora_dropout=0.0,
                                             target_modules=ADAPTER["target_modules"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "train_batch_size": batch * world,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "steps_per_print": 2**31 - 1,
    })
    engine.train()
    tokens, elapsed = 0, 0.0
    for _ in range(steps):
        started = time.perf_counter()
        b = collate(next(batches), tokenizer.pad_token_id)  # as a DataLoader would, inside the step
        loss = engine(**b).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        elapsed += time.perf_counter() - started
        tokens += int(b["attention_mask"].sum())
    totals = torch.tensor([float(tokens), elapsed], dtype=torch.float64)
    dist.all_reduce(totals[:1])
    dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
    if rank == 0:
        out.write_text(json.dumps({"tokens_per_s": totals[0].item() / totals[1].item(), "steps": steps}))
    engine.destroy()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("throughput.json"))
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_loop(args.steps, args.batch, args.out)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain, swept = [], []
        for i in range(args.repeat):  # interleaved, so drift in the machine hits both alike
            plain.append(plain_tokens_per_s(root, args.steps, args.batch, i))
            swept.append(sweep_tokens_per_s(root, args.steps, args.batch, i))
    p, s = statistics.median(plain), statistics.median(swept)
    print(f"LoRA r=8 on the quickstart model, {args.steps} steps, batch {args.batch} x 2 workers, ZeRO-2 on CPU")
    print(f"{'plain PEFT + DeepSpeed loop':<30}{p:>10.0f} tokens/s  (runs: {', '.join(f'{v:.0f}' for v in plain)})")
    print(f"{'inside `sweep run`':<30}{s:>10.0f} tokens/s  (runs: {', '.join(f'{v:.0f}' for v in swept)})")
    print(f"ratio {s / p:.3f} (target >= {TARGET}: {'met' if s / p >= TARGET else 'missed'})")
    args.out.write_text(json.dumps({"plain": plain, "sweep": swept, "plain_median": p, "sweep_median": s,
                                    "ratio": s / p, "target": TARGET, "steps": args.steps, "batch": args.batch},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
