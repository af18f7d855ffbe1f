"""Which names are credentials, and URIs with their passwords out of sight (pure)."""

from __future__ import annotations

import pytest

from sweep.util.secrets import is_secret, redact_uri, split_credentials


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                                  "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY",
                                  "MY_PASSWORD_FILE", "wandb_api_key", "GITHUB_TOKEN"])
def test_credentials_by_name(name):
    assert is_secret(name)


@pytest.mark.parametrize("name", ["HF_HOME", "MLFLOW_TRACKING_USERNAME", "TORCH_HOME", "NCCL_DEBUG", "KEYBOARD"])
def test_ordinary_names(name):
    assert not is_secret(name)


def test_uris_are_redacted_and_split():
    assert redact_uri("http://user:pass@host:5000/x") == "http://user:***@host:5000/x"
    assert redact_uri("https://:tok@host") == "https://:***@host"
    assert redact_uri("http://host:5000") == "http://host:5000"
    assert redact_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert split_credentials("http://user:p%40ss@host:5000") == (
        "http://host:5000", {"MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": "p%40ss"})
    assert split_credentials("http://host:5000") == ("http://host:5000", {})
