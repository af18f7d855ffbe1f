"""Trial ids: stable content hashes."""

from __future__ import annotations


def test_fields_added_later_keep_existing_trial_ids():
    """corda_half_covariance enters a trial's id only when set: a CorDA or plain LoRA trial
    has the id it had before the field existed (so a resumed sweep finds its finished trials)."""
    from trials.config import TrialConfig

    def trial_id(adapter):
        return TrialConfig.model_validate({"model": {"base_model": "/m"}, "adapter": adapter, "data": {
            "train": "/d/train.jsonl", "eval": "/d/eval.jsonl"}}).content_id()

    corda = {"type": "lora", "init_lora_weights": "corda", "target_modules": ["q_proj"]}
    assert trial_id({"type": "lora"}) == "lora-e23b474dc1"
    assert trial_id(corda) == "lora-corda-ad91dd8948"
    half = trial_id({**corda, "corda_half_covariance": True})
    assert half.startswith("lora-corda-") and half != trial_id(corda)
