"""A trial the embedded local runtime cannot place is refused before anything starts: one
line, exit 2, no Ray session, no MLflow run (Ray would otherwise wait forever for the
placement group)."""

from __future__ import annotations

import pytest
from sweeping import run_refused, tiny_spec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("resources", "needle"),
    [
        ({"workers_per_trial": 8}, "one trial needs 8 CPUs in one placement group (workers_per_trial 8 x cpus_per_worker 1)"),
        ({"workers_per_trial": 1, "gpus_per_worker": 1}, "one trial needs 1 GPUs (workers_per_trial 1 x gpus_per_worker 1)"),
    ],
)
def test_unplaceable_trial_is_refused_before_anything_starts(tmp_path, tiny_model, resources, needle):
    db = tmp_path / "mlflow.db"
    spec = tiny_spec("too-big", tiny_model, resources=resources, tracking={"uri": f"sqlite:///{db}"})
    result = run_refused(tmp_path, spec)
    assert needle in result.stderr and "this machine has" in result.stderr
    assert not db.exists() and not (tmp_path / "runs").exists()
