"""Decisions the launch makes for GPU clusters, tested here where no GPU runs: what the
workers' environment holds and which device each kept-gang rank drives (pure)."""

from __future__ import annotations

import pytest

from sweep.launch.gang import assign_devices
from sweep.launch.runtime import worker_env
from sweep.spec.schema import ResourcesSpec


class _Spec:
    def __init__(self, gpus: float):
        self.resources = ResourcesSpec(gpus_per_worker=gpus)


def test_worker_env_carries_no_credential_and_follows_the_trial_resources(monkeypatch):
    for name, value in {"HF_TOKEN": "a", "HF_HOME": "/hf", "MLFLOW_TRACKING_PASSWORD": "b", "MLFLOW_TRACKING_URI":
                        "http://u:p@h", "MLFLOW_TRACKING_USERNAME": "me", "TORCH_SECRET": "c", "DS_ACCELERATOR": "cpu",
                        "NCCL_DEBUG": "INFO", "PEFT_SWEEP_API_KEY": "d"}.items():
        monkeypatch.setenv(name, value)
    cpu, gpu = worker_env(_Spec(0)), worker_env(_Spec(1))
    for env in (cpu, gpu):
        assert not {"HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI", "TORCH_SECRET",
                    "PEFT_SWEEP_API_KEY"} & set(env)
        assert env["HF_HOME"] == "/hf" and env["NCCL_DEBUG"] == "INFO" and env["MLFLOW_TRACKING_USERNAME"] == "me"
    assert cpu["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in gpu  # the driver's DS_ACCELERATOR=cpu must not reach GPU workers


def test_co_located_ranks_see_their_nodes_gang_gpus_and_pick_their_own():
    placements = [("n1", ["3"]), ("n1", ["1"]), ("n2", ["0"]), ("n1", ["10"]), ("n2", ["2"])]
    assert assign_devices(placements) == [("1,3,10", 1), ("1,3,10", 0), ("0,2", 0), ("1,3,10", 2), ("0,2", 1)]
    assert assign_devices([("n1", []), ("n1", [])]) == [(None, 0), (None, 0)]  # CPU workers: nothing to set


@pytest.mark.parametrize("gpus", [0.5, 2, 1.5])
def test_only_whole_single_gpus_per_worker(gpus):
    with pytest.raises(ValueError, match="use 0 .CPU workers. or 1"):
        ResourcesSpec(gpus_per_worker=gpus)
