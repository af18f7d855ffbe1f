"""The statistics behind the table: intervals over seeds or eval items, paired tests over
eval items, and Holm's correction. Pure functions of numbers, with SciPy doing the work.

Resampling is seeded, so the same sweep always gets the same table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # a row is tied with the best when its corrected p-value is at least this
RESAMPLES = 9999
SEED = 0


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    method: str  # "t over seeds" | "bootstrap over items" | "one value"


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean over seeds with Student's t interval (n >= 2)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, mean, mean, "one value")
    sem = stats.sem(x)
    if sem == 0:
        return Interval(mean, mean, mean, "t over seeds")
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), "t over seeds")


def item_interval(values: Sequence[float], weights: Sequence[float] | None = None, *,
                  transform=None, confidence: float = CONFIDENCE) -> Interval:
    """A (weighted) mean over eval items with a bootstrap interval: the one-seed case. With
    weights (tokens per item) the statistic is the token-weighted mean, which is exactly how
    eval_loss and token accuracy are defined; `transform` maps it (exp for perplexity)."""
    x = np.asarray(values, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    f = transform or (lambda v: v)

    def statistic(xs, ws, axis=-1):
        return f(np.sum(xs * ws, axis=axis) / np.sum(ws, axis=axis))

    mean = float(statistic(x, w))
    if len(x) < 2 or np.all(x == x[0]):
        return Interval(mean, mean, mean, "bootstrap over items")
    res = stats.bootstrap((x, w), statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(SEED))
    low, high = res.confidence_interval
    return Interval(mean, float(low), float(high), "bootstrap over items")


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value that items score the same under a and b: a sign-flip permutation
    test on the per-item differences (exact for up to 2^13 items' worth of flips, else
    RESAMPLES random ones). Works for losses and for 0/1 correctness alike."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0 or np.all(d == 0):
        return 1.0
    res = stats.permutation_test((d,), lambda x, axis=-1: np.mean(x, axis=axis), permutation_type="samples",
                                 vectorized=True, n_resamples=RESAMPLES, alternative="two-sided",
                                 rng=np.random.default_rng(SEED))
    return float(min(1.0, res.pvalue))


def seeds_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch's t-test on the two configurations' per-seed values: would other seeds separate
    them? None with fewer than two seeds on either side. Complements `paired_p`, which asks
    whether these eval items do (and cannot see seed-to-seed variation)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None). SciPy ships Benjamini-Hochberg
    (`false_discovery_control`) but not Holm, which controls the family-wise error: the
    claim "this row is worse than the best" is then wrong for at most 5 % of sweeps."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    present.sort()
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out
