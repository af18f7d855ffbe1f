"""Adapters trained on rewritten base weights (LoftQ): saved with those weights, reloaded on them.

PEFT runs LoftQ's quantization on CUDA only, so `benchmarks/gpu_check.py` runs a LoftQ trial
end to end; here everything after the initializer runs on the tiny model: the family's
decisions, the save (config and weights), the reload, and the reload's failure without them."""

from __future__ import annotations

import json

import pytest


def _fake_quantize(weight):
    """Round each row to 16 levels of its absmax, as a 4-bit quantizer leaves a weight."""
    import torch

    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 7
    return torch.round(weight / scale).clamp(-8, 7) * scale


def test_only_loftq_needs_its_trained_base():
    from trials.adapters.lora import Lora, LoraFields

    lora = Lora()
    loftq = LoraFields(init_lora_weights="loftq")
    assert lora.needs_trained_base(loftq) and not lora.changes_base_weights(loftq)
    for init in ("default", "pissa", "corda", "olora"):
        # PiSSA-like inits convert to a plain LoRA on the original weights instead.
        assert not lora.needs_trained_base(LoraFields(init_lora_weights=init))


def test_loftq_adapter_is_saved_with_its_backbone_and_reloads_exactly(tiny_model, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from trials import artifacts
    from trials.adapters.lora import Lora, LoraFields

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    lora, f = Lora(), LoraFields(init_lora_weights="loftq", r=4, target_modules=["q_proj", "v_proj"])
    model = fresh()
    trained_base = lora.trained_base(model, f, lora.rewritten_modules(model, f))
    assert trained_base and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in trained_base)
    base_ids = {id(p) for p in model.parameters()}
    peft_model = get_peft_model(model, lora.peft_config(f, for_count=True))
    # What PEFT's LoftQ leaves: the targeted weights replaced by their quantization (in place),
    # an adapter correcting it, and a config that says loftq.
    with torch.no_grad():
        for p in trained_base.values():
            p.data = _fake_quantize(p.data)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.peft_config["default"].init_lora_weights = "loftq"
    peft_model.peft_config["default"].loftq_config = {"loftq_bits": 4, "loftq_iter": 1}
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits

    out = tmp_path / "adapter"
    adapter_params = [p for p in peft_model.parameters() if id(p) not in base_ids]
    artifacts.save_adapter(peft_model, out, adapter_params, initial=None, is_main=True, trained_base=trained_base)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and not config["loftq_config"], "a reload would run LoftQ again"
    assert (out / artifacts.TRAINED_BASE_FILE).is_file()
    total = sum(p.stat().st_size for p in out.iterdir())
    assert 0 < artifacts.adapter_bytes(out) < total - sum(p.numel() * 4 for p in trained_base.values())

    with torch.no_grad():
        reloaded = artifacts.load_trained(fresh(), out).eval()(input_ids=ids).logits
        # PEFT's own loader runs (no LoftQ again, no GPU asked for) but leaves the original
        # weights under the adapter: not the model that was trained.
        plain = PeftModel.from_pretrained(fresh(), str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-6, rtol=0)
    assert (plain - trained).abs().max() > 1e-3


def test_trained_base_of_another_model_is_refused(tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from trials import artifacts

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    name = next(n for n, _ in base.named_parameters() if n.endswith("q_proj.weight"))
    tmp_path.mkdir(exist_ok=True)
    save_file({name: torch.zeros(3, 3)}, str(tmp_path / artifacts.TRAINED_BASE_FILE))
    with pytest.raises(ValueError, match="trained on another base model"):
        artifacts.load_trained(base, tmp_path)

