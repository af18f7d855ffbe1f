"""Load the base model and tokenizer a trial fine-tunes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trials.config import ModelConfig
from trials.errors import TrialError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_dtype(precision: str, cuda: bool, bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype the model is loaded and trained in; `auto` is bf16 on a GPU that computes in
    bf16 natively (compute capability 8.0 and up), fp16 with loss scaling on older GPUs (where
    bf16 is emulated, several times slower), fp32 on CPU."""
    import torch

    if precision == "auto":
        if not cuda:
            return torch.float32
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16_supported else torch.float16
    if precision == "fp16" and not cuda:
        raise TrialError("deepspeed.precision=fp16 needs a CUDA GPU; use fp32 (or auto) on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _not_found(name: str, err: Exception) -> TrialError:
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        reason = " ".join(str(err).split())  # transformers' messages span lines; a problem is one
        return TrialError(f"model.base_model {name!r}: cannot load it from that local path ({reason})")
    # Trials never download (a download inside a multi-worker trial would hang every
    # worker on the hub), so a hub id must already be in the local cache.
    return TrialError(
        f"model.base_model {name!r} is neither a local directory nor in the Hugging Face cache "
        f"(trials never download; run `huggingface-cli download {name}` first or give a local path)"
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.base_model, trust_remote_code=cfg.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise _not_found(cfg.base_model, err) from err
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise TrialError(f"the tokenizer of {cfg.base_model!r} has neither a pad nor an eos token")
        # Padding is always masked out (attention and labels), so reusing eos is harmless.
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise TrialError(f"the tokenizer of {cfg.base_model!r} has no eos token to end responses with")
    return tok


def placement(device: torch.device, zero_stage: int) -> dict:
    """Where `from_pretrained` puts the weights. On a GPU under ZeRO 0-2 every rank holds the
    whole base model anyway, so it is read from the files straight onto the rank's device:
    eight ranks of a node then never hold eight full copies in host memory. Under ZeRO-3 the
    weights stay on the host for DeepSpeed to partition; on CPU the host is the device."""
    if device.type == "cuda" and zero_stage != 3:
        return {"device_map": {"": device}}
    return {}


def load_model(cfg: ModelConfig, dtype: torch.dtype, where: dict | None = None) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=dtype, trust_remote_code=cfg.trust_remote_code, local_files_only=True,
            attn_implementation=cfg.attn_implementation, **(where or {}),
        )
    except (OSError, ValueError) as err:
        raise _not_found(cfg.base_model, err) from err
    model.config.use_cache = False
    return model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 `ds_numel` is the unpartitioned size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
