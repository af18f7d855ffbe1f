"""What `sweep plan` learns from the data and the model folder before anything starts: every
data file read once (not once per trial), with the same readers a trial uses, so a file
that passes here loads in every trial; and the base model's weight files.

A problem is one line naming the file, the line or row, and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trials.config import DataConfig, ModelConfig
from trials.data import DEFAULT_EVAL_FRACTION, pair_stats, read_rows, read_texts
from trials.templates import chat_template_problem, needs_chat_template
from trials.errors import TrialError

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class DataReport:
    role: str  # train | eval | test | forgetting
    path: str
    examples: int
    tokens: int | None = None  # with the base model's tokenizer, after truncation (None: no tokenizer)
    truncated: int | None = None  # examples cut at data.max_length
    dropped: int | None = None  # examples whose whole response is cut away (a trial skips them)

    @property
    def truncated_share(self) -> float | None:
        return None if self.truncated is None or not self.examples else self.truncated / self.examples

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "truncated_share": self.truncated_share}


def weight_problems(base_model: str) -> list[str]:
    """A local model folder must hold its weights: files, or an index whose shards exist."""
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return []  # a hub id: ModelShapes has found its config in the local cache already
    for name in INDEXES:
        index = folder / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return [f"model.base_model: {index} is not a readable weight index (a JSON object with weight_map)"]
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return [f"model.base_model: {len(missing)} of the {len(shards)} shards {name} lists are missing from "
                        f"{folder} (first: {missing[0]}); finish the download"]
            return []
    if any(any(folder.glob(g)) for g in WEIGHT_GLOBS):
        return []
    return [f"model.base_model: {folder} has no weight files (model.safetensors, pytorch_model.bin or a sharded "
            "index); every trial would fail to load it. Download the full model, or plan with --config-only to "
            "check shapes alone"]


def load_plan_tokenizer(model: ModelConfig):
    """The base model's tokenizer, or (None, the reason) when the folder has none."""
    from trials.model import load_tokenizer

    try:
        return load_tokenizer(model), None
    except TrialError as err:
        return None, str(err)


def check_data(data: DataConfig, tokenizer, *, workers: int, batch_size: int) -> tuple[list[DataReport], list[str]]:
    """Read every data file of the sweep once; reports per file, and the problems found."""
    reports: list[DataReport] = []
    problems: list[str] = []
    if tokenizer is not None and needs_chat_template(data.template, data.messages_field):
        problem = chat_template_problem(tokenizer, getattr(tokenizer, "name_or_path", "the base model"),
                                        data.messages_field)
        if problem is not None:
            problems.append(problem)
            tokenizer = None  # the rows are still checked; tokens cannot be counted
    for role in ("train", "eval", "test"):
        path = getattr(data, role)
        if path is None:
            continue
        try:
            rows = read_rows(path, role, data)
            stats = (pair_stats(rows, tokenizer, data.max_length, data.template, data.system)
                     if tokenizer is not None else {"examples": len(rows)})
        except TrialError as err:
            problems.append(str(err))
            continue
        report = DataReport(role, path, **stats)
        reports.append(report)
        if report.dropped is not None and report.dropped == report.examples:
            problems.append(f"data.{role} {path}: every example's prompt fills data.max_length={data.max_length} "
                            "tokens, leaving no response to learn; raise data.max_length")
    if data.forgetting is not None:
        try:
            reports.append(DataReport("forgetting", data.forgetting, len(read_texts(data.forgetting))))
        except TrialError as err:
            problems.append(str(err))

    train = next((r for r in reports if r.role == "train"), None)
    if train is not None:
        usable = train.examples - (train.dropped or 0)
        if data.eval is None:
            fraction = data.eval_fraction if data.eval_fraction is not None else DEFAULT_EVAL_FRACTION
            held_out = min(usable - 1, max(1, round(fraction * usable)))
            if usable < 2:
                problems.append(f"data.train {train.path}: {usable} usable example(s); holding out an eval split "
                                "needs at least 2 (or give data.eval)")
            usable -= max(held_out, 0)
        if usable < batch_size * workers:
            problems.append(f"data.train {train.path}: {usable} training examples, fewer than one optimizer step "
                            f"takes (batch_size {batch_size} x {workers} workers = {batch_size * workers}); add data "
                            "or lower search.trainer.batch_size")
    return reports, problems
