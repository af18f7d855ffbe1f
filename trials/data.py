"""Prompt/response data: read, validate, tokenize (by trials.templates), split, shard and batch.

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
from trials.templates import PLAIN, Row, chat_template_problem, encode, needs_chat_template, read_messages

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
    labels: list[int]  # IGNORE where the loss does not look: the prompt, a chat's other turns
    index: int = -1  # the example's row (0-based) in its file; -1 for a filler
    target: str = ""  # the response as written in the data (a chat's last assistant turn)
    n_prompt: int | None = None  # tokens before the response generation produces; None: the leading IGNOREs

    @property
    def prompt_len(self) -> int:
        if self.n_prompt is not None:
            return self.n_prompt
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


def read_rows(path: str | Path, role: str, cfg: DataConfig) -> list[Row]:
    """The examples of one data file (jsonl, csv, parquet, a saved HF datasets dir) or a dataset
    id in the local HF datasets cache: prompt/response fields, or a chat in data.messages_field."""
    p = Path(path).expanduser()
    if is_hub_dataset(str(path)):
        p, rows = Path(str(path)), hub_rows(str(path), role, getattr(cfg, f"{role}_split", None) or DEFAULT_SPLITS[role],
                                             cfg.subset)
    elif not p.exists():
        raise TrialError(f"data.{role} {str(path)!r}: no such file or directory")
    else:
        rows = file_rows(p, role)
    out = []
    for where, row in rows:
        if cfg.messages_field is not None:
            if not isinstance(row, dict) or cfg.messages_field not in row:
                present = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                raise TrialError(f"{p} {where}: field {cfg.messages_field!r} is missing (fields present: {present}); "
                                 "set data.messages_field to the field holding the chat")
            turns = read_messages(row[cfg.messages_field], f"{p} {where}", cfg.messages_field)
            out.append(Row("", next(c for r, c in reversed(turns) if r == "assistant"), turns))
            continue
        prompt = field_value(p, where, row, cfg.prompt_field, "prompt_field")
        response = field_value(p, where, row, cfg.response_field, "response_field")
        if not response.strip():
            raise TrialError(f"{p} {where}: field {cfg.response_field!r} is empty; every example needs a response "
                             "to learn")
        out.append(Row(prompt, response))
    if not out:
        raise TrialError(f"{p}: no examples (the {role} data is empty)")
    return out


def read_pairs(path: str | Path, prompt_field: str, response_field: str, role: str = "train", *,
               split: str | None = None, subset: str | None = None) -> list[tuple[str, str]]:
    """(prompt, response) strings of a prompt/response data file (see read_rows)."""
    cfg = DataConfig(train=str(path), prompt_field=prompt_field, response_field=response_field, subset=subset,
                     **({f"{role}_split": split} if split and role in DEFAULT_SPLITS else {}))
    return [(r.prompt, r.response) for r in read_rows(path, role, cfg)]


# --- tokenizing -----------------------------------------------------------------------


def _rows(rows: list[Row] | list[tuple[str, str]]) -> list[Row]:
    return [r if isinstance(r, Row) else Row(*r) for r in rows]


def tokenize(rows: list[Row] | list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int,
             source: str, template: str = PLAIN, system: str | None = None) -> list[Example]:
    """Tokens by data.template (trials.templates), truncated to max_length; the loss only on
    the response (every assistant turn of a chat). Examples whose learned tokens are all cut
    away are dropped (all of them is an error)."""
    rows = _rows(rows)
    encoded = encode(rows, tokenizer, template, system)
    out: list[Example] = []
    for index, (row, enc) in enumerate(zip(rows, encoded)):
        ids = enc.ids[:max_length]
        labels = [t if learned else IGNORE for t, learned in zip(ids, enc.trained)]
        if all(label == IGNORE for label in labels):
            continue
        out.append(Example(ids, labels, index, row.response, min(enc.n_prompt, len(ids))))
    dropped = len(rows) - len(out)
    if not out:
        longest = max(e.n_prompt for e in encoded)
        raise TrialError(f"{source}: all {len(rows)} examples lose their whole response when truncated to "
                         f"data.max_length={max_length} (longest prompt: {longest} tokens); raise data.max_length")
    if dropped:
        log.warning("%s: dropped %d of %d examples whose response does not fit in max_length=%d",
                    source, dropped, len(rows), max_length)
    return out


def pair_stats(rows: list[Row] | list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int,
               template: str = PLAIN, system: str | None = None) -> dict[str, int]:
    """What tokenizing these rows gives, without building examples: the tokens kept, how many
    examples are cut at max_length, and how many lose all their learned tokens (dropped)."""
    encoded = encode(_rows(rows), tokenizer, template, system)
    return {
        "examples": len(encoded),
        "tokens": sum(min(len(e.ids), max_length) for e in encoded),
        "truncated": sum(len(e.ids) > max_length for e in encoded),
        "dropped": sum(not any(e.trained[:max_length]) for e in encoded),
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

    if needs_chat_template(cfg.template, cfg.messages_field):
        problem = chat_template_problem(tokenizer, getattr(tokenizer, "name_or_path", "the base model"),
                                        cfg.messages_field)
        if problem is not None:
            raise TrialError(problem)

    def split(name: str) -> list[Example]:
        path = getattr(cfg, name)
        return tokenize(read_rows(path, name, cfg), tokenizer, cfg.max_length, path, cfg.template, cfg.system)

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
