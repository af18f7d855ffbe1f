"""A tiny pretrained Llama and a downstream task, built locally so nothing comes from the hub.

The pretraining corpus is a mixture of symbolic string/number operations written as
``"<op> <args> =" + " <result>"``, among them ``next`` (the letter after a single letter,
z wraps to a). The downstream task, ``rot1`` (shift each letter of a word by one), uses the
same characters and format but never appears in pretraining, so the base model starts out
poor at it; it needs copying and ``next`` combined, which an adapter can learn in a
quickstart's budget.

The tokenizer is character-level: a prompt and its response tokenize to the same ids
whether joined or apart, so a trial's prompt/response split never depends on merges.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import string
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump whenever the corpus, task, tokenizer, architecture or training recipe changes:
# it names the cache directory, so stale builds are never reused.
TINY_VERSION = "2"

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# Punctuation and newline are not used by the corpus, but keeping them in the vocabulary
# means user data with ordinary text tokenizes without a wall of <unk>.
CHARACTERS = " =" + string.digits + string.ascii_lowercase + string.ascii_uppercase + "\n" + string.punctuation.replace("=", "")

MAX_POSITIONS = 256
ARCH: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
)

DEFAULT_STEPS = 1000
QUICK_STEPS = 3
BLOCK = 128
BATCH = 16
QUICK_BATCH = 4
# 3e-3 never formed the copying circuit within budget; 1e-3 does by ~500 steps.
LR = 1e-3
WARMUP = 50

TASK_NAME = "rot1"
WORD_MIN, WORD_MAX = 3, 8


# --- corpus and task ------------------------------------------------------------------


def _word(rng: Random, lo: int = 1, hi: int = WORD_MAX, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


_OPS = ("copy", "reverse", "upper", "lower", "sort", "add", "len", "next")
# `next` (the letter after one letter) teaches the alphabet's successor table; the task
# then only has to combine it with copying. Without it (version 1) no adapter got past
# ~0.30 token accuracy on rot1 within a quickstart's budget. Its examples are short, so a
# weight of 2 is still a small share of the corpus's tokens.
_OP_WEIGHTS = (4, 2, 2, 2, 1, 1, 1, 2)


def _next_letter(c: str) -> str:
    return chr((ord(c) - ord("a") + 1) % 26 + ord("a"))


def _pretrain_example(rng: Random) -> tuple[str, str]:
    """One (prompt, response) pair from the pretraining mixture."""
    # Copy-like ops dominate: copying needs an induction-style circuit, which is the slow
    # thing for a tiny model to learn and the skill the downstream task builds on.
    op = rng.choices(_OPS, weights=_OP_WEIGHTS)[0]
    if op == "copy":
        w = _word(rng)
        return f"copy {w} =", f" {w}"
    if op == "reverse":
        w = _word(rng)
        return f"reverse {w} =", f" {w[::-1]}"
    if op == "upper":
        w = _word(rng)
        return f"upper {w} =", f" {w.upper()}"
    if op == "lower":
        w = _word(rng, alphabet=string.ascii_uppercase)
        return f"lower {w} =", f" {w.lower()}"
    if op == "sort":
        digits = [rng.randint(0, 9) for _ in range(rng.randint(2, 6))]
        return f"sort {' '.join(map(str, digits))} =", f" {' '.join(map(str, sorted(digits)))}"
    if op == "add":
        # Mostly one-digit operands: the tiny model can actually learn those, and two-digit
        # ones still teach it what numbers look like.
        hi = 9 if rng.random() < 0.7 else 99
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return f"add {a} {b} =", f" {a + b}"
    if op == "next":
        # One letter only: the whole-word shift is the downstream task and must stay unseen.
        c = rng.choice(string.ascii_lowercase)
        return f"next {c} =", f" {_next_letter(c)}"
    w = _word(rng)
    return f"len {w} =", f" {len(w)}"


def _rot1(word: str) -> str:
    return "".join(_next_letter(c) for c in word)


def task_examples(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval examples of the downstream task; eval words never occur in train."""
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be >= 0")
    # A string seed keeps this stream apart from the pretraining corpus's for the same seed.
    rng = Random(f"tiny-task:{seed}")
    possible = sum(26**k for k in range(WORD_MIN, WORD_MAX + 1))
    if n_train + n_eval > possible // 2:
        raise ValueError(f"at most {possible // 2} distinct examples are available")
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < n_train + n_eval:
        w = _word(rng, WORD_MIN, WORD_MAX)
        if w not in seen:
            seen.add(w)
            words.append(w)
    rows = [{"prompt": f"{TASK_NAME} {w} =", "response": f" {_rot1(w)}"} for w in words]
    return rows[:n_train], rows[n_train:]


