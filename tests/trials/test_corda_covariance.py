"""CorDA's half-precision covariance (corda_half_covariance): PEFT accumulates the covariances
in the model's 16-bit dtype instead of fp32, and the initialization it gives stays close."""

from __future__ import annotations


def test_half_covariance_initializes_close_to_the_fp32_one(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from trials.adapters.base import Calibration
    from trials.adapters.lora import Lora, LoraFields

    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 60, (1, 24))} for _ in range(4)]
    seen: dict[bool, set[torch.dtype]] = {}

    def init(half: bool) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
        f = LoraFields(r=4, init_lora_weights="corda", target_modules=["q_proj", "v_proj"],
                       corda_half_covariance=half)
        dtypes: set[torch.dtype] = set()
        # Watch what PEFT accumulates: the covariance each target holds after a forward.
        handles = [m.register_forward_hook(lambda mod, i, o: dtypes.add(mod.covariance_matrix.dtype)
                                           if torch.is_tensor(getattr(mod, "covariance_matrix", None)) else None)
                   for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        wrapped = Lora().wrap(model, f, Calibration(batches))
        for h in handles:
            h.remove()
        seen[half] = dtypes
        return {n: p.detach().float() for n, p in wrapped.named_parameters() if "lora_" in n}

    full, half = init(False), init(True)
    assert seen == {False: {torch.float32}, True: {torch.bfloat16}}
    assert full.keys() == half.keys() and full
    for name in full:
        # Singular vectors agree up to sign; their products (the update's span) closely.
        a, b = full[name], half[name]
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).abs()
        assert cos > 0.9, (name, float(cos))
