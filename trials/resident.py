"""The base model kept loaded between the trials of one worker process.

A kept gang worker (sweep.launch.gang) runs trial after trial, and reading an 8B model from
local disk costs tens of seconds each time. So a worker keeps the model it loaded, and the
next trial that asks for the same one (same base model, dtype, attention implementation and
device) gets it back with the previous trial undone:

- the adapter is removed (PEFT `unload`, without merging);
- the weights an initializer rewrote are put back from a CPU copy of just the modules the
  adapter wraps, taken before wrapping (PiSSA, CorDA, OLoRA and LoftQ replace a wrapped
  weight by a residual);
- activation checkpointing, `requires_grad` and eval mode are reset, and every module hook
  the trial added is removed (the input-grad hook among them).

Then it is checked: every base parameter's dtype, and a fingerprint (sum and norm, per
tensor) of every base parameter and buffer, must equal what they were at load.
A model that fails the check, a trial that failed before handing its model back, and ZeRO-3
(whose engine partitions the weights in place) all load fresh. The undoing happens when the
next trial asks, so its cost is part of that trial's `base_model_load_s`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trials.config import ModelConfig
from trials.model import is_partitioned, load_model, set_checkpointing

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class _Held:
    key: tuple
    model: Any
    fingerprint: torch.Tensor
    dtypes: dict[str, torch.dtype]
    requires_grad: dict[str, bool]
    training: bool
    hooks: dict[str, set[int]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> CPU copy
    wrapped: Any = None  # the PEFT model the current trial handed back
    returned: bool = False


_held: _Held | None = None


@dataclass(frozen=True)
class Loaded:
    model: Any
    load_s: float  # wall seconds to have the model on the device: loading, or undoing and checking
    reused: bool


def _key(cfg: ModelConfig, dtype, device) -> tuple:
    path = Path(cfg.base_model).expanduser()
    name = str(path.resolve()) if path.exists() else cfg.base_model
    return name, cfg.trust_remote_code, cfg.attn_implementation, str(dtype), str(device)


def _fingerprint(model) -> torch.Tensor:
    """Per tensor, its sum and its norm, in fp32: two fast passes over memory (no float64
    copy of the model). Deterministic for an unchanged tensor on the same device, so an
    unchanged model compares equal exactly, and any real change moves the norm."""
    import torch

    rows = []
    with torch.no_grad():
        for _, t in [*model.named_parameters(), *model.named_buffers()]:
            t = t.detach()
            if not t.is_floating_point():
                t = t.to(torch.float32)
            rows.append(torch.stack([t.sum(dtype=torch.float32), torch.linalg.vector_norm(t, dtype=torch.float32)]))
    return torch.stack(rows).cpu()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks(model) -> dict[str, set[int]]:
    return {f"{name}:{d}": set(getattr(m, d, {}).keys()) for name, m in model.named_modules() for d in _HOOK_DICTS}


def _remove_new_hooks(model, kept: dict[str, set[int]]) -> None:
    """Remove the hooks a trial left (hook handles are the trial's, and some are lost: PEFT
    registers the input-grad hook again over ours when checkpointing is on)."""
    for name, m in model.named_modules():
        for d in _HOOK_DICTS:
            hooks = getattr(m, d, None)
            for key in [k for k in (hooks or {}) if k not in kept.get(f"{name}:{d}", set())]:
                hooks.pop(key)
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                    getattr(m, extra, {}).pop(key, None)


def acquire(cfg: ModelConfig, dtype, device, where: dict, *, keep: bool) -> Loaded:
    """The base model on `device`: the kept one when `keep` and it matches, else read from disk
    (and kept for the next trial when `keep`)."""
    global _held
    started = time.perf_counter()
    key = _key(cfg, dtype, device)
    if _held is not None and keep and _held.key == key and _held.returned:
        model = _restore(_held)
        if model is not None:
            _held.returned, _held.wrapped = False, None
            return Loaded(model, time.perf_counter() - started, True)
    drop()  # another model, a trial that never handed it back, or one that did not restore exactly
    model = load_model(cfg, dtype, where)
    if not is_partitioned(model):  # ZeRO-3's partitions are on their device already
        model = model.to(device)  # a no-op where `where` placed it
    if keep:
        params = dict(model.named_parameters())
        _held = _Held(key, model, _fingerprint(model), {n: p.dtype for n, p in params.items()},
                      {n: p.requires_grad for n, p in params.items()}, model.training, _hooks(model))
    return Loaded(model, time.perf_counter() - started, False)


def holds(model) -> bool:
    """Whether this is the kept model (so what a trial does to it must be undoable)."""
    return _held is not None and _held.model is model


def protect(model, names: list[str]) -> None:
    """Copy these modules' parameters to the CPU before an initializer rewrites them."""
    if not holds(model):
        return
    _held.saved = {f"{name}.{pn}": p.detach().to("cpu", copy=True)
                   for name in names for pn, p in model.get_submodule(name).named_parameters(recurse=False)}


def give_back(wrapped) -> None:
    """The trial is done with its model (wrapped by PEFT); the next trial may take it."""
    if _held is not None:
        _held.wrapped, _held.returned = wrapped, True


def drop() -> None:
    """Forget the kept model (its memory goes with the last reference)."""
    global _held
    _held = None


def _restore(held: _Held):
    """The kept model with the last trial undone, or None when it cannot be shown to be exact."""
    import torch

    model = held.wrapped.unload() if hasattr(held.wrapped, "unload") else held.wrapped
    if model is not held.model:
        log.warning("the kept base model did not unwrap to itself; loading it again")
        return None
    with torch.no_grad():
        for name, saved in held.saved.items():
            param = model.get_parameter(name)
            if param.dtype != saved.dtype or param.shape != saved.shape:
                log.warning("kept base model: %s changed dtype or shape; loading it again", name)
                return None
            param.data.copy_(saved.to(param.device))
    held.saved = {}
    set_checkpointing(model, False)
    model.disable_input_require_grads()
    _remove_new_hooks(model, held.hooks)
    for name, param in model.named_parameters():
        param.requires_grad_(held.requires_grad.get(name, False))  # PEFT froze them; as loaded again
    model.train(held.training)  # the mode from_pretrained left (eval); the engine left it training
    model.config.use_cache = False
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    if dtypes != held.dtypes or _hooks(model) != held.hooks or not torch.equal(_fingerprint(model), held.fingerprint):
        log.warning("the kept base model differs from the one loaded; loading it again")
        return None
    return model
