"""Early stopping that the trial carries out itself.

When Tune stops a function trial it kills the trial's actor; the Ray Train controller and
its workers die with it, but asynchronously: measured on a 2-core node, the workers of a
trial ASHA had stopped ran three more steps, saved and closed their MLflow run before they
went, so the run said "finished" and the compute was spent anyway. Killed mid-upload, a run
would instead lose its adapter.

So the scheduler's decision travels to the workers instead: `DecidingASHA` records each
decision on a small board actor and tells Tune to continue; the workers, right after each
evaluation report, wait for the decision on their report and, when it is "stop", end
training there, save the adapter, close the run as early-stopped and return. Tune sees a
trial that ended on its own after the rung where ASHA cut it, which is what ASHA asked for.

The board has a fixed name per sweep, so a scheduler restored by `sweep resume` finds the
new driver's board. If the board is gone (the driver died) or slow, workers carry on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

log = logging.getLogger(__name__)

NAMESPACE = "peft-sweep"
WAIT_S = 60.0


def board_name(sweep: str) -> str:
    return f"decisions:{sweep}"


class DecisionBoard:
    """(tune trial id, step) -> stop?, with waiting readers. An asyncio actor, so a waiting
    worker blocks nothing else."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, int], bool] = {}
        self.changed = asyncio.Condition()

    async def decide(self, trial_id: str, step: int, stop: bool) -> None:
        async with self.changed:
            self.decisions[(trial_id, step)] = stop
            self.changed.notify_all()

    async def wait(self, trial_id: str, step: int, timeout: float) -> bool | None:
        key = (trial_id, step)
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: key in self.decisions), timeout)
            except asyncio.TimeoutError:
                return None
            return self.decisions[key]  # every rank of the trial reads it


def start_board(sweep: str) -> Any:
    """The sweep's board, owned by this driver (it dies with it)."""
    import ray

    return ray.remote(DecisionBoard).options(
        name=board_name(sweep), namespace=NAMESPACE, num_cpus=0, max_concurrency=1000, get_if_exists=True,
    ).remote()


def stop_board(board: Any | None) -> None:
    if board is not None:
        import ray

        ray.kill(board)


def _board(name: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


class DecidingASHA(ASHAScheduler):
    """ASHA whose stop decisions the trial carries out itself (see the module docstring)."""

    def __init__(self, board: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.board = board

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        stop = decision == TrialScheduler.STOP
        if self._announce(trial.trial_id, result.get("step"), stop) and stop:
            return TrialScheduler.CONTINUE  # the trial stops itself after this report
        return decision

    def _announce(self, trial_id: str, step: Any, stop: bool) -> bool:
        if not isinstance(step, (int, float)):
            return False
        board = _board(self.board)
        if board is None:
            return False
        board.decide.remote(trial_id, int(step), stop)
        return True


def should_stop(board: str | None, trial_id: str, step: int) -> bool:
    """Called by every worker right after reporting `step`: the scheduler's decision on it."""
    if not board:
        return False
    import ray

    handle = _board(board)
    if handle is None:
        return False
    try:
        return bool(ray.get(handle.wait.remote(trial_id, step, WAIT_S), timeout=WAIT_S + 30))
    except Exception as err:  # the driver is gone or unreachable: keep training
        log.warning("no early-stopping decision for %s step %d: %s", trial_id, step, err)
        return False
