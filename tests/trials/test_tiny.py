"""The tiny local model and task: buildable offline, loadable like any hub model, and
reproducible, since sweeps compare adapters on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trials.tiny import TINY_VERSION, build_base_model, ensure_tiny, write_task


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("tiny") / "model", quick=True)


def test_quick_model_loads_from_disk_with_auto_classes(quick_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model)
    model = AutoModelForCausalLM.from_pretrained(quick_model)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert (quick_model / "model.safetensors").is_file()
    # The shapes adapters are sized against: 4 query heads, 2 KV heads.
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (128, 128)
    assert tuple(attn.k_proj.weight.shape) == (64, 128)
    assert tuple(attn.v_proj.weight.shape) == (64, 128)
    assert model.config.vocab_size == len(tok) < 512
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}
    assert model.config.pad_token_id == tok.pad_token_id

    batch = tok(["rot1 abc =", "add 1 2 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)

    record = json.loads((quick_model / "tiny_build.json").read_text())
    assert record["version"] == TINY_VERSION and record["quick"] is True


def test_tokenizer_round_trips_and_splits_like_joined(quick_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model)
    prompt, response = "sort 3 1 2 =", " 1 2 3"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    assert tok.unk_token_id not in ids
    # Character-level: a trial that tokenizes prompt and response apart gets the same ids.
    joined = tok(prompt + response)["input_ids"]
    apart = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
    assert joined == apart


def test_task_files_have_fields_and_are_deterministic(tmp_path: Path) -> None:
    a = write_task(tmp_path / "a", seed=3, n_train=50, n_eval=10)
    b = write_task(tmp_path / "b", seed=3, n_train=50, n_eval=10)
    c = write_task(tmp_path / "c", seed=4, n_train=50, n_eval=10)
    assert set(a) == {"train", "eval"}
    for split in ("train", "eval"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()

    train = [json.loads(line) for line in a["train"].read_text().splitlines()]
    eval_ = [json.loads(line) for line in a["eval"].read_text().splitlines()]
    assert (len(train), len(eval_)) == (50, 10)
    for row in train + eval_:
        assert set(row) == {"prompt", "response"}
        assert row["response"].startswith(" ") and not row["response"].endswith("</s>")
    for row in train:
        word = row["prompt"].removeprefix("rot1 ").removesuffix(" =")
        assert row["response"] == " " + "".join(chr((ord(ch) - 97 + 1) % 26 + 97) for ch in word)
    # Eval measures generalization, so no eval prompt may appear in train.
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in eval_}


def test_pretraining_mix_teaches_next_letter_but_never_the_task() -> None:
    from random import Random

    from trials.tiny import _pretrain_example

    rng = Random("tiny-corpus:0")
    pairs = [_pretrain_example(rng) for _ in range(2000)]
    nexts = [(p, r) for p, r in pairs if p.startswith("next ")]
    # A real share of the mix, and only ever one letter (whole words would be the task).
    assert 100 < len(nexts) < 600
    for prompt, response in nexts:
        c = prompt.removeprefix("next ").removesuffix(" =")
        assert len(c) == 1 and c.islower()
        assert response == " " + ("a" if c == "z" else chr(ord(c) + 1))
    assert ("next z =", " a") in nexts
    assert not any(p.startswith("rot1") for p, _ in pairs)
    # Deterministic for a seed.
    again = Random("tiny-corpus:0")
    assert [_pretrain_example(again) for _ in range(2000)] == pairs


def test_task_seed_does_not_touch_global_random(tmp_path: Path) -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    write_task(tmp_path, seed=0, n_train=5, n_eval=5)
    assert random.random() == expected


def test_ensure_tiny_reuses_the_cached_build(tmp_path: Path, quick_model: Path) -> None:
    import shutil

    # Seed the cache with the module's quick build so this test stays fast; ensure_tiny
    # must return it rather than build again.
    target = tmp_path / f"tiny-llama-quick-v{TINY_VERSION}"
    shutil.copytree(quick_model, target)
    assert ensure_tiny(tmp_path, quick=True) == target
    assert not any(p.name.startswith(".tiny-llama-quick") and "tmp" in p.name for p in tmp_path.iterdir())


def test_ensure_tiny_builds_atomically_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFT_SWEEP_CACHE", str(tmp_path))
    path = ensure_tiny(quick=True)
    assert path == tmp_path / f"tiny-llama-quick-v{TINY_VERSION}"
    assert (path / "config.json").is_file() and (path / "task" / "train.jsonl").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert ensure_tiny(quick=True) == path
