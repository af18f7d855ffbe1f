"""The table's rows and the one best-trial rule, on hand-made trial runs (no services)."""

from __future__ import annotations

import pytest

from sweep.results.table import build_rows
from sweep.tracking.reader import TrialRun, best_trial


def test_build_rows_is_pure_and_follows_a_maximize_goal():

    def trial(i: int, variant: str, lr: str, seed: int, acc: float, status: str = "FINISHED", trainable: float = 100.0) -> TrialRun:
        return TrialRun(f"r{i}", status, f"t{i}", variant.split("+")[0], variant,
                        {"trainer.learning_rate": lr, "seed": str(seed)},
                        {"eval_token_accuracy": acc, "trainable_params": trainable})

    trials = [
        trial(1, "lora", "0.001", 0, 0.50), trial(2, "lora", "0.001", 1, 0.70),  # mean 0.60
        trial(3, "lora", "0.01", 0, 0.58), trial(4, "lora", "0.01", 1, 0.66),  # mean 0.62: best config
        trial(5, "lora", "0.01", 2, 0.99, status="FAILED"),
        trial(6, "oft", "0.001", 0, 0.40),
    ]
    t = build_rows(trials, "eval_token_accuracy", "maximize")
    lora = t.rows[0]
    assert lora.variant == "lora" and lora.best_config == {"trainer.learning_rate": 0.01}
    assert lora.cells["eval_token_accuracy"].value == pytest.approx(0.62) and lora.failed == 1
    # The best seed of the best configuration, not the luckiest seed of any (t2, 0.70).
    assert lora.best_trial_id == "t4" == t.best_trial_id == best_trial(trials, "eval_token_accuracy", "maximize").trial_id
    assert lora.cells["eval_token_accuracy"].best and not t.rows[1].cells["eval_token_accuracy"].best
    # Ties on the metric go to fewer trainable params.
    tied = [trial(7, "hra", "0.1", 0, 0.8, trainable=50.0), trial(8, "lora", "0.1", 0, 0.8, trainable=40.0)]
    assert best_trial(tied, "eval_token_accuracy", "maximize").trial_id == "t8"


def _run(trial_id: str, value: float, trainable: float | None, status: str = "FINISHED") -> TrialRun:
    metrics = {"eval_loss": value, **({"trainable_params": trainable} if trainable is not None else {})}
    return TrialRun(f"run-{trial_id}", status, trial_id, "lora", "lora", {"seed": "0"}, metrics)


def test_best_trial_breaks_ties_by_trainable_params_then_trial_id():
    runs = [_run("b", 1.0, 20.0), _run("a", 1.0, 20.0), _run("c", 1.0, 10.0), _run("d", 0.5, 99.0, status="FAILED")]
    assert best_trial(runs, "eval_loss", "minimize").trial_id == "c"  # a failed run never wins
    assert best_trial(runs[:2], "eval_loss", "minimize").trial_id == "a"  # same value, same size: smaller id
    assert best_trial([_run("x", 1.0, None), _run("y", 1.0, 5.0)], "eval_loss", "minimize").trial_id == "y"
    assert best_trial([_run("x", 2.0, 1.0), _run("y", 3.0, 9.0)], "eval_loss", "maximize").trial_id == "y"
    assert best_trial([_run("n", float("nan"), 1.0)], "eval_loss", "minimize") is None


def test_the_table_names_the_same_best_trial_as_best_trial():
    runs = [_run("b", 1.0, 20.0), _run("a", 1.0, 20.0), _run("c", 1.0, 10.0)]
    table = build_rows(runs, "eval_loss", "minimize")
    assert table.best_trial_id == best_trial(runs, "eval_loss", "minimize").trial_id == "c"
    assert table.to_json()["best_trial_id"] == "c"
