"""The trial's own configuration: the only message the sweep driver sends to a trial.

The sections defined here (model, data, trainer, deepspeed) are shared with the sweep
spec, which adds grid lists and distributions on top of the concrete trainer fields.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trials.adapters import AdapterFields, family_of
from trials.strict import Strict
from trials.templates import template_problem


class ModelConfig(Strict):
    base_model: str = Field(description="Local model directory or a Hugging Face model id.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code. Never on by default.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel: sdpa (PyTorch's fused attention), eager (plain matmuls), or "
                            "flash_attention_2 (needs the flash-attn package and a CUDA GPU).")

    @field_validator("attn_implementation")
    @classmethod
    def _kernel_installed(cls, value: str) -> str:
        # Checked where the config is validated, the plan first: a trial would fail on every worker.
        if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("flash_attention_2 needs the flash-attn package, which is not installed here "
                             "(pip install flash-attn, on a CUDA machine, also where `sweep plan` runs); use sdpa, "
                             "PyTorch's fused attention, which needs nothing extra")
        return value


class DataConfig(Strict):
    train: str = Field(description="Training data: .jsonl, .csv, .parquet, a saved HF datasets directory, or a "
                                   "dataset id (owner/name) in the local HF datasets cache, loaded offline.")
    eval: str | None = Field(None, description="Evaluation data in the same formats; or use eval_fraction.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of train as eval when no eval file is given (default 0.1); "
                                      "the same examples for every trial of a sweep, whatever its seed."
    )
    test: str | None = Field(None, description="Test data in the eval formats: evaluated once, at the end, with the "
                                               "final adapter (test_* metrics); never used for ranking.")
    forgetting: str | None = Field(None, description="Unrelated text (.txt, one document per line, or .jsonl with a "
                                                     "`text` field): CE with the trained adapter minus CE of the base.")
    subset: str | None = Field(None, description="The configuration (subset) of a cached HF dataset, e.g. 'main'.")
    train_split: str = Field("train", description="The split data.train reads when it is a cached HF dataset.")
    eval_split: str = Field("validation", description="The split data.eval reads when it is a cached HF dataset.")
    test_split: str = Field("test", description="The split data.test reads when it is a cached HF dataset.")
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = Field(None, description="A field holding a chat (a list of {role, content}); "
                                                         "rendered by the chat template, trained on every assistant "
                                                         "turn. Replaces prompt_field/response_field.")
    template: str = Field("plain", description="'plain' (the prompt as written), 'chat' (the tokenizer's chat "
                                               "template: the prompt as the user turn, the response as the "
                                               "assistant turn), or a format string with {prompt}.")
    system: str | None = Field(None, description="A system message before every chat (data.template: chat or "
                                                 "data.messages_field).")
    max_length: int = Field(256, ge=8, description="Tokens per example (prompt + response) after truncation.")

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        problem = template_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("give either data.eval or data.eval_fraction, not both")
        chat = self.template == "chat" or self.messages_field is not None
        if self.messages_field is not None and self.template not in ("plain", "chat"):
            raise ValueError("data.messages_field rows are rendered by the chat template; drop data.template or set "
                             "it to chat")
        if self.system is not None and not chat:
            raise ValueError("data.system is the system turn of a chat; set data.template: chat (or use "
                             "data.messages_field)")
        return self


class EvaluationConfig(Strict):
    generate: bool = Field(False, description="Greedy-decode the response of every eval (and test) example: "
                                              "eval_exact_match, and eval_answer_accuracy with answer_pattern.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per example at most.")
    answer_pattern: str | None = Field(None, description="Regex whose first group extracts the answer from a "
                                                         "response, e.g. '####\\s*(-?[0-9.,]+)'.")
    generate_at: Literal["final", "every"] = Field("final", description="Generate at the final evaluation only, or "
                                                                         "at every evaluation (slow).")

    @field_validator("answer_pattern")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            groups = re.compile(value).groups
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        if groups < 1:
            raise ValueError("needs a group around the answer, e.g. '####\\s*(-?[0-9.,]+)'")
        return value


class TrainerConfig(Strict):
    learning_rate: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per worker per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    eval_every: int = Field(50, ge=1, description="Evaluate (and report) every this many optimizer steps, and at the end.")
    eval_batches: int | None = Field(None, ge=1, description="Cap evaluation at this many batches (all when unset).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of max_steps spent in linear warmup before cosine decay.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them "
                           "(non-reentrant, as PEFT recommends): activation memory of one layer, ~30 % more compute.")


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with loss "
                            "scaling on older GPUs, fp32 on CPU.")


class TrialConfig(Strict):
    trial_id: str = ""
    model: ModelConfig
    data: DataConfig
    adapter: AdapterFields
    trainer: TrainerConfig = TrainerConfig()
    seed: int = 0
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    def content_id(self) -> str:
        """Stable id from the trial's content (everything but the id itself)."""
        payload = self.model_dump(mode="json", exclude={"trial_id"})
        fields = type(self.adapter)
        for name in fields.ID_WHEN_SET:
            if getattr(self.adapter, name) == fields.model_fields[name].default:
                payload["adapter"].pop(name, None)
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        variant = family_of(self.adapter).variant(self.adapter).replace("+", "-")
        return f"{variant}-{digest[:10]}"

    def with_id(self) -> TrialConfig:
        return self.model_copy(update={"trial_id": self.content_id()})

    @classmethod
    def load(cls, path: str | Path) -> TrialConfig:
        return cls.model_validate_json(Path(path).read_text())

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")
