"""Every shipped spec validates and plans; the seed comparison covers every seed adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.spec import load_spec, make_plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in SPECS} >= {"quickstart.yaml", "seed-comparison.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_plans_without_errors(path):
    spec, spec_dir = load_spec(path)
    # The seed comparison ships Llama-3.1-8B's config.json only: shapes, no weights.
    plan = make_plan(spec, spec_dir, config_only=path.name == "seed-comparison.yaml")
    assert plan.ok, [r.lines for r in plan.rejected]
    assert plan.trials and all(t.trainable > 0 for t in plan.trials)


def test_seed_comparison_lists_every_seed_variant_with_exact_counts():
    spec, spec_dir = load_spec(EXAMPLES / "seed-comparison.yaml")
    plan = make_plan(spec, spec_dir, config_only=True)
    variants = {t.trial.adapter.type if t.trial.adapter.type != "lora" else
                {"default": "lora"}.get(t.trial.adapter.init_lora_weights, f"lora+{t.trial.adapter.init_lora_weights}")
                for t in plan.trials}
    assert variants == {"lora", "lora+pissa", "lora+corda", "lora+loftq", "ln_tuning", "oft", "hra", "waveft",
                        "vblora", "c3a", "tinylora"}
    assert plan.base_params == 8_030_261_248  # Llama-3.1-8B
    counts = {t.trial.adapter.type: t.trainable for t in plan.trials if t.trial.adapter.type != "lora"}
    # r=16 on q_proj (4096x4096) and v_proj (4096->1024) in 32 layers
    lora = next(t for t in plan.trials if t.trial.adapter.type == "lora")
    assert lora.trainable == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert counts["ln_tuning"] == (2 * 32 + 1) * 4096
    assert counts["waveft"] == 2592 * 64


def test_seed_comparison_refuses_loftq_without_gpus(tmp_path):
    raw = yaml.safe_load((EXAMPLES / "seed-comparison.yaml").read_text())
    raw["resources"]["gpus_per_worker"] = 0
    raw["model"]["base_model"] = str(EXAMPLES / raw["model"]["base_model"])
    raw["data"]["train"] = str(EXAMPLES / raw["data"]["train"])
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(raw))
    plan = make_plan(*load_spec(path), config_only=True)
    assert [r.trial_id.split("-")[0:2] for r in plan.rejected] == [["lora", "loftq"]]
    assert "needs CUDA" in plan.rejected[0].lines[0]
    assert len(plan.trials) == 10


def test_corda_calibration_memory_is_in_the_estimate(tmp_path):
    """CorDA holds an in x in covariance per target until every target is decomposed: on
    Llama-3.1-8B's q_proj and v_proj (in 4096, 32 layers each) 4 GiB in fp32, 2 GiB with
    corda_half_covariance; the whole bf16 base is held beside them."""
    from sweep.spec.estimate import MiB, OVERHEAD_MIB

    raw = yaml.safe_load((EXAMPLES / "seed-comparison.yaml").read_text())
    raw["model"]["base_model"] = str(EXAMPLES / raw["model"]["base_model"])
    raw["data"]["train"] = str(EXAMPLES / raw["data"]["train"])
    corda = {"type": "lora", "r": 16, "init_lora_weights": "corda", "target_modules": ["q_proj", "v_proj"]}
    raw["search"]["adapters"] = [corda, {**corda, "corda_half_covariance": True},
                                 {**corda, "init_lora_weights": "pissa"}]
    raw["search"]["seeds"] = [0]
    path = tmp_path / "corda.yaml"
    path.write_text(yaml.safe_dump(raw))
    plan = make_plan(*load_spec(path), config_only=True)
    assert plan.ok, [r.lines for r in plan.rejected]
    full, half, pissa = (next(t.estimate for t in plan.trials if t.trial.adapter.init_lora_weights == init
                              and t.trial.adapter.corda_half_covariance == h)
                         for init, h in (("corda", False), ("corda", True), ("pissa", False)))
    covariance = 64 * 4096 ** 2
    base = plan.base_params * 2  # bf16 on GPUs
    assert full.calibration_peak_mb == pytest.approx((base + covariance * 4) / MiB + OVERHEAD_MIB["cuda"])
    assert half.calibration_peak_mb == pytest.approx((base + covariance * 2) / MiB + OVERHEAD_MIB["cuda"])
    assert pissa.calibration_peak_mb is None
    assert full.peak_memory_mb >= full.calibration_peak_mb > half.calibration_peak_mb
    # The half-precision covariance is its own trial; the default one keeps the id it always had.
    ids = {t.trial.trial_id for t in plan.trials}
    assert len(ids) == 3
