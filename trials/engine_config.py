"""What a trial asks of DeepSpeed: the engine's config, the learning-rate schedule, and the
check that every rank's adapter starts from the same values."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from trials.config import TrialConfig

if TYPE_CHECKING:
    import torch


# ZeRO-1/2 allocate their gradient buckets up front at DeepSpeed's default 5e8 elements (1-4 GB
# per GPU) whatever is trained; an adapter's gradients need a bucket its own size.
MIN_BUCKET, MAX_BUCKET = 50_000_000, 500_000_000


def bucket_size(trainable: int) -> int:
    return int(min(MAX_BUCKET, max(trainable, MIN_BUCKET)))


def deepspeed_config(cfg: TrialConfig, world_size: int, dtype: torch.dtype, trainable: int = MAX_BUCKET) -> dict[str, Any]:
    import torch

    tc = cfg.trainer
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=bucket_size(trainable), allgather_bucket_size=bucket_size(trainable))
    return {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "train_batch_size": tc.batch_size * tc.gradient_accumulation_steps * world_size,
        "gradient_clipping": tc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        # Gradients accumulate (and are reduced) in fp32 under bf16: DeepSpeed's bf16 mode
        # casts the adapter to bf16 for compute and keeps fp32 master weights in the optimizer;
        # accumulating in bf16 would lose the small updates OFT/HRA chains make.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if dtype == torch.bfloat16 else {}),
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(max_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over warmup_ratio * max_steps, then cosine to 0."""
    warmup = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def init_fingerprint(model: torch.nn.Module, adapter_params: list[torch.nn.Parameter]) -> list[float]:
    """Sum and sum of squares of what wrapping created or may have rewritten: the adapter's
    own parameters and the weights of the layers it wraps (PiSSA/CorDA rewrite those)."""
    import torch

    params = {id(p): p for p in adapter_params}
    for module in model.modules():
        if hasattr(module, "base_layer"):
            params.update((id(p), p) for p in module.parameters())
    import deepspeed

    total = torch.zeros(2, dtype=torch.float64, device=next(iter(params.values())).device)
    with torch.no_grad():
        for p in params.values():
            # Partitioned (ZeRO-3) weights one at a time, so no rank ever holds them all.
            with deepspeed.zero.GatheredParameters([p] if hasattr(p, "ds_id") else [], modifier_rank=None):
                t = p.detach().to(torch.float64)
                total += torch.stack([t.sum(), (t * t).sum()]).to(total.device)
    return total.tolist()