def write_task(out_dir: str | Path, *, seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (fields ``prompt``, ``response``; no EOS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, eval_ = task_examples(seed, n_train, n_eval)
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    for split, rows in (("train", train), ("eval", eval_)):
        # Fixed key order and newline handling so a seed always gives identical bytes.
        text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
        paths[split].write_bytes(text.encode("ascii"))
    return paths


# --- tokenizer and model --------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character, newline included (so not "."), is its own "word".
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Llama tokenizers prepend BOS and leave EOS to the caller; match that.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )


def model_config(tokenizer: PreTrainedTokenizerFast):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **ARCH,
    )


def _pretrain_blocks(rng: Random, tokenizer: PreTrainedTokenizerFast, block: int) -> Iterator[tuple[list[int], list[int]]]:
    """Endless (ids, labels) blocks of ``block`` tokens, each starting at an example's BOS so
    position 0 looks like it will in a fine-tuning example; packing keeps CPU steps free of
    padding.

    Prompt tokens get no loss: their operands are uniformly random, so they only add
    irreducible loss and gradient noise to a model with very few steps to learn to copy.
    """
    eos = tokenizer.eos_token_id
    while True:
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < block:
            prompt, response = _pretrain_example(rng)
            p = tokenizer(prompt)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
            ids += p + r
            labels += [-100] * len(p) + r
        yield ids[:block], labels[:block]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_base_model(
    out_dir: str | Path, *, seed: int = 0, steps: int = DEFAULT_STEPS, quick: bool = False, threads: int = 2
) -> Path:
    """Pretrain the tiny Llama on the generated corpus and save it (fp32 safetensors) with
    its tokenizer and a ``tiny_build.json`` record of how it was built.

    ``quick`` keeps the architecture but trains only a few small steps, for tests.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        steps = min(steps, QUICK_STEPS)
    batch = QUICK_BATCH if quick else BATCH
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = build_tokenizer()
    rng = Random(f"tiny-corpus:{seed}")
    losses: list[float] = []
    # fork_rng: seeding must not disturb the caller's torch RNG stream.
    with torch.random.fork_rng(devices=[]), _torch_threads(threads):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config(tokenizer)).to(torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)

        def lr_at(step: int) -> float:
            if step < WARMUP:
                return (step + 1) / WARMUP
            progress = (step - WARMUP) / max(1, steps - WARMUP)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        blocks = _pretrain_blocks(rng, tokenizer, BLOCK)
        for _ in range(steps):
            ids, labels = zip(*(next(blocks) for _ in range(batch)))
            loss = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tail = losses[-20:]
    record = {
        "version": TINY_VERSION,
        "seed": seed,
        "steps": steps,
        "quick": quick,
        "batch": batch,
        "block": BLOCK,
        "params": sum(p.numel() for p in model.parameters()),
        # Mean over the last steps, on response tokens (and EOS) only.
        "final_loss": sum(tail) / len(tail) if tail else None,
        "build_seconds": round(time.perf_counter() - started, 2),
        # Wall time swings with whatever else shares the CPU; process time does not.
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "task": TASK_NAME,
    }
    (out / "tiny_build.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


# --- cache ----------------------------------------------------------------------------


def default_cache_root() -> Path:
    env = os.environ.get("PEFT_SWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft-sweep"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an advisory lock so concurrent callers wait instead of building twice; the
    temp-dir-then-rename below keeps the result correct even where locks don't work."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_tiny(cache_dir: str | Path | None = None, *, quick: bool = False) -> Path:
    """The cached tiny model directory, building it on first use.

    ``cache_dir`` is the root (default ``$PEFT_SWEEP_CACHE`` or ``~/.cache/peft-sweep``);
    the model lives in ``tiny-llama[-quick]-v<version>`` under it, and the downstream task
    in its ``task/`` subdirectory (``train.jsonl``, ``eval.jsonl``).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    name = f"tiny-llama{'-quick' if quick else ''}-v{TINY_VERSION}"
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{name}.lock"):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build_base_model(tmp, quick=quick)
            write_task(tmp / "task")
            try:
                os.replace(tmp, target)
            except OSError:
                # Another builder (one the lock could not see) finished first; its copy is
                # equivalent, so keep it.
                if not target.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
