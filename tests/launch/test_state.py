"""`state.locate`: every way a user names a sweep finds its folder (pure file-system work)."""

from __future__ import annotations

import pytest

from sweep.errors import StateError
from sweep.launch import state


@pytest.fixture(autouse=True)
def _own_index(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_SWEEP_CACHE", str(tmp_path / "cache"))


def _sweep(folder, name: str = "demo") -> state.SweepState:
    st = state.SweepState(name=name, spec_path="/x/spec.yaml", spec_sha256="0", storage=str(folder),
                          tracking_uri="sqlite:////x/m.db", experiment_id="1", parent_run_id="p", strategy="grid")
    state.save(st)
    return st


def test_a_folder_its_state_file_a_spec_or_a_name(tmp_path, monkeypatch):
    specs = tmp_path / "project"
    folder = specs / "runs" / "demo"
    _sweep(folder)
    (specs / "spec.yaml").write_text("name: demo\n")
    assert state.locate(str(folder)) == str(folder)
    assert state.locate(str(folder / state.STATE_FILE)) == str(folder)
    assert state.locate(str(specs / "spec.yaml")) == str(folder)  # <spec folder>/runs/<name>
    monkeypatch.chdir(tmp_path)
    assert state.locate("demo") == str(folder)  # from any folder, through this machine's index
    assert state.load(state.locate("demo")).parent_run_id == "p"


def test_runs_of_the_current_folder_come_before_the_index(tmp_path, monkeypatch):
    here = tmp_path / "here"
    _sweep(here / "runs" / "demo")
    _sweep(tmp_path / "elsewhere" / "demo")  # the index now names this one
    monkeypatch.chdir(here)
    assert state.locate("demo") == str(here / "runs" / "demo")


def test_a_stale_index_entry_or_an_unknown_name_is_one_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "gone" / "demo"
    _sweep(folder)
    (folder / state.STATE_FILE).unlink()
    monkeypatch.chdir(tmp_path)
    for target in ("demo", "nosuch", str(tmp_path / "nosuch.yaml")):
        with pytest.raises(StateError) as err:
            state.locate(target)
        assert err.value.lines == [
            f"no sweep found for {target!r}: give the sweep folder (with {state.STATE_FILE}), its spec file, "
            "or the name of a sweep started on this machine"]


def test_an_unreadable_index_reads_as_empty(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sweeps.json").write_text("{not json")
    folder = tmp_path / "runs" / "demo"
    _sweep(folder)  # rewrites the index
    monkeypatch.chdir(tmp_path / "runs")
    assert state.locate("demo") == str(folder)


def test_status_of_a_sweep_whose_mlflow_server_is_gone_answers_with_one_line(tmp_path):
    """A sweep recorded against a server that no longer runs (an old session's, a laptop's):
    `sweep status` says so in one line after the health check, instead of sitting through
    MLflow's minutes of request retries."""
    from sweep.launch.status import sweep_status
    from sweep.util.net import free_port

    st = _sweep(tmp_path / "old")
    st.tracking_uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    state.save(st)
    report = sweep_status(str(tmp_path / "old"))
    assert report["trials"] == [] and "parent_status" not in report
    assert f"cannot reach the MLflow server at {st.tracking_uri}" in report["warning"], report
