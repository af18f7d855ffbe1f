"""Where a trial's rows come from: a jsonl, csv or parquet file, a saved Hugging Face datasets
directory, or a dataset id (`owner/name`) already in the local Hugging Face datasets cache.

Each reader yields (where, row), `where` as a person would look the row up ("line 12",
"row 3"). Hub datasets load offline, always: a download inside a multi-worker trial would
stall every worker, so a dataset that is not cached is one line saying how to fetch it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trials.errors import TrialError

# The split each role reads from a hub dataset unless data.<role>_split says otherwise.
DEFAULT_SPLITS = {"train": "train", "eval": "validation", "test": "test"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_dataset(value: str, base: Path | None = None) -> bool:
    """`owner/name` that is not a local path (relative to `base`, or the current folder)."""
    if not _HUB_ID.fullmatch(value) or value.endswith(DATA_SUFFIXES):
        return False
    return not (Path(base or ".") / value).exists()


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise TrialError(f"{path} line {lineno}: not valid JSON ({err.msg})") from err


def _rows_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # DictReader fills absent trailing cells with None, which then reads as "null".
            yield f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _rows_table(rows: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows, 1):
        yield f"row {i}", row


def _hf_dataset(path: Path, role: str):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors for non-datasets dirs
        raise TrialError(f"{path}: not a saved Hugging Face datasets directory ({err})") from err
    if isinstance(ds, DatasetDict):
        wanted = ("train",) if role == "train" else ("validation", "eval", "test")
        names = [n for n in wanted if n in ds] or (list(ds) if len(ds) == 1 else [])
        if not names:
            raise TrialError(f"{path}: a DatasetDict with splits {', '.join(ds)}; none is the {role} split "
                             f"(expected {' or '.join(wanted)}); save the split itself instead")
        ds = ds[names[0]]
    return ds


def file_rows(path: Path, role: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row, `where` as a person would look it up in the file."""
    if path.is_dir():
        return _rows_table(_hf_dataset(path, role).to_list())
    if path.suffix == ".jsonl":
        return _rows_jsonl(path)
    if path.suffix == ".csv":
        return _rows_csv(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return _rows_table(pq.read_table(path).to_pylist())
        except Exception as err:  # pyarrow raises ArrowInvalid and friends for corrupt files
            raise TrialError(f"{path}: cannot read it as parquet ({err})") from err
    raise TrialError(f"data.{role} {str(path)!r}: unsupported format; "
                     "use .jsonl, .csv, .parquet, a saved HF datasets directory or a cached HF dataset id (owner/name)")


def field_value(path: Path, where: str, row: Any, name: str, setting: str) -> str:
    if not isinstance(row, dict):
        raise TrialError(f"{path} {where}: expected an object with named fields, got {type(row).__name__}")
    if name not in row:
        present = ", ".join(map(str, row)) or "none"
        raise TrialError(f"{path} {where}: field {name!r} is missing (fields present: {present}); "
                         f"fix the data or set data.{setting}")
    value = row[name]
    if not isinstance(value, str):
        got = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise TrialError(f"{path} {where}: field {name!r} must be a string, got {got}")
    return value


def _offline() -> None:
    """Trials never download: datasets and huggingface_hub read these when imported, and the
    constants when already imported."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "datasets" in sys.modules:
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def hub_rows(repo_id: str, role: str, split: str, subset: str | None) -> Iterator[tuple[str, Any]]:
    """The rows of one split of a dataset in the local HF datasets cache."""
    _offline()
    import datasets

    # datasets says "Using the latest cached version..." on every offline load: expected here.
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(repo_id, subset, split=split)
    except ConnectionError:
        fetch = f"datasets.load_dataset({repo_id!r}" + (f", {subset!r}" if subset else "") + ")"
        raise TrialError(f"data.{role} {repo_id!r}: neither a local file nor a dataset in the Hugging Face datasets "
                         f"cache ({datasets.config.HF_DATASETS_CACHE}); trials never download: fetch it once with "
                         f"`python -c \"import datasets; {fetch}\"` where the cache is shared, or give a file") from None
    except ValueError as err:
        text = str(err).splitlines()[0]
        if text.startswith("Unknown split"):
            raise TrialError(f"data.{role}_split: {repo_id} {text[0].lower()}{text[1:]} Set data.{role}_split to one of them") from None
        if "multiple" in text and "configurations" in text:
            raise TrialError(f"data.subset: {text}; set data.subset to one of them") from None
        if text.startswith("Couldn't find cache"):
            raise TrialError(f"data.subset: {text} ({' '.join(str(err).splitlines()[1:])}); fetch that subset "
                             "first or set data.subset to a cached one") from None
        raise TrialError(f"data.{role} {repo_id!r}: {text}") from None
    if len(ds) == 0:
        raise TrialError(f"data.{role} {repo_id!r}: split {split!r} is empty")
    yield from ((f"{split} row {i}", row) for i, row in enumerate(ds.to_list(), 1))
