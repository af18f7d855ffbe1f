"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trials.tiny import default_cache_root

# The tiny model stays in the user's cache (built once, reused across sessions); the index of
# sweeps and submissions is this session's own, so a sweep name an earlier session used
# (whose MLflow server is gone) never answers for one of these tests.
MODEL_CACHE = default_cache_root()


@pytest.fixture(scope="session", autouse=True)
def private_sweep_index(tmp_path_factory):
    saved = os.environ.get("PEFT_SWEEP_CACHE")
    os.environ["PEFT_SWEEP_CACHE"] = str(tmp_path_factory.mktemp("peft-sweep-cache"))
    yield
    if saved is None:
        os.environ.pop("PEFT_SWEEP_CACHE", None)
    else:
        os.environ["PEFT_SWEEP_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The quick tiny pretrained Llama (built once, then cached; see trials.tiny), with its
    downstream task in ``task/train.jsonl`` and ``task/eval.jsonl``."""
    from trials.tiny import ensure_tiny

    return ensure_tiny(MODEL_CACHE, quick=True)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A small Llama with random weights and the tiny model's character tokenizer, for plan
    checks on known shapes: q_proj 64x64, k/v_proj 64->32, mlp 64<->128."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trials.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("small-llama")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


pytest_plugins = ["services"]  # mlflow_server, ray_cluster (tests/services.py)
