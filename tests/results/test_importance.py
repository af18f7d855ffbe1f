"""Parameter importance on hand-made trial runs (no services): the field that drives the
metric comes first; too little data gives a reason, not an exception."""

from __future__ import annotations

import json
import math
import random

import pytest

from sweep.results.importance import importance_text, parameter_importance, plot_importance
from sweep.tracking.reader import TrialRun

LRS = ["1e-05", "3e-05", "0.0001", "0.0003", "0.001", "0.003"]
VARIANTS = {"lora": 0.0, "lora+pissa": 0.8, "ln_tuning": 2.0}


def _trials(metric_of, n: int = 36, variants: tuple[str, ...] = ("lora",)) -> list[TrialRun]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        variant = variants[i % len(variants)]
        params = {"trainer.learning_rate": LRS[(i // len(variants)) % len(LRS)], "seed": str(i % 3), "adapter.type": variant.split("+")[0]}
        if variant != "ln_tuning":  # ln_tuning has no rank: the field is absent
            params |= {"adapter.r": str(rng.choice([4, 8, 16, 32])), "adapter.alpha": str(rng.choice([8, 16, 32]))}
            params["adapter.init_lora_weights"] = "pissa" if variant.endswith("pissa") else "true"
        value = metric_of(variant, params) + rng.gauss(0, 1e-3)
        out.append(TrialRun(f"r{i}", "FINISHED", f"t{i}", variant.split("+")[0], variant, params, {"eval_loss": value}))
    # Neither a failed trial nor one without the metric counts.
    out.append(TrialRun("rf", "FAILED", "tf", "lora", "lora", {"trainer.learning_rate": "0.1"}, {"eval_loss": 99.0}))
    out.append(TrialRun("rm", "FINISHED", "tm", "lora", "lora", {"trainer.learning_rate": "0.1"}, {}))
    return out


def _lr_matters(variant, params):
    return (math.log10(float(params["trainer.learning_rate"])) + 3.5) ** 2


@pytest.mark.parametrize("evaluator", ["fanova", "ped-anova"])
def test_learning_rate_ranks_first_when_only_it_matters(evaluator):
    imp = parameter_importance(_trials(_lr_matters), "eval_loss", "minimize", evaluator=evaluator)
    assert imp.reason is None and imp.n_trials == 36 and imp.method == evaluator
    names = [n for n, _ in imp.scores]
    assert names[0] == "trainer.learning_rate" and imp.scores[0][1] > 0.9
    assert set(names) == {"trainer.learning_rate", "adapter.r", "adapter.alpha"}  # seed and constants left out
    assert sum(v for _, v in imp.scores) == pytest.approx(1.0)
    again = parameter_importance(_trials(_lr_matters), "eval_loss", "minimize", evaluator=evaluator)
    assert again.scores == imp.scores  # deterministic
    text = importance_text(imp)
    assert evaluator in text and "36 finished trials" in text and "1. trainer.learning_rate" in text
    assert json.loads(json.dumps(imp.to_json()))["scores"][0]["param"] == "trainer.learning_rate"


@pytest.mark.parametrize("evaluator", ["fanova", "ped-anova"])
def test_variant_ranks_first_when_only_it_matters(evaluator):
    trials = _trials(lambda variant, params: VARIANTS[variant], n=45, variants=tuple(VARIANTS))
    imp = parameter_importance(trials, "eval_loss", "maximize", evaluator=evaluator)
    assert imp.reason is None, imp.reason
    names = [n for n, _ in imp.scores]
    # PED-ANOVA looks at only the top 5 trials here, so its ranking is rougher.
    assert names[0] == "variant" and imp.scores[0][1] > (0.9 if evaluator == "fanova" else 0.5)
    # Fixed by the variant, so left to it: adapter.type, and init_lora_weights (lora vs lora+pissa).
    assert "adapter.type" not in names and "adapter.init_lora_weights" not in names
    assert "adapter.r" in names  # absent for ln_tuning, still scored (as a category)


def test_too_little_data_gives_a_reason():
    few = parameter_importance(_trials(_lr_matters, n=3), "eval_loss", "minimize")
    assert few.scores == [] and "at least 5 finished trials" in few.reason and few.n_trials == 3
    assert "needs at least" in importance_text(few) and plot_importance(few, "unused.png") is None
    assert "at least 10" in parameter_importance(_trials(_lr_matters, n=6), "eval_loss", "minimize",
                                                 evaluator="ped-anova").reason
    one = [TrialRun(f"r{i}", "FINISHED", f"t{i}", "lora", "lora", {"trainer.learning_rate": lr, "seed": str(i)},
                    {"eval_loss": float(i)}) for i, lr in enumerate(LRS)]
    assert "at least 2 swept fields" in parameter_importance(one, "eval_loss", "minimize").reason
    assert parameter_importance(one, "no_such_metric", "minimize").n_trials == 0


def test_fanova_falls_back_to_ped_anova_without_scikit_learn(monkeypatch):
    monkeypatch.setattr("sweep.results.importance._has_sklearn", lambda: False)
    imp = parameter_importance(_trials(_lr_matters), "eval_loss", "minimize")
    assert imp.method == "ped-anova" and imp.scores[0][0] == "trainer.learning_rate"


def test_plot_importance_writes_a_png(tmp_path):
    imp = parameter_importance(_trials(_lr_matters), "eval_loss", "minimize")
    path = plot_importance(imp, tmp_path / "plots" / "importance.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
