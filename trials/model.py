"""Load the base model and tokenizer a trial fine-tunes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


class PartitionedLoading:
    """ZeRO-3 through transformers' DeepSpeed integration. While this is open, `from_pretrained`
    builds the model inside `deepspeed.zero.Init` with the trial's DeepSpeed config: rank 0
    reads the checkpoint, each rank keeps only its partition of every weight, so no rank holds
    the whole model (a 70B model would need 140 GB of host memory per rank otherwise); and PEFT
    gathers a partitioned weight where an initializer reads it (PiSSA's SVD). It stays open
    for the whole trial and is closed after, so the next trial in the process starts clean."""

    def __init__(self, ds_config: dict | None):
        self._config = None
        if ds_config is not None:
            import deepspeed
            import torch.distributed as dist
            from transformers.integrations import HfDeepSpeedConfig

            # zero.Init sizes the partitions by DeepSpeed's view of the process group, which
            # deepspeed.initialize would only set up later.
            deepspeed.init_distributed(dist_backend=dist.get_backend())

            self._config = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference

    @property
    def active(self) -> bool:
        return self._config is not None

    def close(self) -> None:
        if self._config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._config = None


def is_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def gathered_forward(model: torch.nn.Module) -> Iterator[None]:
    """Forwards of a partitioned model that has no DeepSpeed engine yet (an evaluation of the
    base before wrapping): each module's own weights are gathered just around its forward and
    partitioned again after it, so one module at a time is whole. Collective, like the
    engine's forwards: every rank runs the same number of forwards."""
    import deepspeed

    open_: dict[int, Any] = {}

    def gather(module, args):
        params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        if params:
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            ctx.__enter__()
            open_[id(module)] = ctx

    def release(module, args, output):
        ctx = open_.pop(id(module), None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(gather), m.register_forward_hook(release))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for ctx in open_.values():
            ctx.__exit__(None, None, None)


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


def set_checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Activation checkpointing, non-reentrant (so frozen layers and every adapter family work:
    no checkpointed input needs to require grad), through whichever name this transformers has
    (`activation_checkpointing_*` since 5.x; `gradient_checkpointing_*` before, then deprecated)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif is_checkpointing(model):
        model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()


def is_checkpointing(model: PreTrainedModel) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def held_weight_mb(model: torch.nn.Module) -> float:
    """Bytes of model weights this rank holds: a partition's share under ZeRO-3 (`ds_tensor`),
    else the whole tensor."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p if t is None else t
        total += t.numel() * t.element_size()
    return total / 2**20


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 `ds_numel` is the unpartitioned size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
