"""What a trial leaves in its output directory (written by rank 0)."""

from __future__ import annotations

import copy
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

ADAPTER_DIR = "adapter"
INITIAL_ADAPTER_DIR = "initial_adapter"
# Inside the adapter directory, for adapters that need the base weights their initialization
# rewrote (LoftQ): those weights, under the base model's own parameter names.
TRAINED_BASE_FILE = "trained_base.safetensors"
PROBE_FILE = "probe_logits.pt"
TRIAL_FILE = "trial.json"
METRICS_FILE = "metrics.json"
# One row per evaluated example of the final evaluation, in a stable order (see trials.evaluate).
PREDICTIONS_FILE = "predictions.jsonl"
TEST_PREDICTIONS_FILE = "test_predictions.jsonl"
# The one list of packages whose versions a result records: the trial's metrics.json, the
# sweep's parent run tags and the PEFT method_comparison export all read it.
PACKAGES = ("peft-sweep", "torch", "deepspeed", "peft", "transformers", "tokenizers", "datasets", "accelerate",
            "ray", "mlflow", "optuna", "bitsandbytes")


def _plain_init_config(model: PeftModel, path: Path) -> None:
    """Rewrite the saved config to say "plain init" (PEFT's documented pattern, and what PEFT
    itself writes at conversion time): reloading must not decompose or quantize weights again."""
    from peft import PeftType

    config = copy.deepcopy(model.peft_config["default"])
    if config.peft_type == PeftType.LORA:
        config.init_lora_weights = True
        config.loftq_config = {}
    else:
        config.init_weights = True
    config.save_pretrained(str(path))


def save_initial_adapter(model: PeftModel, path: Path) -> None:
    """The adapter as initialized, for families whose initialization rewrites base weights
    (PiSSA, CorDA, OLoRA)."""
    model.save_pretrained(str(path))
    _plain_init_config(model, path)


def save_adapter(model: PeftModel, path: Path, adapter_params: list[torch.nn.Parameter], *,
                 initial: Path | None, is_main: bool,
                 trained_base: dict[str, torch.nn.Parameter] | None = None) -> None:
    """Save the trained adapter. Collective: every rank must call it, because under ZeRO-3 the
    adapter's parameters (and the trained base weights) are partitioned and gathered for the save.

    With `initial`, the adapter is converted (PEFT's path_initial_model_for_weight_conversion)
    to a plain LoRA that applies to the original, unmodified base weights. With `trained_base`
    (base parameter name -> the rewritten weight), those weights are saved beside the adapter
    in TRAINED_BASE_FILE, and the config says plain init; `load_trained` puts them back."""
    import deepspeed

    base = dict(trained_base or {})
    with deepspeed.zero.GatheredParameters([*adapter_params, *base.values()], modifier_rank=None):
        if is_main:
            kwargs = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {}
            model.save_pretrained(str(path), **kwargs)
            if base:
                from safetensors.torch import save_file

                _plain_init_config(model, path)
                save_file({name: p.detach().to("cpu").contiguous() for name, p in base.items()},
                          str(path / TRAINED_BASE_FILE))


def load_trained(base_model: torch.nn.Module, adapter_dir: str | Path) -> PeftModel:
    """A saved adapter on its base model, with the base weights it was trained on put back
    first when it carries them (LoftQ). `base_model` is modified in place."""
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / TRAINED_BASE_FILE
    if weights.is_file():
        from safetensors.torch import load_file

        with torch.no_grad():
            for name, value in load_file(str(weights)).items():
                param = base_model.get_parameter(name)
                if param.shape != value.shape:
                    raise ValueError(f"{weights}: {name} has shape {tuple(value.shape)}, the base model's "
                                     f"{tuple(param.shape)}: this adapter was trained on another base model")
                param.copy_(value.to(param.device, param.dtype))
    return PeftModel.from_pretrained(base_model, str(adapter_dir))


def adapter_bytes(path: Path) -> int:
    """Size of the adapter itself (the trained base weights some adapters carry are not it)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != TRAINED_BASE_FILE)


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of either (also after a crash:
    the data is on disk before the rename)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def write_json(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())
