"""Prompt/response data: read, validate, tokenize, split, shard and batch.

Every problem with the data is found here, before any model is loaded, and named by
file, row and field.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trials.config import DataConfig
from trials.errors import TrialError
from trials.sources import DEFAULT_SPLITS, field_value, file_rows, hub_rows, is_hub_dataset

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_EVAL_FRACTION = 0.1


# The held-out eval split of `data.eval_fraction` is drawn with this seed, not the trial's:
# every trial of a sweep then evaluates the same examples, so they compare item by item.
SPLIT_SEED = 0


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt; the response tokens and EOS otherwise
    index: int = -1  # the example's row (0-based) in its file; -1 for a filler
    target: str = ""  # the response as written in the data

    @property
    def prompt_len(self) -> int:
        n = 0
        while n < len(self.labels) and self.labels[n] == IGNORE:
            n += 1
        return n


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    test: list[Example] = ()  # type: ignore[assignment]
    forgetting: list[Example] = ()  # type: ignore[assignment]


# --- reading ---------------------------------------------------------------------------


def read_pairs(path: str | Path, prompt_field: str, response_field: str, role: str = "train", *,
               split: str | None = None, subset: str | None = None) -> list[tuple[str, str]]:
    """(prompt, response) strings from a jsonl, csv or parquet file, a saved HF datasets dir,
    or a dataset id in the local HF datasets cache (its `split`, and `subset` if given)."""
    p = Path(path).expanduser()
    if is_hub_dataset(str(path)):
        p, rows = Path(str(path)), hub_rows(str(path), role, split or DEFAULT_SPLITS[role], subset)
    elif not p.exists():
        raise TrialError(f"data.{role} {str(path)!r}: no such file or directory")
    else:
        rows = file_rows(p, role)
    pairs = []
    for where, row in rows:
        prompt = field_value(p, where, row, prompt_field, "prompt_field")
        response = field_value(p, where, row, response_field, "response_field")
        if not response.strip():
            raise TrialError(f"{p} {where}: field {response_field!r} is empty; every example needs a response to learn")
        pairs.append((prompt, response))
    if not pairs:
        raise TrialError(f"{p}: no examples (the {role} data is empty)")
    return pairs


# --- tokenizing -----------------------------------------------------------------------


def tokenize(pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int,
             source: str) -> list[Example]:
    """Prompt tokens (with the tokenizer's own specials, e.g. BOS), then response tokens and
    EOS; truncated to max_length; loss only on the response. Examples whose response is cut
    away entirely are dropped (all of them is an error)."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    for index, (prompt, response, (_, text)) in enumerate(zip(prompts, responses, pairs)):
        ids = (list(prompt) + list(response) + [eos])[:max_length]
        n_prompt = min(len(prompt), len(ids))
        if n_prompt == len(ids):
            continue
        out.append(Example(ids, [IGNORE] * n_prompt + ids[n_prompt:], index, text))
    dropped = len(pairs) - len(out)
    if not out:
        longest = max(len(p) for p in prompts)
        raise TrialError(f"{source}: all {len(pairs)} examples lose their whole response when truncated to "
                         f"data.max_length={max_length} (longest prompt: {longest} tokens); raise data.max_length")
    if dropped:
        log.warning("%s: dropped %d of %d examples whose response does not fit in max_length=%d",
                    source, dropped, len(pairs), max_length)
    return out


def pair_stats(pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, int]:
    """What tokenizing these pairs gives, without building examples: the tokens kept, how many
    examples are cut at max_length, and how many lose their whole response (dropped)."""
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    lengths = [(len(p), len(p) + len(r) + 1) for p, r in zip(prompts, responses)]  # + EOS
    return {
        "examples": len(pairs),
        "tokens": sum(min(full, max_length) for _, full in lengths),
        "truncated": sum(full > max_length for _, full in lengths),
        "dropped": sum(prompt >= max_length for prompt, _ in lengths),
    }


def read_texts(path: str | Path) -> list[str]:
    """Documents of `data.forgetting`: the non-empty lines of a .txt file, or the `text` field
    of each row of any other data format."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TrialError(f"data.forgetting {str(path)!r}: no such file or directory")
    if p.suffix == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = [field_value(p, where, row, "text", "forgetting") for where, row in file_rows(p, "forgetting")]
    if not texts:
        raise TrialError(f"{p}: no text (the forgetting data is empty)")
    return texts


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Plain text scored on every token after the first (the loss of a language model on it)."""
    out = []
    for index, ids in enumerate(tokenizer(texts)["input_ids"]):
        ids = list(ids)[:max_length]
        if len(ids) >= 2:
            out.append(Example(ids, [IGNORE] + ids[1:], index))
    if not out:
        raise TrialError("data.forgetting: no document has two tokens or more")
    return out


def load_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Splits:
    """Train, eval, test and forgetting examples; without data.eval, a fixed eval_fraction of
    train (the same for every trial, see SPLIT_SEED)."""
    import torch

    def split(name: str) -> list[Example]:
        path = getattr(cfg, name)
        pairs = read_pairs(path, cfg.prompt_field, cfg.response_field, name, split=getattr(cfg, f"{name}_split"),
                           subset=cfg.subset)
        return tokenize(pairs, tokenizer, cfg.max_length, path)

    extra: dict[str, list[Example]] = {}
    if cfg.test is not None:
        extra["test"] = split("test")
    if cfg.forgetting is not None:
        extra["forgetting"] = tokenize_texts(read_texts(cfg.forgetting), tokenizer, cfg.max_length)
    if cfg.eval is not None:
        return Splits(split("train"), split("eval"), **extra)
    examples = split("train")
    fraction = cfg.eval_fraction if cfg.eval_fraction is not None else DEFAULT_EVAL_FRACTION
    if len(examples) < 2:
        raise TrialError(f"{cfg.train}: {len(examples)} usable example(s); holding out eval needs at least 2 "
                         f"(or give data.eval)")
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held_out = sorted(order[:n_eval])  # in file order, like an eval file
    return Splits([examples[i] for i in order[n_eval:]], [examples[i] for i in held_out], **extra)


# --- batching -------------------------------------------------------------------------


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(examples: list[Example], batch_size: int, rank: int, world: int, seed: int) -> Iterator[list[Example]]:
    """Endless micro-batches of this rank's shard: each epoch one seeded permutation, the
    same on every rank, split round-robin by rank (as DistributedSampler does)."""
    import torch

    if len(examples) < world:
        raise TrialError(f"{len(examples)} training examples cannot be shared by {world} workers")
    gen = torch.Generator().manual_seed(seed)
    while True:
        mine = torch.randperm(len(examples), generator=gen).tolist()[rank::world]
        for i in range(0, len(mine), batch_size):
            yield [examples[j] for j in mine[i:i + batch_size]]


def eval_batches(examples: list[Example], batch_size: int, rank: int, world: int,
                 cap: int | None) -> list[list[Example]]:
    """This rank's eval batches. Every rank gets the same number of batches (ZeRO-3 needs
    every rank in every forward), so short shards are topped up with loss-free copies."""
    mine = examples[rank::world]
    n = math.ceil(math.ceil(len(examples) / world) / batch_size)
    if cap is not None:
        n = min(n, cap)
    out = [mine[i * batch_size:(i + 1) * batch_size] for i in range(n)]
    filler = Example(examples[0].input_ids, [IGNORE] * len(examples[0].input_ids))
    return [b if b else [filler] for b in out]


def calibration_examples(examples: list[Example], n: int, seed: int) -> list[Example]:
    """`n` training examples chosen by the seed alone, so every rank calibrates on the same ones."""
    import torch

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order[:n]]
