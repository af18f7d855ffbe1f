"""The one tracking-URI rule (sweep.tracking.layout.tracking_uri), unit by unit. The end-to-end
proof that `sweep run` and `sweep table`/`export`/`ui` find the same store through it is
`tests/launch/test_sweep_run.py::test_one_tracking_uri_rule_for_run_table_export_and_ui`."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.tracking.layout import absolute_uri, is_relative_store, tracking_uri


@pytest.fixture(autouse=True)
def _no_ambient_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_absolute_forms_are_kept(tmp_path):
    assert absolute_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert absolute_uri("http://h:5000", tmp_path) == "http://h:5000"
    assert absolute_uri("file:///abs/mlruns", tmp_path) == "file:///abs/mlruns"
    assert absolute_uri("sqlite:///:memory:", tmp_path) == "sqlite:///:memory:"


def test_relative_stores_resolve_against_the_given_folder(tmp_path):
    assert absolute_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("rel/mlruns", tmp_path) == (tmp_path / "rel" / "mlruns").as_uri()
    assert is_relative_store("sqlite:///mlflow.db") and is_relative_store("mlruns")
    assert not is_relative_store("sqlite:////abs/m.db") and not is_relative_store("http://h:1")


def test_command_line_and_environment_resolve_against_the_current_folder(tmp_path, monkeypatch):
    spec_dir, cwd = tmp_path / "spec", tmp_path / "here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    here = Path.cwd()
    assert tracking_uri("sqlite:///cli.db", "sqlite:///spec.db", spec_dir) == f"sqlite:///{here}/cli.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(None, "sqlite:///spec.db", spec_dir) == f"sqlite:///{here}/env.db"
    assert tracking_uri("http://cli:2", "sqlite:///spec.db", spec_dir) == "http://cli:2"  # the flag beats the env


def test_the_spec_resolves_against_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_dir = tmp_path / "spec"
    assert tracking_uri(None, "sqlite:///spec.db", spec_dir) == f"sqlite:///{spec_dir}/spec.db"
    assert tracking_uri(None, None, None) == f"sqlite:///{tmp_path}/mlflow.db"  # the default, here


def test_a_scheme_without_an_mlflow_store_is_refused_by_name(tmp_path):
    from sweep.errors import UserError

    with pytest.raises(UserError) as err:
        tracking_uri(None, "ftp://files.example.org/mlruns", tmp_path)
    line = str(err.value)
    assert "tracking.uri 'ftp://files.example.org/mlruns'" in line and "no tracking store for 'ftp:'" in line
    assert "sqlite:" in line and "http:" in line
    for ok in ("postgresql://db/x", "https://h:1", "file:///tmp/x", "sqlite:///x.db", "mlruns"):
        tracking_uri(ok)


@pytest.mark.slow
def test_sweep_run_with_an_ftp_store_exits_2_before_ray_starts(tmp_path, tiny_model):
    """One line, exit 2, no traceback, and nothing started: no Ray session under RAY_TMPDIR."""
    from sweeping import run_refused, tiny_spec

    result = run_refused(tmp_path, tiny_spec("ftp", tiny_model, tracking={"uri": "ftp://files.example.org/mlruns"}))
    assert "tracking.uri 'ftp://files.example.org/mlruns': MLflow has no tracking store for 'ftp:'" in result.stderr
