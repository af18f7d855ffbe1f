"""Metric names, units and directions, and the callback interface a trial reports through.

`trials` knows nothing of Ray or MLflow: the sweep side passes a Reporter that forwards
these to wherever they belong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class Metric:
    unit: str
    goal: Literal["minimize", "maximize", "none"]
    description: str


METRICS: dict[str, Metric] = {
    "train_loss": Metric("nats/token", "minimize", "mean cross-entropy of response tokens over the optimizer step"),
    "learning_rate": Metric("1", "none", "learning rate at the step"),
    "eval_loss": Metric("nats/token", "minimize", "mean cross-entropy of eval response tokens"),
    "eval_perplexity": Metric("1", "minimize", "exp(eval_loss)"),
    "eval_token_accuracy": Metric("fraction", "maximize", "greedy next-token accuracy on eval response tokens"),
    "eval_loss_before": Metric("nats/token", "minimize", "eval_loss of the wrapped model before training"),
    "eval_exact_match": Metric("fraction", "maximize", "greedy-generated eval responses equal to the reference (stripped, spaces collapsed)"),
    "eval_answer_accuracy": Metric("fraction", "maximize", "eval answers extracted by evaluation.answer_pattern that match the reference's (numerically when both parse)"),
    "test_loss": Metric("nats/token", "minimize", "eval_loss on data.test, once, with the final adapter"),
    "test_perplexity": Metric("1", "minimize", "exp(test_loss)"),
    "test_token_accuracy": Metric("fraction", "maximize", "eval_token_accuracy on data.test"),
    "test_exact_match": Metric("fraction", "maximize", "eval_exact_match on data.test"),
    "test_answer_accuracy": Metric("fraction", "maximize", "eval_answer_accuracy on data.test"),
    "forgetting": Metric("nats/token", "minimize", "CE on data.forgetting with the trained adapter minus CE with the adapter disabled"),
    "forgetting_before": Metric("nats/token", "minimize", "CE on data.forgetting with the adapter disabled, before training"),
    "forgetting_after": Metric("nats/token", "minimize", "CE on data.forgetting with the trained adapter enabled"),
    "generate_s": Metric("s", "minimize", "wall seconds of greedy generation (eval and test, all evaluations)"),
    "train_tokens": Metric("tokens", "none", "trained tokens over all workers, padding excluded"),
    "train_samples": Metric("examples", "none", "trained examples over all workers (micro-batches x batch size)"),
    "tokens_per_s": Metric("tokens/s", "maximize", "trained tokens (all workers, padding excluded) per second of training"),
    "s_per_step": Metric("s", "minimize", "mean wall seconds per optimizer step"),
    "peak_memory_mb": Metric("MiB", "minimize", "this trial's peak CUDA memory allocated, or peak RSS on CPU, of the largest rank"),
    "trainable_params": Metric("params", "minimize", "parameters with requires_grad after wrapping"),
    "total_params": Metric("params", "none", "all parameters of the wrapped model"),
    "trainable_percent": Metric("%", "minimize", "100 * trainable_params / base model parameters"),
    "adapter_bytes": Metric("bytes", "minimize", "size on disk of the saved adapter directory (a LoftQ backbone excluded)"),
    "train_s": Metric("s", "minimize", "wall seconds of the training loop (evaluation excluded)"),
    "setup_s": Metric("s", "minimize", "wall seconds from trial start to the first training step (model, data, DeepSpeed)"),
    "base_model_load_s": Metric("s", "minimize", "wall seconds to have the base model on the device: read from disk, or on a kept worker the previous trial's adapter removed and the model checked (rank 0)"),
    "base_model_reused": Metric("bool", "none", "1 when the base model was the one an earlier trial on the same workers kept loaded (resources.keep_base_model)"),
    "wall_s": Metric("s", "minimize", "wall seconds of the whole trial"),
    "device_hours": Metric("device-h", "minimize", "wall_s x workers / 3600: the device time (GPUs, or CPU workers) the trial held"),
    "step": Metric("steps", "none", "optimizer steps done"),
    "skipped_steps": Metric("steps", "none", "optimizer steps fp16 loss scaling skipped on overflow (0 in fp32/bf16)"),
    "early_stopped": Metric("bool", "none", "1 when a reporter stopped the trial before max_steps"),
}

# Measured by greedy generation (evaluation.generate), and what every evaluation reports.
GENERATED = frozenset({"eval_exact_match", "eval_answer_accuracy", "test_exact_match", "test_answer_accuracy"})
EVERY_EVALUATION = frozenset({"eval_loss", "eval_perplexity", "eval_token_accuracy"})
# What a sweep may rank by: eval-split quality first, then anything else with a direction.
RANKABLE = tuple(["eval_loss", "eval_token_accuracy", "eval_exact_match", "eval_answer_accuracy"] + sorted(
    k for k, m in METRICS.items()
    if m.goal != "none" and not k.startswith("test_")
    and k not in ("eval_loss", "eval_token_accuracy", "eval_exact_match", "eval_answer_accuracy")))


class Reporter(Protocol):
    """Receives a trial's measurements. Called on every rank; implementations decide who logs."""

    def on_setup(self, info: dict[str, Any]) -> None:
        """After wrapping: static facts (trainable/total params, effective per-module values)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After every optimizer step: cheap, local, never a cross-worker barrier."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool | None:
        """Every `eval_every` steps and at the end: the place to report to a scheduler.
        Returning True asks the trial to stop after this evaluation (an early-stopping
        scheduler's decision); the adapter is still saved and on_end still runs."""

    def on_end(self, result: dict[str, Any], out_dir: str) -> None:
        """Once, after the adapter is saved (rank 0's out_dir holds it)."""


class NullReporter:
    def on_setup(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_end(self, result: dict[str, Any], out_dir: str) -> None:
        pass
