"""What a trial will cost, before it runs: peak accelerator memory per worker, the tokens it
trains on, and its device-hours. A first-order model whose every assumption is a named
constant here (and in the README), shown beside the numbers; not a measurement.

Memory per worker, by what ZeRO divides (stage 1: optimizer states; 2: and gradients; 3: and
parameters, base weights included):
- base weights: base params x dtype bytes;
- the adapter: its weights in the trial dtype, an fp32 master copy under bf16/fp16, gradients
  (fp32), AdamW's two fp32 moments;
- ZeRO-1/2 gradient buckets (`trials.engine_config.bucket_size` elements, fp32);
- activations: Korthikanti et al. (2022)'s 34 x hidden bytes per token per layer at 16 bits
  (SDPA keeps no attention-score matrix, so no s^2 term), twice that at fp32; with gradient
  checkpointing only each layer's input (2 x hidden bytes) plus one full layer;
- logits: batch x length x vocab in the trial dtype, their fp32 copy for the loss, and its
  gradient;
- a fixed runtime overhead: the CUDA context and allocator slack on GPU, the imported
  libraries' resident set on CPU.
Initializers that calibrate (CorDA) peak before training: the whole base model (ZeRO-3
gathers it for the calibration), what the family says calibration holds (CorDA: an in x in
covariance per target, fp32 unless corda_half_covariance) and the overhead. The estimate is
the larger of the two peaks.
Sequences are taken at data.max_length: batches pad to their longest example, so this is an
upper bound. Device-hours: 6 x base params x trained tokens FLOPs over the GPU's peak times an
assumed model FLOPs utilisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from trials.config import TrialConfig
from trials.engine_config import bucket_size

MiB = 2**20
ACTIVATION_BYTES_PER_TOKEN_LAYER = 34  # x hidden, at 16-bit activations
CHECKPOINTED_BYTES_PER_TOKEN_LAYER = 2  # x hidden: the saved layer input
OVERHEAD_MIB = {"cuda": 1024, "cpu": 600}  # CUDA context + allocator slack; torch/DeepSpeed/PEFT imports (measured ~0.6 GiB)
FLOPS_PER_PARAM_TOKEN = 6  # forward 2 + backward 4; a frozen base skips weight gradients, so an upper bound


@dataclass
class Estimate:
    peak_memory_mb: float
    parts_mb: dict[str, float]
    tokens: int  # trained tokens, all workers
    flops: float
    device_hours: float | None  # None on CPU workers
    fits: bool | None  # against resources.gpu_memory_gb; None when unknown
    assumptions: dict[str, Any]
    calibration_peak_mb: float | None = None  # before training, for initializers that calibrate

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _bytes(precision: str, gpus: bool) -> int:
    if precision == "auto":
        return 2 if gpus else 4
    return 4 if precision == "fp32" else 2


def estimate_trial(trial: TrialConfig, model_config: Any, base_params: int, trainable: int, *, workers: int,
                   gpus: bool, tokens_per_example: float, gpu_memory_gb: float | None, gpu_peak_tflops: float,
                   mfu: float, calibration_bytes: dict[int, int] | None = None) -> Estimate:
    tc, stage = trial.trainer, trial.deepspeed.zero_stage
    b = _bytes(trial.deepspeed.precision, gpus)
    half = b == 2
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    length, batch = trial.data.max_length, tc.batch_size
    checkpointing = bool(getattr(tc, "gradient_checkpointing", False))

    def split(nbytes: float, from_stage: int) -> float:
        return nbytes / workers if stage >= from_stage else nbytes

    tokens_micro = batch * length
    per_token_layer = (CHECKPOINTED_BYTES_PER_TOKEN_LAYER * hidden * layers
                       + ACTIVATION_BYTES_PER_TOKEN_LAYER * hidden) if checkpointing else (
        ACTIVATION_BYTES_PER_TOKEN_LAYER * hidden * layers)
    parts = {
        "base_weights": split(base_params * b, 3),
        "adapter_weights": split(trainable * b, 3),
        "master_weights": split(trainable * 4, 1) if half else 0.0,
        "gradients": split(trainable * 4, 2),
        "optimizer_states": split(trainable * 8, 1),
        "zero_buckets": bucket_size(trainable) * 4.0 if stage in (1, 2) else 0.0,
        "activations": tokens_micro * per_token_layer * (1 if half else 2),
        "logits": tokens_micro * vocab * (b + 4 + 4),
        "overhead": OVERHEAD_MIB["cuda" if gpus else "cpu"] * MiB,
    }
    calibration = (calibration_bytes or {}).get(b, 0)
    calibration_peak_mb = (base_params * b + calibration + parts["overhead"]) / MiB if calibration else None
    total_mb = max(sum(parts.values()) / MiB, calibration_peak_mb or 0.0)
    tokens = int(tc.max_steps * batch * tc.gradient_accumulation_steps * workers * tokens_per_example)
    flops = float(FLOPS_PER_PARAM_TOKEN * base_params * tokens)
    device_hours = flops / (gpu_peak_tflops * 1e12 * mfu) / 3600 if gpus else None
    fits = None if gpu_memory_gb is None or not gpus else total_mb <= gpu_memory_gb * 1024
    return Estimate(
        peak_memory_mb=total_mb, parts_mb={k: v / MiB for k, v in parts.items()}, tokens=tokens, flops=flops,
        device_hours=device_hours, fits=fits, calibration_peak_mb=calibration_peak_mb,
        assumptions={"dtype_bytes": b, "sequence_length": length, "gradient_checkpointing": checkpointing,
                     "gpu_peak_tflops": gpu_peak_tflops if gpus else None, "mfu": mfu if gpus else None,
                     "tokens_per_example": tokens_per_example},
    )
