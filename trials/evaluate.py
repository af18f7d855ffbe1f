"""Evaluation of one trial: teacher-forced loss and token accuracy, greedy generation with
exact-match and answer accuracy, forgetting; and the per-example records behind
`predictions.jsonl`.

Everything runs on every rank over that rank's shard: ZeRO-3 gathers parameters in every
forward, so no rank may skip one (shards are topped up with fillers, index -1, which count
for nothing). Sums are reduced with one all-reduce; records are gathered to every rank
only when they are kept (the final evaluation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from trials.config import EvaluationConfig
from trials.data import IGNORE, Example, collate
from trials.dist import all_sum


def normalize(text: str) -> str:
    """What exact match compares: surrounding space stripped, inner runs of space collapsed."""
    return " ".join(text.split())


def extract_answer(text: str, pattern: str) -> str | None:
    match = re.search(pattern, text)
    if match is None or match.group(1) is None:
        return None
    return match.group(1).strip()


def _number(text: str) -> float | None:
    # "1,234." reads as 1234, as PEFT's method_comparison parses GSM8K answers.
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def reference_answer(target: str, pattern: str) -> str:
    """The reference's answer: the pattern's group when the reference matches it, else the
    whole reference (data often holds the bare answer)."""
    found = extract_answer(target, pattern)
    return found if found is not None else normalize(target)


def answers_match(predicted: str | None, reference: str) -> bool:
    """Numbers compare as numbers when both parse, anything else as normalised strings; no
    extracted answer is wrong."""
    if predicted is None:
        return False
    a, b = _number(predicted), _number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return normalize(predicted) == normalize(reference)


@dataclass
class Evaluator:
    cfg: EvaluationConfig
    tokenizer: Any
    device: Any
    synced_generation: bool  # ZeRO-3 across ranks: every rank runs as many decoding steps as the longest
    stop_ids: tuple[int, ...] = ()  # besides EOS: the chat template's end of an assistant turn

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def split(self, model, forward: Callable, batches: list[list[Example]], prefix: str, *,
              generate: bool) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics named `<prefix>_*` over all ranks' shards, and this rank's per-example
        records (gather_records collects them)."""
        local, records = self.teacher_forced(forward, batches)
        loss_sum, correct, tokens = all_sum([local["loss"], local["correct"], local["tokens"]], self.device)
        loss = loss_sum / tokens
        metrics = {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(loss) if loss < 700 else math.inf,
                   f"{prefix}_token_accuracy": correct / tokens}
        if generate:
            metrics.update(self.add_generation(model, batches, records, prefix))
        return metrics, records

    def add_generation(self, model, batches: list[list[Example]], records: list[dict[str, Any]],
                       prefix: str) -> dict[str, float]:
        """Generate for every example of the batches, add each prediction to its record, and
        return the `<prefix>_exact_match` (and `_answer_accuracy`) of all ranks."""
        predictions = self.generation(model, batches)
        for r in records:
            r.update(predictions[r["index"]])
        exact, answer, n = all_sum([sum(r["correct"] for r in records),
                                    sum(r.get("answer_correct", False) for r in records), len(records)], self.device)
        out = {f"{prefix}_exact_match": exact / n}
        if self.cfg.answer_pattern is not None:
            out[f"{prefix}_answer_accuracy"] = answer / n
        return out

    def loss(self, forward: Callable, batches: list[list[Example]]) -> float:
        """Mean CE per scored token over all ranks (forgetting's measure)."""
        local, _ = self.teacher_forced(forward, batches)
        loss_sum, tokens = all_sum([local["loss"], local["tokens"]], self.device)
        return loss_sum / tokens

    def teacher_forced(self, forward: Callable, batches: list[list[Example]]) -> tuple[dict[str, float], list[dict]]:
        """This rank's CE and next-token hits summed over scored tokens, and per example its
        mean CE and token accuracy."""
        import torch
        import torch.nn.functional as F

        loss_sum = correct = tokens = 0.0
        records: list[dict[str, Any]] = []
        with torch.no_grad():
            for b in batches:
                batch = {k: v.to(self.device) for k, v in collate(b, self.pad_id).items()}
                logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                mask = labels != IGNORE
                # Select the scored positions before casting: a float copy of all logits is
                # batch x length x vocab, the largest tensor of an evaluation.
                scored = logits[:, :-1][mask].float()
                ce = F.cross_entropy(scored, labels[mask], reduction="none")
                hits = (scored.argmax(-1) == labels[mask]).float()
                rows = mask.nonzero()[:, 0]
                per_loss = torch.zeros(len(b), device=ce.device, dtype=torch.float64).index_add_(0, rows, ce.double())
                per_hits = torch.zeros(len(b), device=ce.device, dtype=torch.float64).index_add_(0, rows, hits.double())
                counts = mask.sum(1)
                loss_sum += float(per_loss.sum())
                correct += float(per_hits.sum())
                tokens += float(counts.sum())
                for e, lo, hi, n in zip(b, per_loss.tolist(), per_hits.tolist(), counts.tolist()):
                    if e.index >= 0 and n:
                        records.append({"index": e.index, "target": e.target, "loss": lo / n,
                                        "token_accuracy": hi / n, "tokens": n})
        return {"loss": loss_sum, "correct": correct, "tokens": tokens}, records

    def generation(self, model, batches: list[list[Example]]) -> dict[int, dict[str, Any]]:
        """Greedy decoding of each example's response from its prompt: left-padded batches
        with the KV cache; per example the prediction and whether it is right."""
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_id,
                                  eos_token_id=[self.tokenizer.eos_token_id, *self.stop_ids],
                                  bos_token_id=self.tokenizer.bos_token_id)
        out: dict[int, dict[str, Any]] = {}
        with torch.no_grad():
            for b in batches:
                prompts = [e.input_ids[:e.prompt_len] for e in b]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(b), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(b), width), dtype=torch.long)
                for i, p in enumerate(prompts):
                    ids[i, width - len(p):] = torch.tensor(p)
                    mask[i, width - len(p):] = 1
                generated = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                           generation_config=config, synced_gpus=self.synced_generation)
                for e, row in zip(b, generated[:, width:].cpu().tolist()):
                    if e.index >= 0:
                        out[e.index] = self.judge(self.tokenizer.decode(row, skip_special_tokens=True), e.target)
        return out

    def judge(self, prediction: str, target: str) -> dict[str, Any]:
        record: dict[str, Any] = {"prediction": prediction, "correct": normalize(prediction) == normalize(target)}
        pattern = self.cfg.answer_pattern
        if pattern is not None:
            answer, reference = extract_answer(prediction, pattern), reference_answer(target, pattern)
            record.update(answer=answer, target_answer=reference, answer_correct=answers_match(answer, reference))
        return record


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records, on every rank, in index order."""
    import torch.distributed as dist

    parts: list[list[dict[str, Any]]] = [records]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, records)
    merged = {r["index"]: r for part in parts for r in part}
    return [merged[i] for i in sorted(merged)]
