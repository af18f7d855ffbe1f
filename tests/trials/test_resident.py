"""The kept base model (trials.resident) on the real tiny Llama: what a trial did to it is
undone exactly, and what cannot be shown to be undone is read from disk again."""

from __future__ import annotations

import pytest
import torch

from trials import resident
from trials.adapters import family_of
from trials.config import ModelConfig, TrialConfig

CPU = torch.device("cpu")


@pytest.fixture()
def model_cfg(tiny_model):
    resident.drop()
    yield ModelConfig(base_model=str(tiny_model))
    resident.drop()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _take(cfg, keep=True) -> resident.Loaded:
    return resident.acquire(cfg, torch.float32, CPU, {}, keep=keep)


def test_pissa_wrapped_model_comes_back_as_loaded(model_cfg, tiny_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    first = _take(model_cfg)
    assert not first.reused
    loaded = _state(first.model)
    adapter = TrialConfig.model_validate({
        "model": {"base_model": str(tiny_model)}, "data": {"train": "t.jsonl"}, "trainer": {"max_steps": 1},
        "adapter": {"type": "lora", "r": 4, "alpha": 4, "init_lora_weights": "pissa"}}).adapter
    family = family_of(adapter)
    names = family.rewritten_modules(first.model, adapter)
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)  # PEFT's Llama default targets
    resident.protect(first.model, names)
    wrapped = family.wrap(first.model, adapter, None)
    rewritten = first.model.get_parameter(f"{names[0]}.weight")
    assert not torch.equal(rewritten, loaded[f"{names[0]}.weight"])  # PiSSA left the residual there
    resident.give_back(wrapped)

    again = _take(model_cfg)
    assert again.reused and again.model is first.model
    assert not any(isinstance(m, BaseTunerLayer) for m in again.model.modules())
    assert all(p.requires_grad for p in again.model.parameters())
    state = again.model.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in loaded)


def test_checkpointing_and_its_hooks_are_undone(model_cfg, tiny_model):
    """Gradient checkpointing on, our input-grad hook, then PEFT's own over it (PeftModel
    registers it again when checkpointing is on, and the first handle is lost): all gone."""
    from trials.model import is_checkpointing, set_checkpointing

    first = _take(model_cfg)
    embed = first.model.get_input_embeddings()
    assert not embed._forward_hooks
    set_checkpointing(first.model, True)
    first.model.enable_input_require_grads()
    adapter = TrialConfig.model_validate({
        "model": {"base_model": str(tiny_model)}, "data": {"train": "t.jsonl"}, "trainer": {"max_steps": 1},
        "adapter": {"type": "oft", "oft_block_size": 16}}).adapter
    wrapped = family_of(adapter).wrap(first.model, adapter, None)
    assert len(embed._forward_hooks) >= 2  # ours and PEFT's, at least
    resident.give_back(wrapped)
    again = _take(model_cfg)
    assert again.reused and not embed._forward_hooks and not is_checkpointing(again.model)


def test_an_unrecorded_change_loads_the_model_again(model_cfg):
    first = _take(model_cfg)
    loaded = _state(first.model)
    with torch.no_grad():
        first.model.get_parameter("model.norm.weight").mul_(2)  # nothing protected it
    resident.give_back(first.model)
    again = _take(model_cfg)
    assert not again.reused and again.model is not first.model
    assert torch.equal(again.model.state_dict()["model.norm.weight"], loaded["model.norm.weight"])


def test_a_model_never_handed_back_is_not_reused(model_cfg):
    first = _take(model_cfg)  # a trial that failed before giving it back
    again = _take(model_cfg)
    assert not again.reused and again.model is not first.model


def test_keep_false_holds_nothing(model_cfg):
    first = _take(model_cfg, keep=False)
    assert not resident.holds(first.model)
    resident.give_back(first.model)
    assert not _take(model_cfg).reused
