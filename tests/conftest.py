"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The quick tiny pretrained Llama (built once, then cached; see trials.tiny), with its
    downstream task in ``task/train.jsonl`` and ``task/eval.jsonl``."""
    from trials.tiny import ensure_tiny

    return ensure_tiny(quick=True)


pytest_plugins = ["services"]  # mlflow_server, ray_cluster (tests/services.py)
