"""The decision board and DecidingASHA on a real Ray runtime: the scheduler's stop reaches
every rank of the trial it names, and nothing else."""

from __future__ import annotations

import pytest
import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from sweep.launch.early_stop import DecidingASHA, board_name, should_stop, start_board, stop_board

pytestmark = pytest.mark.slow  # needs the session's Ray head


def test_the_board_hands_each_decision_to_every_reader(ray_driver):
    name = board_name("board-test")
    board = start_board("board-test")
    try:
        ray.get(board.decide.remote("t1", 3, True))
        ray.get(board.decide.remote("t2", 3, False))
        assert [should_stop(name, "t1", 3) for _ in range(2)] == [True, True]  # every rank reads it
        assert should_stop(name, "t2", 3) is False
        waiting = board.wait.remote("t3", 6, 30.0)  # a reader that comes first waits for the decision
        ray.get(board.decide.remote("t3", 6, True))
        assert ray.get(waiting) is True
        assert ray.get(board.wait.remote("t4", 3, 0.5)) is None  # no decision in time
    finally:
        stop_board(board)
    assert should_stop(name, "t1", 3) is False  # the driver (and its board) gone: keep training
    assert should_stop(None, "t1", 3) is False  # no scheduler that stops


def _asha(sweep: str) -> DecidingASHA:
    return DecidingASHA(board_name(sweep), time_attr="training_iteration", metric="eval_loss", mode="min", max_t=4,
                        grace_period=1, reduction_factor=2)


def _rung(scheduler: DecidingASHA, losses: list[float]) -> list[str]:
    trials = [Trial("fn", config={}, trial_id=f"t{i}", stub=True) for i in range(len(losses))]
    for t in trials:
        scheduler.on_trial_add(None, t)
    return [scheduler.on_trial_result(None, t, {"training_iteration": 1, "eval_loss": loss, "step": 3})
            for t, loss in zip(trials, losses)]


def test_deciding_asha_posts_a_stop_and_lets_the_trial_end_itself(ray_driver):
    board = start_board("asha-test")
    try:
        decisions = _rung(_asha("asha-test"), [1.0, 5.0])
        # Tune is told to continue; the weak trial reads "stop" on the board and ends at the rung.
        assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]
        assert should_stop(board_name("asha-test"), "t0", 3) is False
        assert should_stop(board_name("asha-test"), "t1", 3) is True
    finally:
        stop_board(board)
    # Without a board (its driver died) the stop goes to Tune as plain ASHA would send it.
    assert _rung(_asha("asha-test"), [1.0, 5.0]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
