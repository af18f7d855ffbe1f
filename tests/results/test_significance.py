"""Intervals, paired tests and Holm's correction: against SciPy on fixed data, and through
the table on hand-made trials with per-example predictions (no services)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from sweep.results import stats
from sweep.results.render import to_markdown
from sweep.results.table import build_rows
from sweep.tracking.reader import TrialRun


def test_seed_interval_is_students_t():
    values = [0.61, 0.64, 0.60]
    iv = stats.seed_interval(values)
    low, high = st.t.interval(0.95, 2, loc=np.mean(values), scale=st.sem(values))
    assert (iv.mean, iv.low, iv.high) == pytest.approx((np.mean(values), low, high))
    assert stats.seed_interval([0.5]).low == stats.seed_interval([0.5]).high == 0.5


def test_item_interval_is_scipys_bootstrap_of_the_token_weighted_mean():
    rng = np.random.default_rng(3)
    loss, tokens = rng.gamma(2.0, 1.0, 300), rng.integers(3, 12, 300).astype(float)
    iv = stats.item_interval(loss, tokens)
    assert iv.mean == pytest.approx(np.sum(loss * tokens) / np.sum(tokens))
    ref = st.bootstrap((loss, tokens), lambda x, w, axis=-1: np.sum(x * w, axis=axis) / np.sum(w, axis=axis),
                       paired=True, vectorized=True, n_resamples=stats.RESAMPLES, method="percentile",
                       rng=np.random.default_rng(stats.SEED)).confidence_interval
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high))
    assert iv.low < iv.mean < iv.high


def test_paired_p_is_scipys_sign_flip_test_and_agrees_with_a_paired_t_test():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 200)
    b = a + rng.normal(0.3, 1, 200)
    p = stats.paired_p(a, b)
    ref = st.permutation_test((a - b,), lambda x, axis=-1: np.mean(x, axis=axis), permutation_type="samples",
                              vectorized=True, n_resamples=stats.RESAMPLES, rng=np.random.default_rng(stats.SEED))
    assert p == pytest.approx(ref.pvalue)
    assert p < 0.01 and st.ttest_rel(a, b).pvalue < 0.01
    assert stats.paired_p(a, a) == 1.0  # no difference at all: not significant
    # 8 items: all 2^8 sign flips enumerated; all-positive differences give the exact minimum 2/256.
    assert stats.paired_p(np.ones(8), np.zeros(8)) == pytest.approx(2 / 256)


def test_holm_step_down():
    assert stats.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def _trial(i: int, variant: str, lr: str, seed: int, value: float) -> TrialRun:
    return TrialRun(f"r{i}", "FINISHED", f"t{i}", variant.split("+")[0], variant,
                    {"trainer.learning_rate": lr, "seed": str(seed)}, {"eval_exact_match": value, "trainable_params": 10.0})


def test_table_marks_tied_and_worse_rows_from_paired_items():
    """Three variants scored on the same 120 items: `oft` differs from the best on 2 items
    (tied), `c3a` is right far less often (worse); intervals come from the seeds."""
    n = 120
    rng = np.random.default_rng(0)
    good = rng.random(n) < 0.8
    near = good.copy()
    near[:2] = ~near[:2]
    bad = rng.random(n) < 0.3
    trials, items = [], {}
    for k, (variant, correct) in enumerate([("lora", good), ("oft", near), ("c3a", bad)]):
        for seed in (0, 1, 2):
            flips = rng.random(n) < 0.02  # seeds disagree a little
            c = correct ^ flips
            t = _trial(10 * k + seed, variant, "0.01", seed, float(c.mean()))
            trials.append(t)
            items[t.run_id] = [{"index": i, "correct": bool(c[i])} for i in range(n)]
    table = build_rows(trials, "eval_exact_match", "maximize", items=items)
    rows = {r.variant: r for r in table.rows}
    assert table.rows[0].variant == "lora" and rows["lora"].stats.tied_with_best is None
    assert rows["oft"].stats.tied_with_best is True and rows["oft"].stats.p_vs_best >= 0.05
    assert rows["c3a"].stats.tied_with_best is False and rows["c3a"].stats.p_vs_best < 0.05
    assert rows["c3a"].stats.n_items == n and rows["c3a"].stats.n_seeds == 3
    lo = rows["lora"].stats
    assert lo.ci_method == "t over seeds" and lo.ci_low < lo.mean < lo.ci_high
    assert stats.holm([rows["oft"].stats.p_raw, rows["c3a"].stats.p_raw]) == pytest.approx(
        [rows["oft"].stats.p_vs_best, rows["c3a"].stats.p_vs_best])
    # Beside the item test, Welch's t over the seeds' values asks whether other seeds would separate them.
    assert rows["c3a"].stats.p_seeds == pytest.approx(st.ttest_ind(rows["c3a"].cells["eval_exact_match"].values,
                                                                   lo_values := rows["lora"].cells["eval_exact_match"].values,
                                                                   equal_var=False).pvalue)
    assert len(lo_values) == 3 and 0 <= lo.ci_low and lo.ci_high <= 1  # a fraction's interval stays in [0, 1]
    row_json = {r["variant"]: r for r in table.to_json()["rows"]}
    assert {"mean", "ci_low", "ci_high", "n_seeds", "p_vs_best", "tied_with_best"} <= set(row_json["oft"])
    assert table.significance["tied_rows"] == ["oft"] and table.significance["tested_rows"] == 2
    md = to_markdown(table)
    assert "≈ best" in md and "1 of 2 rows" in md


def test_one_seed_gets_a_bootstrap_interval_over_items():
    rng = np.random.default_rng(5)
    c = rng.random(200) < 0.6
    t = _trial(1, "lora", "0.01", 0, float(c.mean()))
    table = build_rows([t], "eval_exact_match", "maximize",
                       items={t.run_id: [{"index": i, "correct": bool(c[i])} for i in range(200)]})
    s = table.rows[0].stats
    assert s.ci_method == "bootstrap over items" and s.n_seeds == 1
    assert s.mean == pytest.approx(c.mean()) and s.ci_low < s.mean < s.ci_high
    assert s.ci_high - s.ci_low == pytest.approx(2 * 1.96 * math.sqrt(0.6 * 0.4 / 200), abs=0.03)
