"""Where and in which dtype a trial loads its base model (trials.model)."""

from __future__ import annotations

import pytest
import torch

from trials.config import ModelConfig
from trials.errors import TrialError
from trials.model import load_model, placement, resolve_dtype


def test_gpu_ranks_load_straight_onto_their_device_except_under_zero3():
    gpu = torch.device("cuda", 1)
    for stage in (0, 1, 2):
        assert placement(gpu, stage) == {"device_map": {"": gpu}}
    assert placement(gpu, 3) == {}  # DeepSpeed partitions host weights
    assert placement(torch.device("cpu"), 2) == {}


def test_a_device_map_load_gives_the_same_weights(tiny_model):
    """The device_map path (accelerate's loader) reads the same tensors as the plain one."""
    cfg = ModelConfig(base_model=str(tiny_model))
    plain = load_model(cfg, torch.float32).state_dict()
    mapped = load_model(cfg, torch.float32, {"device_map": {"": torch.device("cpu")}}).state_dict()
    assert plain.keys() == mapped.keys()
    assert all(torch.equal(plain[k], mapped[k]) for k in plain)


def test_auto_precision_follows_what_the_device_computes_natively():
    assert resolve_dtype("auto", cuda=False) == torch.float32
    assert resolve_dtype("auto", cuda=True, bf16_supported=True) == torch.bfloat16
    assert resolve_dtype("auto", cuda=True, bf16_supported=False) == torch.float16  # V100, T4: loss-scaled fp16
    assert resolve_dtype("bf16", cuda=True, bf16_supported=False) == torch.bfloat16  # asked for explicitly
    with pytest.raises(TrialError, match="fp16 needs a CUDA GPU"):
        resolve_dtype("fp16", cuda=False)
